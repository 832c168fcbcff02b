"""The replay log: for every write the replayer issued, where it went and when it
was issued and acknowledged (monotonic ns), in a compact binary file.

Layout, declared once below: a header (magic, version, record size, the
monotonic and wall clocks at the start, the volumes, the trace's name), then
fixed-size records appended as writes complete. A record of a write that was
never acknowledged (in flight when the replay stopped, or failed) has
``ack_ns == 0`` and says why in ``flags``. Millions of writes are fine: the
reader iterates the file in chunks and can be iterated again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from construct import (
    Const,
    Int8ub,
    Int16ub,
    Int16ul,
    Int32ub,
    Int32ul,
    Int64ub,
    Int64ul,
    PascalString,
    PrefixedArray,
    Struct,
)

from testbench.errors import ReplayLogError

log = logging.getLogger(__name__)

MAGIC = b"MFWRLOG1"
VERSION = 1

LogVolume = Struct(
    "name" / PascalString(Int8ub, "utf8"),
    "block_size" / Int32ub,
    "num_blocks" / Int64ub,
)
LogHeader = Struct(
    "magic" / Const(MAGIC),
    "version" / Int16ub,
    "record_bytes" / Int16ub,
    "start_mono_ns" / Int64ub,  # time.monotonic_ns() when the replay started
    "start_wall_ns" / Int64ub,  # time.time_ns() at the same moment
    "volumes" / PrefixedArray(Int16ub, LogVolume),
    "trace" / PascalString(Int16ub, "utf8"),
    "header_end" / Const(b"\n"),
)
LogRecord = Struct(
    "write_id" / Int64ul,  # increasing in issue order, from 1
    "issue_ns" / Int64ul,
    "ack_ns" / Int64ul,  # 0: never acknowledged
    "lba" / Int64ul,
    "nblocks" / Int32ul,
    "volume" / Int16ul,  # index into the header's volumes
    "flags" / Int16ul,
)
RECORD_BYTES = LogRecord.sizeof()  # 40
_RECORD = LogRecord.compile()
FLAG_ACKED = 1
FLAG_FAILED = 2


@dataclass(slots=True)
class WriteRecord:
    write_id: int
    volume: int
    lba: int
    nblocks: int
    issue_ns: int
    ack_ns: int | None  # None: not (yet) acknowledged
    failed: bool = False


@dataclass
class LogVolumeInfo:
    name: str
    block_size: int
    num_blocks: int


class ReplayLogWriter:
    def __init__(self, path: str | os.PathLike, volumes: list[LogVolumeInfo], *, start_mono_ns: int,
                 start_wall_ns: int, trace: str = "") -> None:
        self.path = str(path)
        self._f = open(path, "wb", buffering=1 << 20)
        self._f.write(LogHeader.build(dict(
            version=VERSION, record_bytes=RECORD_BYTES, start_mono_ns=start_mono_ns, start_wall_ns=start_wall_ns,
            volumes=[dict(name=v.name, block_size=v.block_size, num_blocks=v.num_blocks) for v in volumes],
            trace=trace,
        )))
        self.count = 0

    def append(self, w: WriteRecord) -> None:
        flags = FLAG_FAILED if w.failed else (FLAG_ACKED if w.ack_ns is not None else 0)
        self._f.write(_RECORD.build(dict(write_id=w.write_id, issue_ns=w.issue_ns, ack_ns=w.ack_ns or 0,
                                         lba=w.lba, nblocks=w.nblocks, volume=w.volume, flags=flags)))
        self.count += 1

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class ReplayLog:
    """A replay log on disk; iterate it (as many times as needed) for WriteRecords."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if not head.startswith(MAGIC):
            raise ReplayLogError(f"{path}: not a mirrorfw replay log (magic {head[:8]!r})")
        try:
            h = LogHeader.parse(head)
        except Exception as e:  # construct raises many kinds; all mean the same here
            raise ReplayLogError(f"{path}: unreadable replay log header: {e}") from None
        if h.version != VERSION or h.record_bytes != RECORD_BYTES:
            raise ReplayLogError(f"{path}: replay log version {h.version} / record size {h.record_bytes} not supported")
        self.start_mono_ns = h.start_mono_ns
        self.start_wall_ns = h.start_wall_ns
        self.volumes = [LogVolumeInfo(v.name, v.block_size, v.num_blocks) for v in h.volumes]
        self.trace = h.trace
        self.data_offset = len(LogHeader.build(dict(
            version=h.version, record_bytes=h.record_bytes, start_mono_ns=h.start_mono_ns,
            start_wall_ns=h.start_wall_ns, volumes=h.volumes, trace=h.trace)))
        size = os.path.getsize(path) - self.data_offset
        self.count, partial = divmod(size, RECORD_BYTES)
        if partial:
            log.warning("%s: last record cut short (%d bytes); ignoring it", path, partial)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[WriteRecord]:
        parse = _RECORD.parse
        with open(self.path, "rb") as f:
            f.seek(self.data_offset)
            left = self.count
            while left:
                n = min(left, 8192)
                chunk = f.read(n * RECORD_BYTES)
                if len(chunk) < n * RECORD_BYTES:
                    raise ReplayLogError(f"{self.path}: shrank while being read")
                for i in range(n):
                    r = parse(chunk[i * RECORD_BYTES:(i + 1) * RECORD_BYTES])
                    yield WriteRecord(r.write_id, r.volume, r.lba, r.nblocks, r.issue_ns,
                                      r.ack_ns if r.flags & FLAG_ACKED else None, bool(r.flags & FLAG_FAILED))
                left -= n


def write_log(path: str | os.PathLike, volumes: list[LogVolumeInfo], records: Iterable[WriteRecord], *,
              start_mono_ns: int = 0, start_wall_ns: int = 0, trace: str = "") -> int:
    """Write a whole log at once (tests, conversions)."""
    w = ReplayLogWriter(path, volumes, start_mono_ns=start_mono_ns, start_wall_ns=start_wall_ns, trace=trace)
    try:
        for r in records:
            w.append(r)
    finally:
        w.close()
    return w.count
