"""Hot-path twins of binary layouts declared with construct.

A layout is written down once, as a construct declaration, and both parsed
and built from it. Where a fixed-width part of it is on a hot path (a frame
or request header read or written per I/O), ``fast_struct`` derives a
``struct.Struct`` from that declaration, so the per-call cost is one
``pack``/``unpack_from`` while the layout still lives in one place.

It sits in hal because both firmware (the replication link, NVRAM) and
drivers (NBD) use it and neither may import the other. It touches no OS.
"""

from __future__ import annotations

import struct

from construct import Bytes, Const, FormatField, Struct


def fast_struct(decl: Struct) -> struct.Struct:
    """A ``struct.Struct`` with the same layout as a construct Struct made
    only of fixed-width fields: integers of one byte order (plain, Const, or
    behind an Adapter such as Enum) and fixed ``Bytes(n)`` (a magic
    ``Const(b"...")``, unpacked as bytes). TypeError for anything else."""
    orders, codes = set(), []
    for sub in decl.subcons:
        field = sub.subcon if isinstance(sub, Const) else sub
        while not isinstance(field, (FormatField, Bytes)) and hasattr(field, "subcon"):
            field = field.subcon
        if isinstance(field, Bytes) and isinstance(field.length, int):
            codes.append(f"{field.length}s")
        elif isinstance(field, FormatField) and field.fmtstr[0] in "<>":
            if field.length > 1:  # a single byte has no byte order
                orders.add(field.fmtstr[0])
            codes.append(field.fmtstr[1:])
        else:
            raise TypeError(f"{sub.name}: not a fixed-width field with an explicit byte order")
    if len(orders) > 1 or not codes:
        raise TypeError("a struct needs at least one field, and integers of one byte order")
    fmt = struct.Struct((orders.pop() if orders else ">") + "".join(codes))
    if fmt.size != decl.sizeof():
        raise TypeError("derived struct size differs from the declaration")
    return fmt
