"""The run table of a DATA frame with FLAG_RUNS: the segments of a track
written since it was last sent (firmware/protocol.py seals the payload).

The payload starts with ``Runs`` (count u16, then count x (offset u32,
length u32) within the track, ascending, apart), then the runs' bytes one
after another.
"""

from __future__ import annotations

import struct

import construct as cs

from firmware.frames import BadBody
from hal.wire import fast_struct

Run = cs.Struct("offset" / cs.Int32ub, "length" / cs.Int32ub)
Runs = cs.PrefixedArray(cs.Int16ub, Run)
_RUN_COUNT = fast_struct(cs.Struct("count" / cs.Int16ub))
_RUN = fast_struct(Run)
MAX_RUNS = 0xFFFF


def pack_runs(runs: list[tuple[int, int]]) -> bytes:
    """The run table of a DATA payload (equal to ``Runs.build``, tested)."""
    if len(runs) > MAX_RUNS:
        raise BadBody(f"DATA with {len(runs)} runs; at most {MAX_RUNS}")
    try:
        return _RUN_COUNT.pack(len(runs)) + b"".join(_RUN.pack(o, n) for o, n in runs)
    except struct.error as e:
        raise BadBody(f"DATA run does not fit: {e}") from None


def unpack_runs(payload) -> tuple[list[tuple[int, int]], memoryview]:
    """A FLAG_RUNS payload's runs and the bytes after the table. BadBody
    when the table does not fit the payload, or the runs are not ascending
    and apart, empty, or their lengths do not add up to those bytes."""
    view = memoryview(payload).cast("B")
    if len(view) < _RUN_COUNT.size:
        raise BadBody("DATA runs: no run table")
    (count,) = _RUN_COUNT.unpack_from(view)
    table = _RUN_COUNT.size + count * _RUN.size
    if not count or len(view) < table:
        raise BadBody(f"DATA runs: {count} runs do not fit {len(view)} bytes")
    runs = [_RUN.unpack_from(view, _RUN_COUNT.size + i * _RUN.size) for i in range(count)]
    end = 0
    for offset, length in runs:
        if length == 0 or offset < end:
            raise BadBody(f"DATA runs: run {offset}+{length} is empty, overlaps or is out of order")
        end = offset + length
    if sum(n for _, n in runs) != len(view) - table:
        raise BadBody(f"DATA runs add up to {sum(n for _, n in runs)} bytes, the payload holds {len(view) - table}")
    return runs, view[table:]

