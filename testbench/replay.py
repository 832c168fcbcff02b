"""The replayer: plays a trace into block devices, stamping every written
block, and records every write's issue and acknowledgement times.

Roles (after cocotb; ``Replayer`` wires them for one run):
- ``TraceDriver`` drives the trace into the targets: timing (``Pacer``),
  volume mapping, overlap order (``BlockOrder``), stamping and issuing, at
  most ``queue_depth`` I/Os in flight;
- ``WriteMonitor`` records what happened: issue and ack of every write (the
  write history, the reference model the checker judges a copy against),
  the replay log, latency and lateness samples, the ReplayResult counters
  and the progress bar.

Timing: ``afap`` issues as fast as the queue depth allows; ``original``
issues each I/O at its trace time; ``scale=X`` at X times the original speed
(fio's ``replay_time_scale`` is the same thing in percent: 200 = scale=2;
``replay_no_stall`` = afap). Timed replay schedules every I/O against an
absolute deadline (start + trace offset / speed), so lateness never
accumulates the way a chain of relative sleeps does; lateness is measured and
reported per I/O.

Ordering: a write waits for any in-flight write to an overlapping block
before it is issued (as a host file system would), so the writes to each
block are totally ordered and each is acknowledged before the next is
issued. Write ids increase in issue order. Trims are not replayed (counted):
a discarded block reads back undefined, which no stamp can judge.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from hal.block import BlockDevice
from testbench import stamp, stats
from testbench.errors import ReplayError
from testbench.replaylog import LogVolumeInfo, ReplayLogWriter, WriteRecord
from testbench.traces import IoRecord, MappedIo, VolumeGeometry, VolumeMap

log = logging.getLogger(__name__)

PreIssueHook = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay (the driver) and what to keep (the monitor)."""

    timing: str = "afap"  # afap | original | scale=X
    queue_depth: int = 16
    replay_time_scale: float | None = None  # fio's, in percent; overrides timing
    replay_no_stall: bool = False  # fio's: as fast as possible, whatever timing says
    replay_redirect: str | None = None  # fio's: every trace device onto this one volume (by name)
    max_io_bytes: int = 8 << 20  # the volume map caps longer trace I/Os at this
    stop_on_error: bool = True  # a failed I/O stops the replay and run() raises ReplayError; else it goes on
    keep_history: bool = False  # keep every write's record in memory (Replayer.history)
    trace_name: str = ""  # for the replay log's header
    progress: bool = False  # a progress bar on stderr, when it is a terminal
    total: int | None = None  # I/Os to expect, for the progress bar's ETA


def parse_timing(timing: str, *, replay_time_scale: float | None = None, replay_no_stall: bool = False) -> float | None:
    """Speed factor for timed replay, or None for as fast as possible."""
    if replay_no_stall:
        return None
    if replay_time_scale is not None:
        if replay_time_scale <= 0:
            raise ReplayError(f"replay_time_scale {replay_time_scale} must be positive (percent; 100 = original)")
        return replay_time_scale / 100.0
    if timing == "afap":
        return None
    if timing == "original":
        return 1.0
    if timing.startswith("scale="):
        try:
            speed = float(timing[6:])
        except ValueError:
            speed = -1.0
        if not speed > 0:
            raise ReplayError(f"timing {timing!r}: scale must be a positive number (2 = twice as fast)")
        return speed
    raise ReplayError(f"timing {timing!r}: use afap, original or scale=X")


@dataclass
class ReplayResult:
    ios: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    trims_skipped: int = 0
    errors: int = 0
    bytes_written: int = 0
    elapsed_s: float = 0.0
    recorded_duration_s: float = 0.0
    speed: float | None = None
    # testbench.stats summaries (p50, p99, max, count); {} when nothing was measured (lateness: afap replay)
    lateness_ms: dict = field(default_factory=dict)
    write_latency_ms: dict = field(default_factory=dict)
    log_path: str | None = None
    mapping: str = ""
    write_latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def achieved_iops(self) -> float:
        return self.ios / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def recorded_iops(self) -> float:
        return self.ios / self.recorded_duration_s if self.recorded_duration_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "ios": self.ios, "reads": self.reads, "writes": self.writes, "flushes": self.flushes,
            "trims_skipped": self.trims_skipped, "errors": self.errors, "bytes_written": self.bytes_written,
            "elapsed_s": round(self.elapsed_s, 3), "recorded_duration_s": round(self.recorded_duration_s, 3),
            "speed": self.speed, "achieved_iops": round(self.achieved_iops, 1),
            "recorded_iops": round(self.recorded_iops, 1), "lateness_ms": self.lateness_ms,
            "write_latency_ms": self.write_latency_ms, "log": self.log_path,
        }

    def summary(self) -> str:
        lines = [f"replayed {self.ios} I/Os ({self.writes} writes, {self.reads} reads, {self.flushes} flushes; "
                 f"{self.trims_skipped} trims skipped, {self.errors} errors) in {self.elapsed_s:.2f} s",
                 f"IOPS achieved {self.achieved_iops:.0f} vs recorded {self.recorded_iops:.0f}"
                 + (f" (speed x{self.speed:g})" if self.speed else " (as fast as possible)")]
        if self.lateness_ms:
            lat = self.lateness_ms
            lines.append(f"lateness ms: p50 {lat['p50']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}")
        if self.write_latency_ms:
            wl = self.write_latency_ms
            lines.append(f"write latency ms: p50 {wl['p50']:.3f}  p99 {wl['p99']:.3f}  max {wl['max']:.3f}")
        if self.log_path:
            lines.append(f"replay log: {self.log_path}")
        return "\n".join(lines)




class Pacer:
    """Timing: each record's absolute deadline (start + offset from the first
    record / speed), or None as fast as possible; and the trace span seen."""

    def __init__(self, speed: float | None, start_ns: int) -> None:
        self.speed = speed
        self.start_ns = start_ns
        self.first_ts_ns: int | None = None
        self.last_ts_ns = 0

    def deadline(self, ts_ns: int) -> int | None:
        if self.first_ts_ns is None:
            self.first_ts_ns = ts_ns
        self.last_ts_ns = max(self.last_ts_ns, ts_ns)
        if self.speed is None:
            return None
        return self.start_ns + int(max(0, ts_ns - self.first_ts_ns) / self.speed)

    @staticmethod
    async def wait_until(deadline_ns: int) -> None:
        delay = deadline_ns - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)

    @property
    def recorded_duration_s(self) -> float:
        return (self.last_ts_ns - self.first_ts_ns) / 1e9 if self.first_ts_ns is not None else 0.0


class BlockOrder:
    """Overlap order: a write waits for the in-flight writes to any of its blocks."""

    def __init__(self) -> None:
        self._busy: dict[tuple[int, int], asyncio.Future] = {}  # (volume, lba) -> completion of the write holding it

    async def wait(self, blocks: list[tuple[int, int]]) -> None:
        waits = {id(f): f for k in blocks if (f := self._busy.get(k)) is not None}
        if waits:
            await asyncio.gather(*waits.values())

    def hold(self, blocks: list[tuple[int, int]]) -> asyncio.Future:
        """Mark ``blocks`` busy until the returned future is resolved."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        for k in blocks:
            self._busy[k] = done

        def release(_f: asyncio.Future) -> None:
            for k in blocks:
                if self._busy.get(k) is done:
                    del self._busy[k]

        done.add_done_callback(release)
        return done


class WriteMonitor:
    """Records every I/O the driver issues and how it ended: issue and ack times
    of writes (``history``, when kept, holds in-flight ones with
    ``ack_ns=None``), the replay log, latency and lateness samples, the
    ReplayResult counters and the progress bar."""

    def __init__(self, result: ReplayResult, volumes: list[LogVolumeInfo], options: ReplayOptions, *,
                 log_path: str | None, start_mono_ns: int) -> None:
        self.result = result
        self.names = [v.name for v in volumes]
        self.keep_history = options.keep_history
        self.history: list[WriteRecord] = []
        self.in_flight: dict[int, WriteRecord] = {}
        self.failures: list[BaseException] = []
        self.lateness_ns: list[int] = []
        self.write_latency_ns: list[int] = []
        self._log = (ReplayLogWriter(log_path, volumes, start_mono_ns=start_mono_ns, start_wall_ns=time.time_ns(),
                                     trace=options.trace_name) if log_path else None)
        self._bar = None
        if options.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=options.total, unit="io", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def trim_skipped(self) -> None:
        self.result.trims_skipped += 1

    def write_issued(self, write_id: int, volume: int, m: MappedIo, nbytes: int, deadline_ns: int | None) -> WriteRecord:
        """The write goes now: its record (issue time, not yet acknowledged)."""
        w = WriteRecord(write_id, volume, m.lba, m.nblocks, time.monotonic_ns(), None)
        self.in_flight[w.write_id] = w
        if self.keep_history:
            self.history.append(w)
        self.result.writes += 1
        self.result.bytes_written += nbytes
        self._issued(w.issue_ns, deadline_ns)
        return w

    def other_issued(self, op: str, deadline_ns: int | None) -> None:
        """A read ("R") or a flush goes now."""
        if op == "R":
            self.result.reads += 1
        else:
            self.result.flushes += 1
        self._issued(time.monotonic_ns(), deadline_ns)

    def _issued(self, now_ns: int, deadline_ns: int | None) -> None:
        if deadline_ns is not None:
            self.lateness_ns.append(max(0, now_ns - deadline_ns))
        self.result.ios += 1
        if self._bar is not None:
            self._bar.update(1)

    def write_acked(self, w: WriteRecord) -> None:
        w.ack_ns = time.monotonic_ns()
        self.write_latency_ns.append(w.ack_ns - w.issue_ns)

    def write_failed(self, w: WriteRecord, error: Exception) -> None:
        w.failed = True
        self._failed(error)
        log.error("write %d to %s lba %d failed: %s", w.write_id, self.names[w.volume], w.lba, error)

    def other_failed(self, error: Exception) -> None:
        self._failed(error)
        log.error("I/O failed: %s", error)

    def _failed(self, error: Exception) -> None:
        self.result.errors += 1
        self.failures.append(error)

    def write_ended(self, w: WriteRecord) -> None:
        """Acknowledged, failed or cancelled: no longer in flight; logged."""
        self.in_flight.pop(w.write_id, None)
        if self._log:
            self._log.append(w)

    def close(self) -> None:
        """Log the writes still in flight (cancelled before they ran: never
        acknowledged), close the log and the bar."""
        if self._log:
            for w in list(self.in_flight.values()):
                self._log.append(w)
            self._log.close()
        if self._bar is not None:
            self._bar.close()

    def summarise(self) -> None:
        self.result.lateness_ms = _summary_ms(self.lateness_ns)
        self.result.write_latency_ms = _summary_ms(self.write_latency_ns)
        self.result.write_latencies_ms = [x / 1e6 for x in self.write_latency_ns]


def _summary_ms(values_ns: list[int]) -> dict:
    return stats.summary(x / 1e6 for x in values_ns) if values_ns else {}


class TraceDriver:
    """Drives trace records into the targets: paces them, maps them onto the
    volumes, keeps overlapping writes in order, stamps every written block and
    issues the I/O with at most ``queue_depth`` in flight. The monitor hears
    of every issue and completion; ``pre_issue(write_id)`` is awaited before
    each write is stamped and issued. One ``drive`` at a time."""

    def __init__(self, targets: list[BlockDevice], *, queue_depth: int, pre_issue: PreIssueHook | None = None,
                 stop_on_error: bool = True) -> None:
        self.targets = targets
        self.queue_depth = queue_depth
        self.pre_issue = pre_issue
        self.stop_on_error = stop_on_error
        self._stopping = False
        self._next_id = 1
        # the current drive's
        self._slots = asyncio.Semaphore(queue_depth)
        self._order = BlockOrder()
        self._monitor: WriteMonitor | None = None

    def stop(self) -> None:
        self._stopping = True

    def _should_stop(self, monitor: WriteMonitor) -> bool:
        return self._stopping or bool(monitor.failures and self.stop_on_error)

    async def drive(self, records: Iterable[IoRecord], vmap: VolumeMap, target_of: Sequence[int], pacer: Pacer,
                    monitor: WriteMonitor) -> None:
        """Issue ``records`` and wait for the last to complete. ``target_of``:
        the target index of each of the map's volumes."""
        self._slots = asyncio.Semaphore(self.queue_depth)
        self._order = BlockOrder()
        self._monitor = monitor
        tasks: set[asyncio.Task] = set()
        try:
            for rec in records:
                if self._should_stop(monitor):
                    break
                if rec.op == "T":
                    monitor.trim_skipped()
                    continue
                deadline = pacer.deadline(rec.ts_ns)
                m = vmap.map(rec)
                v = target_of[m.volume]
                if deadline is not None:
                    await pacer.wait_until(deadline)
                await self._slots.acquire()
                if self._should_stop(monitor):  # failed while we waited for a slot
                    self._slots.release()
                    break
                if m.op == "W":
                    task = await self._issue_write(v, m, deadline)
                else:
                    task = self._issue_other(v, m, deadline)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)

    async def _issue_write(self, v: int, m: MappedIo, deadline: int | None) -> asyncio.Task:
        blocks = [(v, b) for b in range(m.lba, m.lba + m.nblocks)]
        await self._order.wait(blocks)
        write_id = self._next_id
        if self.pre_issue is not None:
            await self.pre_issue(write_id)
        dev = self.targets[v]
        data = stamp.encode(write_id, v, m.lba, m.nblocks, dev.info.block_size)
        done = self._order.hold(blocks)
        w = self._monitor.write_issued(write_id, v, m, len(data), deadline)
        self._next_id += 1
        return asyncio.ensure_future(self._write(dev, w, data, done))

    def _issue_other(self, v: int, m: MappedIo, deadline: int | None) -> asyncio.Task:
        dev = self.targets[v]
        self._monitor.other_issued(m.op, deadline)
        return asyncio.ensure_future(self._other(dev.read(m.lba, m.nblocks) if m.op == "R" else dev.flush()))

    async def _write(self, dev: BlockDevice, w: WriteRecord, data: bytes, done: asyncio.Future) -> None:
        try:
            await dev.write(w.lba, data)
            self._monitor.write_acked(w)
        except Exception as e:  # noqa: BLE001 - recorded, reported, and stops the replay
            self._monitor.write_failed(w, e)
        finally:
            self._monitor.write_ended(w)
            if not done.done():
                done.set_result(None)
            self._slots.release()

    async def _other(self, io: Awaitable) -> None:
        try:
            await io
        except Exception as e:  # noqa: BLE001 - recorded, reported, and stops the replay
            self._monitor.other_failed(e)
        finally:
            self._slots.release()


class Replayer:
    """Replays records into ``targets`` (one BlockDevice per session volume):
    a TraceDriver and a WriteMonitor wired for each ``run``.

    ``pre_issue(write_id)`` is awaited before each write is issued; the demo
    uses it to check the remote copy between writes. ``history`` (when
    ``options.keep_history``) holds every write record, in-flight ones with
    ``ack_ns=None``, for checking while the replay runs.
    """

    def __init__(self, targets: list[BlockDevice], log_path: str | None = None, options: ReplayOptions | None = None,
                 *, volume_names: list[str] | None = None, pre_issue: PreIssueHook | None = None) -> None:
        opts = options or ReplayOptions()
        if not targets:
            raise ReplayError("replay needs at least one target volume")
        if opts.queue_depth < 1:
            raise ReplayError(f"queue depth {opts.queue_depth} must be at least 1")
        self.targets = targets
        self.names = volume_names or [f"vol{i}" for i in range(len(targets))]
        if len(self.names) != len(targets):
            raise ReplayError("one volume name per target")
        if opts.replay_redirect is not None and opts.replay_redirect not in self.names:
            raise ReplayError(f"replay_redirect {opts.replay_redirect!r} is not a volume ({', '.join(self.names)})")
        self.options = opts
        self.speed = parse_timing(opts.timing, replay_time_scale=opts.replay_time_scale,
                                  replay_no_stall=opts.replay_no_stall)
        self.log_path = log_path
        self.geometry = [VolumeGeometry(n, t.info.size_bytes, t.info.block_size)
                         for n, t in zip(self.names, targets, strict=True)]
        self.driver = TraceDriver(targets, queue_depth=opts.queue_depth, pre_issue=pre_issue,
                                  stop_on_error=opts.stop_on_error)
        self.monitor: WriteMonitor | None = None  # the current (or last) run's
        self.start_mono_ns = 0

    @property
    def history(self) -> list[WriteRecord]:
        return self.monitor.history if self.monitor is not None else []

    def stop(self) -> None:
        """Stop issuing; in-flight I/O completes and the log is closed."""
        self.driver.stop()

    def mapping_for(self, devices: Iterable[str]) -> VolumeMap:
        if self.options.replay_redirect is not None:
            target = [g for g in self.geometry if g.name == self.options.replay_redirect]
            return VolumeMap(devices, target, max_io_bytes=self.options.max_io_bytes)
        return VolumeMap(devices, self.geometry, max_io_bytes=self.options.max_io_bytes)

    async def run(self, records: Iterable[IoRecord], devices: Iterable[str] = ()) -> ReplayResult:
        vmap = self.mapping_for(devices)
        redirect = self.options.replay_redirect
        target_of = [self.names.index(redirect)] if redirect is not None else range(len(self.targets))
        res = ReplayResult(speed=self.speed, log_path=self.log_path, mapping=vmap.describe())
        log.info("%s", res.mapping)
        volumes = [LogVolumeInfo(n, t.info.block_size, t.info.num_blocks) for n, t in zip(self.names, self.targets,
                                                                                           strict=True)]
        self.start_mono_ns = start = time.monotonic_ns()
        monitor = self.monitor = WriteMonitor(res, volumes, self.options, log_path=self.log_path, start_mono_ns=start)
        pacer = Pacer(self.speed, start)
        try:
            await self.driver.drive(records, vmap, target_of, pacer, monitor)
        finally:
            monitor.close()
        res.elapsed_s = (time.monotonic_ns() - start) / 1e9
        res.recorded_duration_s = pacer.recorded_duration_s
        monitor.summarise()
        if monitor.failures and self.options.stop_on_error:
            raise ReplayError(f"replay stopped after an I/O error: {monitor.failures[0]}") from monitor.failures[0]
        return res
