"""Alibaba Cloud block traces: CSV ``device_id,opcode,offset,length,timestamp``
with opcode ``R``/``W``, offset and length in bytes, timestamp in µs."""

from __future__ import annotations

import os
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

_OPS = {"R": "R", "W": "W"}


def read(path: str | os.PathLike, **_opts) -> Iterator[IoRecord]:
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        f = [x.strip() for x in line.split(",")]
        if line_no == 1 and f[0].lower() == "device_id":
            continue
        if len(f) < 5:
            raise TraceError(str(path), line_no, f"expected 5 fields (device_id,opcode,offset,length,timestamp), got {len(f)}")
        op = _OPS.get(f[1].upper())
        if op is None:
            raise TraceError(str(path), line_no, f"opcode {f[1]!r} is neither R nor W")
        offset = parse_int(path, line_no, f[2], "offset")
        length = parse_int(path, line_no, f[3], "length")
        ts_us = parse_int(path, line_no, f[4], "timestamp")
        yield IoRecord(ts_us * 1000, op, offset, length, f[0])


def write(path: str | os.PathLike, records: Iterable[IoRecord], **_opts) -> WriteResult:
    result = WriteResult()
    with LineWriter(path) as out:
        for rec in records:
            if rec.op not in _OPS:
                result.skipped += 1
                continue
            out.line(f"{rec.device},{rec.op},{rec.offset_bytes},{rec.length_bytes},{rec.ts_ns // 1000}")
            result.written += 1
    return result


def _fits(ln: str) -> bool:
    f = [x.strip() for x in ln.split(",")]
    return len(f) == 5 and f[1].upper() in _OPS and all(x.isdigit() for x in f[2:])


def sniff(head: bytes, complete: bool = False) -> bool:
    return sniff_lines(head, complete, _fits, header="device_id,")
