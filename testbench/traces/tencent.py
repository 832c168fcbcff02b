"""Tencent CBS block traces: CSV ``Timestamp,Offset,Size,IOType,VolumeID``
with Timestamp in seconds (Unix time), Offset and Size in 512-byte sectors,
IOType 0 = read, 1 = write. Sub-second time is lost when writing this format."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from testbench.errors import TraceError
from testbench.traces.record import (
    SECTOR,
    IoRecord,
    LineWriter,
    WriteResult,
    parse_int,
    parse_number,
    sniff_lines,
    text_lines,
)

_OPS = {"0": "R", "1": "W"}


def read(path: str | os.PathLike, **_opts) -> Iterator[IoRecord]:
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        f = [x.strip() for x in line.split(",")]
        if line_no == 1 and f[0].lower() == "timestamp":
            continue
        if len(f) < 5:
            raise TraceError(str(path), line_no, f"expected 5 fields (Timestamp,Offset,Size,IOType,VolumeID), got {len(f)}")
        op = _OPS.get(f[3])
        if op is None:
            raise TraceError(str(path), line_no, f"IOType {f[3]!r} is neither 0 (read) nor 1 (write)")
        ts_s = parse_number(path, line_no, f[0], "Timestamp")
        offset = parse_int(path, line_no, f[1], "Offset")
        size = parse_int(path, line_no, f[2], "Size")
        yield IoRecord(round(ts_s * 1_000_000_000), op, offset * SECTOR, size * SECTOR, f[4])


def write(path: str | os.PathLike, records: Iterable[IoRecord], **_opts) -> WriteResult:
    result = WriteResult()
    with LineWriter(path) as out:
        for rec in records:
            if rec.op not in ("R", "W") or rec.offset_bytes % SECTOR or rec.length_bytes % SECTOR:
                result.skipped += 1
                continue
            io_type = 0 if rec.op == "R" else 1
            out.line(f"{rec.ts_ns // 1_000_000_000},{rec.offset_bytes // SECTOR},{rec.length_bytes // SECTOR},{io_type},{rec.device}")
            result.written += 1
    return result


def _fits(ln: str) -> bool:
    f = [x.strip() for x in ln.split(",")]
    return len(f) == 5 and f[3] in _OPS and all(x.replace(".", "", 1).isdigit() for x in f[:3])


def sniff(head: bytes, complete: bool = False) -> bool:
    return sniff_lines(head, complete, _fits, header="timestamp,offset")
