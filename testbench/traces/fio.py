"""fio iolog, versions 2 and 3 (``read_iolog=`` / ``write_iolog=``).

Version 2: ``fio version 2 iolog`` then ``FILE add|open|close`` and
``FILE read|write|trim|sync|datasync|wait OFFSET LENGTH``; ``wait`` lines carry,
in the offset field, the time in milliseconds since the start at which the
following I/O may go (fio's DDIR_WAIT), so v2 has millisecond timing.
Version 3: ``fio version 3 iolog`` and every line starts with a timestamp.
fio's own source writes that timestamp with ``utime_since_now`` and replays
it as a microsecond delay, so microseconds is the default here; pass
``v3_unit="ms"`` for files whose producer used milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from testbench.errors import TraceError
from testbench.traces.record import IoRecord, LineWriter, WriteResult, parse_int, text_lines

HEADER_V2 = "fio version 2 iolog"
HEADER_V3 = "fio version 3 iolog"
_IO_ACTIONS = {"read": "R", "write": "W", "trim": "T", "sync": "F", "datasync": "F"}
_FILE_ACTIONS = {"add", "open", "close", "unlink"}
_UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_OP_ACTION = {"R": "read", "W": "write", "T": "trim", "F": "sync"}


def _version_of(path, first: str) -> int:
    first = first.strip()
    if first == HEADER_V2:
        return 2
    if first == HEADER_V3:
        return 3
    raise TraceError(str(path), 1, f"not a fio iolog: first line {first[:60]!r}, expected {HEADER_V2!r} or {HEADER_V3!r}")


def read(path: str | os.PathLike, *, v3_unit: str = "us", **_opts) -> Iterator[IoRecord]:
    """Either version; the header says which."""
    if v3_unit not in _UNIT_NS:
        raise TraceError(str(path), 0, f"v3_unit {v3_unit!r}: use one of {', '.join(_UNIT_NS)}")
    unit = _UNIT_NS[v3_unit]
    lines = text_lines(path)
    version = 0
    now_ns = 0
    for line_no, line in lines:
        if version == 0:
            version = _version_of(path, line)
            continue
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if version == 3:
            if len(fields) < 3:
                raise TraceError(str(path), line_no, f"expected 'TIMESTAMP FILE ACTION [OFFSET LENGTH]', got {line[:80]!r}")
            now_ns = parse_int(path, line_no, fields[0], "timestamp") * unit
            fields = fields[1:]
        name, action = fields[0], fields[1] if len(fields) > 1 else ""
        if action in _FILE_ACTIONS and len(fields) == 2:
            continue
        if action not in _IO_ACTIONS and action != "wait":
            raise TraceError(str(path), line_no, f"unknown action {action!r} (known: {', '.join([*_IO_ACTIONS, 'wait', *_FILE_ACTIONS])})")
        if len(fields) != 4:
            raise TraceError(str(path), line_no, f"action {action!r} needs OFFSET and LENGTH, got {line[:80]!r}")
        offset = parse_int(path, line_no, fields[2], "offset")
        length = parse_int(path, line_no, fields[3], "length")
        if action == "wait":
            if version == 3:
                continue  # fio ignores wait in v3; so do we
            now_ns = offset * 1_000_000  # ms since the start of the replay
            continue
        yield IoRecord(now_ns, _IO_ACTIONS[action], offset, length, name)
    if version == 0:
        raise TraceError(str(path), 1, "empty file: not a fio iolog")


def _write(path, records: Iterable[IoRecord], version: int, v3_unit: str) -> WriteResult:
    unit = _UNIT_NS[v3_unit]
    result = WriteResult()
    seen: set[str] = set()  # devices are added (and opened) before first use, in order
    t0: int | None = None
    last_wait_ms = 0
    with LineWriter(path) as out:
        out.line(HEADER_V3 if version == 3 else HEADER_V2)
        rel = 0
        for rec in records:
            if t0 is None:
                t0 = rec.ts_ns
            rel = max(0, rec.ts_ns - t0)
            stamp = f"{rel // unit} " if version == 3 else ""
            if rec.device not in seen:
                seen.add(rec.device)
                out.line(f"{stamp}{rec.device} add")
                out.line(f"{stamp}{rec.device} open")
            if version == 2:
                ms = rel // 1_000_000
                if ms > last_wait_ms:
                    out.line(f"{rec.device} wait {ms} 0")
                    last_wait_ms = ms
            length = 0 if rec.op == "F" else rec.length_bytes
            offset = 0 if rec.op == "F" else rec.offset_bytes
            out.line(f"{stamp}{rec.device} {_OP_ACTION[rec.op]} {offset} {length}")
            result.written += 1
        end = f"{rel // unit} " if version == 3 else ""
        for dev in sorted(seen):
            out.line(f"{end}{dev} close")
    return result


def write_v2(path: str | os.PathLike, records: Iterable[IoRecord], **_opts) -> WriteResult:
    return _write(path, records, 2, "us")


def write_v3(path: str | os.PathLike, records: Iterable[IoRecord], *, v3_unit: str = "us", **_opts) -> WriteResult:
    if v3_unit not in _UNIT_NS:
        raise ValueError(f"v3_unit {v3_unit!r}: use one of {', '.join(_UNIT_NS)}")
    return _write(path, records, 3, v3_unit)


def sniff_v2(head: bytes, complete: bool = False) -> bool:
    return head.startswith(HEADER_V2.encode())


def sniff_v3(head: bytes, complete: bool = False) -> bool:
    return head.startswith(HEADER_V3.encode())
