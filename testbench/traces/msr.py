"""MSR Cambridge block traces (SNIA IOTTA): CSV without a header,
``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``. Timestamp is
a Windows FILETIME (100 ns ticks since 1601), Type ``Read``/``Write``, Offset
and Size in bytes, ResponseTime in ticks. The device is ``HOST_DISK``.
A header row, if present, is skipped; extra trailing columns are tolerated."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from testbench.errors import TraceError
from testbench.traces.record import (
    IoRecord,
    LineWriter,
    WriteResult,
    parse_int,
    sniff_lines,
    text_lines,
)

TICK_NS = 100
_TYPES = {"read": "R", "write": "W"}


def read(path: str | os.PathLike, **_opts) -> Iterator[IoRecord]:
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        f = line.split(",")
        if line_no == 1 and f[0].strip().lower() == "timestamp":
            continue
        if len(f) < 7:
            raise TraceError(str(path), line_no, f"expected 7 fields (Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime), got {len(f)}")
        op = _TYPES.get(f[3].strip().lower())
        if op is None:
            raise TraceError(str(path), line_no, f"Type {f[3]!r} is neither Read nor Write")
        ticks = parse_int(path, line_no, f[0].strip(), "Timestamp")
        disk = parse_int(path, line_no, f[2].strip(), "DiskNumber")
        offset = parse_int(path, line_no, f[4].strip(), "Offset")
        size = parse_int(path, line_no, f[5].strip(), "Size")
        yield IoRecord(ticks * TICK_NS, op, offset, size, f"{f[1].strip()}_{disk}")


def write(path: str | os.PathLike, records: Iterable[IoRecord], **_opts) -> WriteResult:
    result = WriteResult()
    with LineWriter(path) as out:
        for rec in records:
            if rec.op not in ("R", "W"):
                result.skipped += 1
                continue
            m = re.fullmatch(r"(.+)_(\d+)", rec.device)
            host, disk = (m.group(1), m.group(2)) if m else (rec.device, "0")
            kind = "Read" if rec.op == "R" else "Write"
            out.line(f"{rec.ts_ns // TICK_NS},{host},{disk},{kind},{rec.offset_bytes},{rec.length_bytes},0")
            result.written += 1
    return result


def _fits(ln: str) -> bool:
    f = ln.split(",")
    return len(f) >= 7 and f[3].strip().lower() in _TYPES and f[0].isdigit() and f[4].isdigit() and f[5].isdigit()


def sniff(head: bytes, complete: bool = False) -> bool:
    return sniff_lines(head, complete, _fits, header="timestamp,hostname")
