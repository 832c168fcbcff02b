"""The scoreboard: is a copy of the session's volumes a consistent cut of the
host's write history?

Definitions (all times are the replayer's monotonic ns):
- Each write w has an issue time i(w) and, if acknowledged, an ack time a(w)
  (never-acknowledged or failed writes have a(w) = infinity). Write ids grow
  in issue order, and the replayer never has two overlapping writes in flight,
  so the writes to any one block are totally ordered and each was
  acknowledged before the next was issued.
- The copy shows, on each block b, the write s(b) whose stamp it holds
  (or nothing: a zero block). S is the set of shown writes.
- T* = max i(w) over w in S: the cut's time. R = {w : a(w) < T*}: the writes
  the host saw complete before it issued a write the copy shows. A host may
  have issued that write *because* those completed (dependent writes), so a
  consistent copy must contain every write of R. Writes in flight at T*
  (i(w) <= T* < a(w)) may be in or out.

Rule. The copy is consistent iff there is a set C with S ⊆ C, R ⊆ C, every
write of C issued no later than T*, and every block showing the last write to
it among C. Because per-block writes are totally ordered and acked before
the next is issued, that is equivalent to: for every block b and every write
w touching b that is newer than s(b) (id(w) > id(s(b)), "nothing" being
older than all), w is neither in R (a lost write or stale block: the copy
lacks an acknowledged-before-T* write there) nor in S (a torn write: the copy
shows w on another block but not here). Plus sanity: every stamp decodes,
names a logged write, and sits on a block that write touched.

Linear time: one pass over the copy (decode every block), one pass over the
log to find T*, one pass over the log checking each write's blocks against
the shown ids. Memory: one 64-bit id per block of the copy plus the set S.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from hal.block import BlockDevice
from testbench import stamp
from testbench.replaylog import ReplayLog, WriteRecord

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 4 << 20
NOTHING = 0  # shown id of a block that shows no write


@dataclass
class Violation:
    kind: str  # lost-write | stale-block | torn-write | unknown-write | misplaced | corrupt | foreign-data
    volume: str
    lba: int
    shows: int | None  # write id the block shows (None: nothing)
    lacks: int | None  # write id the block should show (or a newer one)
    message: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "volume": self.volume, "lba": self.lba, "shows": self.shows,
                "lacks": self.lacks, "message": self.message}


@dataclass
class ViolationRange:
    """Violations of one kind on one volume at LBAs no more than
    MERGE_GAP_BLOCKS apart (a lost write is reported at its first block, so
    the next write's report is its length further on): how a copy missing a
    whole CG reads, one line instead of one per write. ``count`` is the
    number of violations in the range."""

    kind: str
    volume: str
    first_lba: int
    last_lba: int
    count: int
    message: str  # the first violation's

    def as_dict(self) -> dict:
        return {"kind": self.kind, "volume": self.volume, "first_lba": self.first_lba, "last_lba": self.last_lba,
                "count": self.count, "message": self.message}

    def line(self) -> str:
        where = (f"lba {self.first_lba}" if self.first_lba == self.last_lba
                 else f"lba {self.first_lba}-{self.last_lba} ({self.count} violations)")
        return f"{self.kind}: {self.volume} {where}: {self.message}"


MERGE_GAP_BLOCKS = 256  # 128 KiB of 512-byte blocks: one write's length, at most, between two reports
MAX_RANGES = 1000  # ranges kept in a result (all violations are counted by kind)


@dataclass
class CheckResult:
    consistent: bool = True
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0
    blocks: int = 0
    stamped_blocks: int = 0
    shown_writes: int = 0
    logged_writes: int = 0
    acked_writes: int = 0
    t_star_ns: int | None = None  # issue time of the newest shown write
    t_star_write: int | None = None
    required_writes: int = 0  # |R|
    missing_acked_before_check: int = 0  # acked writes not in the cut (exposure)
    check_ns: int | None = None
    data_exposure_s: float | None = None  # check time - T*: how far the copy trails the host
    by_kind: dict[str, int] = field(default_factory=dict)  # every violation counted by kind
    ranges: list[ViolationRange] = field(default_factory=list)  # grouped, at most MAX_RANGES
    ranges_total: int = 0

    def as_dict(self) -> dict:
        return {"consistent": self.consistent, "violation_count": self.violation_count,
                "violations": [v.as_dict() for v in self.violations], "blocks": self.blocks,
                "stamped_blocks": self.stamped_blocks, "shown_writes": self.shown_writes,
                "logged_writes": self.logged_writes, "acked_writes": self.acked_writes,
                "t_star_ns": self.t_star_ns, "t_star_write": self.t_star_write,
                "required_writes": self.required_writes,
                "missing_acked_before_check": self.missing_acked_before_check,
                "check_ns": self.check_ns, "data_exposure_s": self.data_exposure_s,
                "by_kind": self.by_kind, "ranges": [r.as_dict() for r in self.ranges],
                "ranges_total": self.ranges_total}

    def summary(self) -> str:
        head = "CONSISTENT" if self.consistent else f"INCONSISTENT: {self.violation_count} violation(s)"
        lines = [f"{head}: {self.shown_writes} writes shown on {self.stamped_blocks} of {self.blocks} blocks; "
                 f"{self.logged_writes} writes logged, {self.required_writes} acknowledged before the cut"]
        if self.data_exposure_s is not None:
            lines.append(f"data exposure {self.data_exposure_s:.3f} s ({self.missing_acked_before_check} "
                         "acknowledged writes not in the copy)")
        if self.ranges:
            lines.append(f"  by kind: {', '.join(f'{k} {n}' for k, n in sorted(self.by_kind.items()))}; "
                         f"{self.ranges_total} LBA range(s):")
            shown = self.ranges[:max(len(self.violations), 1)]
            lines += [f"  {r.line()}" for r in shown]
            if self.ranges_total > len(shown):
                lines.append(f"  ... {self.ranges_total - len(shown)} more range(s) (--json lists {len(self.ranges)})")
        else:
            for v in self.violations:
                lines.append(f"  {v.kind}: {v.volume} lba {v.lba}: {v.message}")
        return "\n".join(lines)


class _Recorder:
    def __init__(self, limit: int, result: CheckResult) -> None:
        self.limit = limit
        self.result = result
        self._lbas: dict[tuple[str, str], array] = {}  # (kind, volume): every violating LBA, 8 bytes each
        self._first: dict[tuple[str, str, int], str] = {}  # a message per (kind, volume, lba), for the ranges

    def add(self, v: Violation) -> None:
        self.result.consistent = False
        self.result.violation_count += 1
        self.result.by_kind[v.kind] = self.result.by_kind.get(v.kind, 0) + 1
        self._lbas.setdefault((v.kind, v.volume), array("q")).append(v.lba)
        if len(self._first) < 4 * MAX_RANGES:
            self._first.setdefault((v.kind, v.volume, v.lba), v.message)
        if len(self.result.violations) < self.limit:
            self.result.violations.append(v)

    def group(self) -> None:
        """Consecutive LBAs of one kind on one volume become one ViolationRange."""
        out: list[ViolationRange] = []
        total = 0
        for (kind, volume), lbas in sorted(self._lbas.items()):
            run: list[int] = []  # first lba, last lba, count
            for lba in sorted(set(lbas)):
                if run and lba - run[1] <= MERGE_GAP_BLOCKS:
                    run[1] = lba
                    run[2] += 1
                    continue
                if run:
                    total += 1
                    if len(out) < MAX_RANGES:
                        out.append(self._range(kind, volume, run))
                run = [lba, lba, 1]
            if run:
                total += 1
                if len(out) < MAX_RANGES:
                    out.append(self._range(kind, volume, run))
        self.result.ranges = out
        self.result.ranges_total = total

    def _range(self, kind: str, volume: str, run: list[int]) -> ViolationRange:
        first, last, count = run
        return ViolationRange(kind, volume, first, last, count, self._first.get((kind, volume, first), ""))


async def decode_copy(devices: list[BlockDevice], names: list[str], rec: _Recorder) -> tuple[list[array], dict[int, tuple[int, int, stamp.Stamp]]]:
    """shown[v][lba] = write id (0: nothing); and the first place each id is seen."""
    shown: list[array] = []
    seen: dict[int, tuple[int, int, stamp.Stamp]] = {}
    for v, dev in enumerate(devices):
        bs = dev.info.block_size
        n = dev.info.num_blocks
        ids = array("Q", bytes(8 * n))
        step = max(1, READ_CHUNK_BYTES // bs)
        zero_chunk = bytes(step * bs)
        for start in range(0, n, step):
            count = min(step, n - start)
            data = await dev.read(start, count)
            if data == zero_chunk[: count * bs]:
                continue
            mv = memoryview(data)
            for i in range(count):
                block = mv[i * bs:(i + 1) * bs]
                if block[:4] != stamp.MAGIC:
                    if any(block):
                        rec.add(Violation("foreign-data", names[v], start + i, None, None,
                                          "block holds data that is not a replay stamp"))
                    continue
                lba = start + i
                try:
                    s = stamp.decode(block)
                except stamp.StampError as e:
                    rec.add(Violation("corrupt", names[v], lba, None, None, str(e)))
                    continue
                if s.volume_id != v or s.lba != lba:
                    rec.add(Violation("misplaced", names[v], lba, s.write_id, None,
                                      f"stamp of write {s.write_id} belongs to volume {s.volume_id} lba {s.lba}"))
                    continue
                ids[lba] = s.write_id
                seen.setdefault(s.write_id, (v, lba, s))
        shown.append(ids)
    return shown, seen


WriteLog = Sequence[WriteRecord] | ReplayLog  # iterable again and again, each time from the first write


def _reiterable(writes: Iterable[WriteRecord], what: str) -> Iterable[WriteRecord]:
    """``writes`` itself, unless it is a one-shot iterator: the check reads the
    log twice, and a generator would be empty the second time, so every write
    would go unjudged and a broken copy would pass."""
    if isinstance(writes, Iterator):
        raise TypeError(f"check_copy: {what} is a one-shot iterator ({type(writes).__name__}) but the check reads "
                        "the writes twice; pass a list, tuple or ReplayLog")
    if not isinstance(writes, Iterable):
        raise TypeError(f"check_copy: {what} must be a list, tuple or ReplayLog of writes, not {type(writes).__name__}")
    return writes


async def check_copy(devices: list[BlockDevice], writes: WriteLog | Callable[[], WriteLog], *,
                     names: list[str] | None = None,
                     check_ns: int | None = None, max_violations: int = 10) -> CheckResult:
    """Decide whether ``devices`` (one per session volume, in log order) hold a
    consistent cut of ``writes``. ``writes`` is read twice, so it must be a
    sequence or a ReplayLog; a one-shot iterator (a generator) raises
    TypeError. ``check_ns``: when the copy was taken, on the same clock, for
    the data exposure; default the last acknowledgement in the log. A
    callable ``writes`` is called once, after the copy has been read: a
    replay still running can hand over its history as of that moment (what
    it returns must be re-iterable too)."""
    if not callable(writes):
        _reiterable(writes, "writes")
    names = names or [f"vol{i}" for i in range(len(devices))]
    result = CheckResult()
    rec = _Recorder(max_violations, result)
    result.blocks = sum(d.info.num_blocks for d in devices)
    shown, seen = await decode_copy(devices, names, rec)
    if callable(writes):
        writes = _reiterable(writes(), "what writes() returned")
    result.stamped_blocks = sum(1 for ids in shown for x in ids if x)
    result.shown_writes = len(seen)
    max_shown = max(seen, default=NOTHING)

    # Pass 1 over the log: T*, and the shown stamps against what was logged.
    found: set[int] = set()
    last_ack = 0
    for w in writes:
        result.logged_writes += 1
        if w.ack_ns is not None:
            result.acked_writes += 1
            last_ack = max(last_ack, w.ack_ns)
        if w.write_id in seen:
            found.add(w.write_id)
            v, lba, s = seen[w.write_id]
            if v != w.volume or s.lba - s.index != w.lba or s.nblocks != w.nblocks:
                rec.add(Violation("misplaced", names[v], lba, w.write_id, None,
                                  f"stamp says write {w.write_id} is blocks {s.lba - s.index}+{s.nblocks} of volume "
                                  f"{v}; the log says {w.lba}+{w.nblocks} of volume {w.volume}"))
            if w.write_id == max_shown:
                result.t_star_ns = w.issue_ns
                result.t_star_write = w.write_id
    for wid in seen.keys() - found:
        v, lba, _s = seen[wid]
        rec.add(Violation("unknown-write", names[v], lba, wid, None,
                          f"shows write {wid}, which the replay log does not have (stale image from another run?)"))
    t_star = result.t_star_ns if result.t_star_ns is not None else -1
    where = seen.get(max_shown)
    cut_desc = (f"write {max_shown} (issued at T*, shown at {names[where[0]]} lba {where[1]})" if where else "")

    # Pass 2: every logged write newer than what its blocks show must be neither required nor shown.
    check_ns = check_ns if check_ns is not None else last_ack
    result.check_ns = check_ns
    for w in writes:
        acked = w.ack_ns is not None
        required = acked and w.ack_ns < t_star
        if required:
            result.required_writes += 1
        in_cut = w.write_id in seen
        if acked and not in_cut and not required and w.ack_ns <= check_ns:
            result.missing_acked_before_check += 1
        if not (required or in_cut):
            continue
        ids = shown[w.volume] if w.volume < len(shown) else None
        if ids is None:
            continue
        for lba in range(w.lba, min(w.lba + w.nblocks, len(ids))):
            s = ids[lba]
            if s >= w.write_id:
                continue
            shows = f"write {s}" if s else "nothing"
            if in_cut:
                v0, lba0, _ = seen[w.write_id]
                rec.add(Violation("torn-write", names[w.volume], lba, s or None, w.write_id,
                                  f"shows {shows}, lacks write {w.write_id} which the copy shows at "
                                  f"{names[v0]} lba {lba0} (a write cut in part)"))
            else:
                rec.add(Violation("stale-block" if s else "lost-write", names[w.volume], lba, s or None, w.write_id,
                                  f"shows {shows}, lacks write {w.write_id} acknowledged "
                                  f"{(t_star - w.ack_ns) / 1e6:.3f} ms before the cut's {cut_desc}"))
            break  # one report per write is enough to explain it
    if result.t_star_ns is not None and check_ns:
        result.data_exposure_s = max(0, check_ns - result.t_star_ns) / 1e9
    rec.group()
    return result
