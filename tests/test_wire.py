"""hal.wire.fast_struct: the struct twin of a construct declaration."""

from __future__ import annotations

import construct as cs
import pytest

from hal.wire import fast_struct


def test_the_twin_packs_what_the_declaration_builds():
    decl = cs.Struct(
        "magic" / cs.Const(b"MFWL"),
        "kind" / cs.Enum(cs.Int8ub, a=1, b=2),
        "flags" / cs.Int16ub,
        "seq" / cs.Int64ub,
        "tag" / cs.Const(7, cs.Int32ub),
    )
    fmt = fast_struct(decl)
    assert fmt.size == decl.sizeof() == 19
    built = decl.build(dict(kind="b", flags=3, seq=1 << 40))
    assert fmt.pack(b"MFWL", 2, 3, 1 << 40, 7) == built
    assert fmt.unpack(built) == (b"MFWL", 2, 3, 1 << 40, 7)


def test_little_endian_declarations_get_a_little_endian_twin():
    decl = cs.Struct("gen" / cs.Int64ul, "state" / cs.Int8ul, "dirty" / cs.Int8ub, "volume" / cs.Int16ul)
    fmt = fast_struct(decl)
    assert fmt.format == "<QBBH"
    assert fmt.pack(1, 2, 1, 3) == decl.build(dict(gen=1, state=2, dirty=1, volume=3))


@pytest.mark.parametrize(
    "decl",
    [
        cs.Struct("name" / cs.PascalString(cs.Int16ub, "utf8")),
        cs.Struct("n" / cs.Int16ub, "data" / cs.Bytes(cs.this.n)),
        cs.Struct("a" / cs.Int16ub, "b" / cs.Int16ul),  # mixed byte order
        cs.Struct("a" / cs.Int8ub, "rest" / cs.GreedyBytes),
        cs.Struct(),
    ],
    ids=["text", "sized-by-field", "mixed-order", "greedy", "empty"],
)
def test_variable_or_mixed_layouts_are_refused(decl):
    with pytest.raises(TypeError):
        fast_struct(decl)
