"""FIU SRCMap / IODedup traces (SNIA IOTTA): whitespace-separated
``ts pid process lba size op major minor md5`` with ts in ns, lba and size in
512-byte sectors, op ``W``/``R``. The device is ``MAJOR,MINOR``. Extra
trailing fields are tolerated; the process name never contains spaces."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator

from testbench.errors import TraceError
from testbench.traces.record import (
    SECTOR,
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
        f = line.split()
        if not f:
            continue
        if len(f) < 8:
            raise TraceError(str(path), line_no, f"expected 9 fields (ts pid process lba size op major minor md5), got {len(f)}")
        op = _OPS.get(f[5].upper())
        if op is None:
            raise TraceError(str(path), line_no, f"op {f[5]!r} is neither W nor R")
        ts = parse_int(path, line_no, f[0], "ts")
        lba = parse_int(path, line_no, f[3], "lba")
        size = parse_int(path, line_no, f[4], "size")
        major = parse_int(path, line_no, f[6], "major")
        minor = parse_int(path, line_no, f[7], "minor")
        yield IoRecord(ts, op, lba * SECTOR, size * SECTOR, f"{major},{minor}")


def write(path: str | os.PathLike, records: Iterable[IoRecord], **_opts) -> WriteResult:
    result = WriteResult()
    numbers: dict[str, tuple[int, int]] = {}
    with LineWriter(path) as out:
        for rec in records:
            if rec.op not in _OPS or rec.offset_bytes % SECTOR or rec.length_bytes % SECTOR:
                result.skipped += 1
                continue
            if rec.device not in numbers:
                m = re.fullmatch(r"(\d+),(\d+)", rec.device)
                numbers[rec.device] = (int(m.group(1)), int(m.group(2))) if m else (8, 16 * len(numbers))
            major, minor = numbers[rec.device]
            md5 = hashlib.md5(f"{rec.device}:{rec.offset_bytes}:{rec.ts_ns}".encode()).hexdigest()
            out.line(f"{rec.ts_ns} 0 replay {rec.offset_bytes // SECTOR} {rec.length_bytes // SECTOR} {rec.op} {major} {minor} {md5}")
            result.written += 1
    return result


def _fits(ln: str) -> bool:
    f = ln.split()
    return len(f) >= 8 and f[5].upper() in _OPS and all(f[i].isdigit() for i in (0, 1, 3, 4, 6, 7))


def sniff(head: bytes, complete: bool = False) -> bool:
    return sniff_lines(head, complete, _fits)
