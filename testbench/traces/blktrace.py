"""blktrace binary output (``DEV.blktrace.CPU`` files) and blkparse's default text.

Binary: a stream of ``struct blk_io_trace`` (48 bytes, blktrace_api.h) each
followed by ``pdu_len`` bytes of payload. ``magic`` is 0x65617400 with the
format version (7) in the low byte, in the byte order of the machine that
recorded it, so the order is detected from the magic. Per-CPU files are
merged by time. Either queue (Q) or issue (D) events are taken: Q is what the
application asked for, D what reached the device after merging and splitting.
"""

from __future__ import annotations

import glob
import heapq
import os
import re
from collections.abc import Iterable, Iterator

from construct import Int16ub, Int16ul, Int32ub, Int32ul, Int64ub, Int64ul, Struct

from testbench.errors import TraceError
from testbench.traces.record import (
    SECTOR,
    IoRecord,
    LineWriter,
    WriteResult,
    head_lines,
    open_binary,
    text_lines,
)

MAGIC = 0x65617400
VERSION = 0x07
RECORD_BYTES = 48


def _declare(u16, u32, u64):
    return Struct(
        "magic" / u32,  # MAGIC | VERSION
        "sequence" / u32,  # event number
        "time" / u64,  # ns since the trace started
        "sector" / u64,  # 512-byte sectors
        "bytes" / u32,  # transfer length
        "action" / u32,  # low 16 bits: what happened; high 16: category mask
        "pid" / u32,
        "device" / u32,  # kernel dev_t: major << 20 | minor
        "cpu" / u32,
        "error" / u16,
        "pdu_len" / u16,  # bytes of payload after this record
    )


BlkIoTraceLE = _declare(Int16ul, Int32ul, Int64ul)
BlkIoTraceBE = _declare(Int16ub, Int32ub, Int64ub)
assert BlkIoTraceLE.sizeof() == RECORD_BYTES
_PARSE = {"<": BlkIoTraceLE.compile(), ">": BlkIoTraceBE.compile()}

# Action codes (low 16 bits of ``action``), from blktrace_api.h.
TA_QUEUE, TA_ISSUE, TA_COMPLETE = 1, 7, 8
# Category bits (``action >> 16``).
TC_READ, TC_WRITE, TC_FLUSH, TC_SYNC = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TC_QUEUE, TC_ISSUE, TC_COMPLETE = 1 << 4, 1 << 6, 1 << 7
TC_NOTIFY, TC_DISCARD, TC_FUA = 1 << 10, 1 << 13, 1 << 15
EVENTS = {"Q": TA_QUEUE, "D": TA_ISSUE}
_TC_OF = {TA_QUEUE: TC_QUEUE, TA_ISSUE: TC_ISSUE}


def dev_name(dev_t: int) -> str:
    return f"{dev_t >> 20},{dev_t & 0xFFFFF}"


def _op_of(category: int, nbytes: int) -> str | None:
    if category & TC_DISCARD:
        return "T"
    if nbytes == 0:
        return "F" if category & TC_FLUSH else None
    return "W" if category & TC_WRITE else "R"


def cpu_files(path: str | os.PathLike) -> list[str]:
    """One file, or every ``PREFIX.blktrace.N`` beside a file of that shape, or
    every file of a prefix given without the ``.blktrace.N`` suffix."""
    path = str(path)
    m = re.match(r"^(.*\.blktrace)\.\d+$", path)
    if m:
        found = glob.glob(glob.escape(m.group(1)) + ".*")
        return sorted((p for p in found if re.match(r".*\.blktrace\.\d+$", p)), key=_cpu_index)
    if os.path.exists(path):
        return [path]
    found = [p for p in glob.glob(glob.escape(path) + ".blktrace.*") if re.match(r".*\.blktrace\.\d+$", p)]
    if not found:
        raise FileNotFoundError(f"{path}: no such blktrace file (nor {path}.blktrace.N per-CPU files)")
    return sorted(found, key=_cpu_index)


def _cpu_index(p: str) -> int:
    return int(p.rsplit(".", 1)[1])


def _events(path: str, want: int) -> Iterator[tuple[int, int, IoRecord]]:
    tc_want = _TC_OF[want]
    with open_binary(path) as f:
        order = None
        index = 0
        while True:
            raw = f.read(RECORD_BYTES)
            if not raw:
                return
            index += 1
            if len(raw) < RECORD_BYTES:
                raise TraceError(path, index, f"record {index} cut short: {len(raw)} of {RECORD_BYTES} bytes")
            if order is None:
                for candidate in ("<", ">"):
                    if int.from_bytes(raw[:4], "little" if candidate == "<" else "big") & 0xFFFFFF00 == MAGIC:
                        order = candidate
                        break
                else:
                    raise TraceError(path, index, f"bad magic {raw[:4].hex()}: not a blktrace file")
            t = _PARSE[order].parse(raw)
            if t.magic & 0xFFFFFF00 != MAGIC:
                raise TraceError(path, index, f"record {index}: bad magic {t.magic:#010x} (file corrupt or misaligned)")
            if t.magic & 0xFF != VERSION:
                raise TraceError(path, index, f"record {index}: blktrace version {t.magic & 0xFF}, only {VERSION} is known")
            if t.pdu_len:
                pdu = f.read(t.pdu_len)
                if len(pdu) < t.pdu_len:
                    raise TraceError(path, index, f"record {index}: payload cut short ({len(pdu)} of {t.pdu_len} bytes)")
            category = t.action >> 16
            if category & TC_NOTIFY or (t.action & 0xFFFF) != want or not category & tc_want:
                continue
            op = _op_of(category, t.bytes)
            if op is None:
                continue
            yield t.time, t.sequence, IoRecord(t.time, op, t.sector * SECTOR, t.bytes, dev_name(t.device))


def read(path: str | os.PathLike, *, events: str = "Q", **_opts) -> Iterator[IoRecord]:
    if events not in EVENTS:
        raise TraceError(str(path), 0, f"events {events!r}: choose Q (queued) or D (issued)")
    streams = [_events(p, EVENTS[events]) for p in cpu_files(path)]
    for _t, _seq, rec in heapq.merge(*streams, key=lambda e: (e[0], e[1])):
        yield rec


def _dev_numbers(records: Iterable[IoRecord]) -> Iterator[tuple[IoRecord, int]]:
    """Device names like ``8,16`` keep their numbers; others get 8,0 / 8,16 / ... in order of first use."""
    known: dict[str, int] = {}
    for rec in records:
        dev = known.get(rec.device)
        if dev is None:
            m = re.fullmatch(r"(\d+),(\d+)", rec.device)
            dev = (int(m.group(1)) << 20 | int(m.group(2))) if m else (8 << 20 | 16 * len(known))
            known[rec.device] = dev
        yield rec, dev


def _category(op: str) -> int:
    return {"R": TC_READ, "W": TC_WRITE, "T": TC_DISCARD | TC_WRITE, "F": TC_FLUSH | TC_WRITE}[op]


def write(path: str | os.PathLike, records: Iterable[IoRecord], *, issue_delay_ns: int = 1000, **_opts) -> WriteResult:
    """One file (CPU 0, little-endian): a Q event per I/O and a D event
    ``issue_delay_ns`` later, so either selection reads back."""
    build = BlkIoTraceLE.compile()
    result = WriteResult()
    t0 = None
    seq = 0
    with open(path, "wb", buffering=1 << 20) as out:
        for rec, dev in _dev_numbers(records):
            if t0 is None:
                t0 = rec.ts_ns
            t = max(0, rec.ts_ns - t0)
            cat = _category(rec.op)
            nbytes = 0 if rec.op == "F" else rec.length_bytes
            sector = 0 if rec.op == "F" else rec.offset_bytes // SECTOR
            if rec.op != "F" and rec.offset_bytes % SECTOR:
                result.skipped += 1  # blktrace speaks sectors: an unaligned offset cannot be said
                continue
            for ta, tc, when in ((TA_QUEUE, TC_QUEUE, t), (TA_ISSUE, TC_ISSUE, t + issue_delay_ns)):
                seq += 1
                out.write(build.build(dict(
                    magic=MAGIC | VERSION, sequence=seq, time=when, sector=sector, bytes=nbytes,
                    action=ta | (cat | tc) << 16, pid=0, device=dev, cpu=0, error=0, pdu_len=0,
                )))
            result.written += 1
    return result


def sniff(head: bytes, complete: bool = False) -> bool:
    if len(head) < RECORD_BYTES:
        return False
    return any(int.from_bytes(head[:4], bo) & 0xFFFFFF00 == MAGIC for bo in ("little", "big"))


# ---------------------------------------------------------------------------
# blkparse default text: "%D %2c %8s %5T.%9t %5p %2a %3d " then per action,
# e.g. "  8,0    3        1     0.000000000   697  Q  WS 223490 + 8 [kjournald]".
_LINE = re.compile(
    r"^\s*(\d+),(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\.(\d{1,9})\s+(\d+)\s+(\S+)\s+(\S+)\s*(.*)$"
)
_SECTORS = re.compile(r"^(\d+)\s*\+\s*(\d+)")
_SUMMARY = re.compile(r"^(CPU\d+|Total)\s*\(")


def _rwbs_op(rwbs: str) -> str | None:
    if "D" in rwbs:
        return "T"
    if "W" in rwbs:
        return "W"
    if "R" in rwbs:
        return "R"
    if "F" in rwbs:
        return "F"
    return None


def read_text(path: str | os.PathLike, *, events: str = "Q", **_opts) -> Iterator[IoRecord]:
    if events not in EVENTS:
        raise TraceError(str(path), 0, f"events {events!r}: choose Q (queued) or D (issued)")
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m:
            if _SUMMARY.match(line):
                return  # blkparse's per-CPU and total summary follows the events
            raise TraceError(str(path), line_no, f"not a blkparse event line: {line[:80]!r}")
        maj, mnr, _cpu, _seq, sec, frac, _pid, action, rwbs, rest = m.groups()
        if action != events:
            continue
        op = _rwbs_op(rwbs)
        if op is None:
            continue
        ts = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0"))
        s = _SECTORS.match(rest)
        if s:
            offset, length = int(s.group(1)) * SECTOR, int(s.group(2)) * SECTOR
        elif "F" in rwbs:  # a bare (pre)flush carries no sectors
            op, offset, length = "F", 0, 0
        else:
            raise TraceError(str(path), line_no, f"{action} {rwbs} event without 'SECTOR + COUNT': {line[:80]!r}")
        yield IoRecord(ts, op, offset, length, f"{maj},{mnr}")


def write_text(path: str | os.PathLike, records: Iterable[IoRecord], **_opts) -> WriteResult:
    result = WriteResult()
    rwbs = {"R": "R", "W": "W", "T": "D", "F": "FN"}
    t0 = None
    with LineWriter(path) as out:
        for seq, (rec, dev) in enumerate(_dev_numbers(records), 1):
            if rec.op != "F" and (rec.offset_bytes % SECTOR or rec.length_bytes % SECTOR):
                result.skipped += 1
                continue
            if t0 is None:
                t0 = rec.ts_ns
            sec, ns = divmod(max(0, rec.ts_ns - t0), 1_000_000_000)
            head = f"{dev >> 20:3d},{dev & 0xFFFFF:<3d} {0:2d} {seq:8d} {sec:5d}.{ns:09d} {0:5d}  Q {rwbs[rec.op]:>3s} "
            if rec.op == "F":
                out.line(head + "[replay]")
            else:
                out.line(head + f"{rec.offset_bytes // SECTOR} + {rec.length_bytes // SECTOR} [replay]")
            result.written += 1
    return result


def sniff_text(head: bytes, complete: bool = False) -> bool:
    lines = head_lines(head, complete=complete)
    return bool(lines) and all(_LINE.match(ln) or _SUMMARY.match(ln) for ln in lines)
