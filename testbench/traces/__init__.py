"""Trace formats: one table maps each name to its reader, writer and sniffer.

``read_trace(path, fmt=None)`` streams ``IoRecord``s (format auto-detected when
only one format fits the file's head); ``write_trace(path, fmt, records)``
writes any stream in any format. ``VolumeMap`` maps a trace's devices onto a
session's volumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from testbench.errors import TraceError
from testbench.traces import alibaba, blktrace, fio, fiu, generic_csv, msr, tencent
from testbench.traces.record import OPS, IoRecord, WriteResult, head_bytes

__all__ = ["FORMATS", "IoRecord", "TraceError", "TraceFormat", "TraceStats", "VolumeMap", "WriteResult",
           "detect_format", "read_trace", "scan", "write_trace"]


@dataclass(frozen=True)
class TraceFormat:
    name: str
    description: str
    read: Callable[..., Iterator[IoRecord]]
    write: Callable[..., WriteResult]
    sniff: Callable[..., bool] | None  # None: never auto-detected (needs options)
    suffix: str  # for generated sample files


FORMATS: dict[str, TraceFormat] = {f.name: f for f in (
    TraceFormat("fio2", "fio iolog version 2 (ms timing from 'wait' lines)", fio.read, fio.write_v2, fio.sniff_v2, ".iolog"),
    TraceFormat("fio3", "fio iolog version 3 (timestamp per line, µs as fio writes it)", fio.read, fio.write_v3, fio.sniff_v3, ".iolog3"),
    TraceFormat("blktrace", "blktrace binary (blk_io_trace records; per-CPU files merged)", blktrace.read, blktrace.write, blktrace.sniff, ".blktrace.0"),
    TraceFormat("blkparse", "blkparse default text output", blktrace.read_text, blktrace.write_text, blktrace.sniff_text, ".blkparse"),
    TraceFormat("msr", "MSR Cambridge CSV (FILETIME, host, disk, Read/Write, bytes)", msr.read, msr.write, msr.sniff, ".msr.csv"),
    TraceFormat("alibaba", "Alibaba block trace CSV (device,R/W,offset,length bytes,µs)", alibaba.read, alibaba.write, alibaba.sniff, ".alibaba.csv"),
    TraceFormat("tencent", "Tencent CBS CSV (s, offset/size in sectors, 0/1, volume)", tencent.read, tencent.write, tencent.sniff, ".tencent.csv"),
    TraceFormat("fiu", "FIU SRCMap/IODedup (ns pid proc lba size W/R maj min md5)", fiu.read, fiu.write, fiu.sniff, ".fiu"),
    TraceFormat("csv", "generic CSV with a column spec (--columns)", generic_csv.read, generic_csv.write, None, ".csv"),
)}
ALIASES = {"fio": "fio3", "iolog": "fio3", "snia": "msr"}


def format_named(name: str) -> TraceFormat:
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise TraceError("", 0, f"unknown trace format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(path: str | os.PathLike) -> TraceFormat:
    """The one format whose sniffer accepts the file's head; an error naming the
    candidates when none or several fit."""
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size is None:
        try:
            if blktrace.cpu_files(path):  # a per-CPU prefix
                return FORMATS["blktrace"]
        except FileNotFoundError:  # nothing says it was meant to be blktrace
            raise FileNotFoundError(f"{path}: no such file") from None
    head = head_bytes(path)
    complete = size is not None and len(head) < 8192
    fits = [f for f in FORMATS.values() if f.sniff is not None and f.sniff(head, complete)]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise TraceError(str(path), 0, f"cannot tell the trace format; give --format ({', '.join(FORMATS)})")
    raise TraceError(str(path), 0, f"ambiguous trace format ({', '.join(f.name for f in fits)}); give --format")


def read_trace(path: str | os.PathLike, fmt: str | None = None, **opts) -> Iterator[IoRecord]:
    """Stream the records of a trace. ``opts`` go to the reader (``events='D'``
    for blktrace, ``v3_unit='ms'`` for fio3, ``spec=CsvSpec`` for csv)."""
    f = format_named(fmt) if fmt else detect_format(path)
    return f.read(path, **opts)


def write_trace(path: str | os.PathLike, fmt: str, records: Iterable[IoRecord], **opts) -> WriteResult:
    return format_named(fmt).write(path, records, **opts)


@dataclass
class TraceStats:
    records: int = 0
    by_op: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    bytes_by_op: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    devices: dict[str, int] = field(default_factory=dict)
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None
    max_offset_end: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0  # records earlier than their predecessor

    @property
    def duration_s(self) -> float:
        if self.first_ts_ns is None:
            return 0.0
        return (self.last_ts_ns - self.first_ts_ns) / 1e9

    @property
    def iops(self) -> float:
        d = self.duration_s
        return self.records / d if d > 0 else 0.0

    def as_dict(self) -> dict:
        return {"records": self.records, "by_op": self.by_op, "bytes_by_op": self.bytes_by_op,
                "devices": self.devices, "duration_s": round(self.duration_s, 6), "iops": round(self.iops, 1),
                "first_ts_ns": self.first_ts_ns, "last_ts_ns": self.last_ts_ns,
                "max_offset_end": self.max_offset_end, "out_of_order": self.out_of_order}


def scan(records: Iterable[IoRecord]) -> TraceStats:
    """One streaming pass: counts, devices, time span."""
    st = TraceStats()
    last = None
    for r in records:
        st.records += 1
        st.by_op[r.op] += 1
        st.bytes_by_op[r.op] += r.length_bytes
        st.devices[r.device] = st.devices.get(r.device, 0) + 1
        end = r.offset_bytes + r.length_bytes
        if end > st.max_offset_end.get(r.device, 0):
            st.max_offset_end[r.device] = end
        if st.first_ts_ns is None:
            st.first_ts_ns = r.ts_ns
        if last is not None and r.ts_ns < last:
            st.out_of_order += 1
        last = r.ts_ns
        st.last_ts_ns = max(st.last_ts_ns or r.ts_ns, r.ts_ns)
    return st


@dataclass(frozen=True)
class VolumeGeometry:
    name: str
    size_bytes: int
    block_size: int = 512

    @property
    def num_blocks(self) -> int:
        return self.size_bytes // self.block_size


@dataclass(frozen=True)
class MappedIo:
    volume: int  # index into the VolumeMap's volumes
    op: str
    lba: int
    nblocks: int


class VolumeMap:
    """Trace devices onto session volumes. The rule (``describe()`` prints it):
    devices sorted by name are dealt round-robin to the volumes; an I/O's byte
    offset is taken modulo the volume size and aligned down to the volume's
    block; its end is rounded up to a block; an I/O that would pass the end of
    the volume is moved back to end there; lengths are capped at
    ``max_io_bytes`` (and at the volume size). Flushes keep their device's volume."""

    def __init__(self, devices: Iterable[str], volumes: list[VolumeGeometry], *, max_io_bytes: int = 8 << 20) -> None:
        if not volumes:
            raise ValueError("a volume map needs at least one volume")
        self.volumes = volumes
        self.devices = sorted(set(devices))
        self.device_volume = {d: i % len(volumes) for i, d in enumerate(self.devices)}
        self.max_io_bytes = max_io_bytes

    def volume_of(self, device: str) -> int:
        v = self.device_volume.get(device)
        if v is None:  # a device the scan did not see (a reader option changed?): next in turn
            v = self.device_volume[device] = len(self.device_volume) % len(self.volumes)
            self.devices.append(device)
        return v

    def map(self, rec: IoRecord) -> MappedIo:
        v = self.volume_of(rec.device)
        vol = self.volumes[v]
        if rec.op == "F":
            return MappedIo(v, "F", 0, 0)
        bs = vol.block_size
        offset = rec.offset_bytes % vol.size_bytes
        length = min(max(rec.length_bytes, 1), self.max_io_bytes, vol.size_bytes)
        first = offset // bs
        nblocks = -(-(offset + length) // bs) - first
        nblocks = min(nblocks, vol.num_blocks, max(1, self.max_io_bytes // bs))
        if first + nblocks > vol.num_blocks:
            first = vol.num_blocks - nblocks
        return MappedIo(v, rec.op, first, nblocks)

    def describe(self) -> str:
        lines = ["volume mapping: devices sorted, dealt round-robin; lba = (offset mod size) // block_size, "
                 "end rounded up to a block, I/O moved back to fit, length capped at "
                 f"{self.max_io_bytes} bytes"]
        for d in self.devices:
            vol = self.volumes[self.device_volume[d]]
            lines.append(f"  {d} -> {vol.name} ({vol.size_bytes} bytes, block {vol.block_size})")
        return "\n".join(lines)
