"""The replayer (the testbench's driver and monitor): plays a trace into block
devices, stamping every written block, and records every write's issue and
acknowledgement times.

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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from hal.block import BlockDevice
from testbench import stamp
from testbench.errors import ReplayError
from testbench.replaylog import LogVolumeInfo, ReplayLogWriter, WriteRecord
from testbench.traces import IoRecord, VolumeGeometry, VolumeMap

log = logging.getLogger(__name__)

PreIssueHook = Callable[[int], Awaitable[None]]


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


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[i])


@dataclass
class ReplayResult:
    ios: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    trims_skipped: int = 0
    errors: int = 0
    bytes_written: int = 0
    blocks_written: int = 0
    elapsed_s: float = 0.0
    recorded_duration_s: float = 0.0
    speed: float | None = None
    lateness_ms: dict = field(default_factory=dict)  # p50, p99, max (timed replay only)
    write_latency_ms: dict = field(default_factory=dict)  # p50, p99, max
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


def _stats_ms(values_ns: list[int]) -> dict:
    if not values_ns:
        return {}
    s = sorted(values_ns)
    return {"p50": percentile(s, 0.5) / 1e6, "p99": percentile(s, 0.99) / 1e6, "max": s[-1] / 1e6, "count": len(s)}


class Replayer:
    """Replays records into ``targets`` (one BlockDevice per session volume).

    ``pre_issue(write_id)`` is awaited before each write is issued; the demo
    uses it to check the remote copy between writes. ``history`` (when
    ``keep_history``) holds every write record, in-flight ones with
    ``ack_ns=None``, for checking while the replay runs.
    """

    def __init__(self, targets: list[BlockDevice], log_path: str | None = None, *, timing: str = "afap",
                 queue_depth: int = 16, replay_time_scale: float | None = None, replay_no_stall: bool = False,
                 replay_redirect: str | None = None, volume_names: list[str] | None = None,
                 pre_issue: PreIssueHook | None = None, progress: bool = False, total: int | None = None,
                 keep_history: bool = False, max_io_bytes: int = 8 << 20, trace_name: str = "",
                 stop_on_error: bool = True) -> None:
        if not targets:
            raise ReplayError("replay needs at least one target volume")
        if queue_depth < 1:
            raise ReplayError(f"queue depth {queue_depth} must be at least 1")
        self.targets = targets
        self.names = volume_names or [f"vol{i}" for i in range(len(targets))]
        if len(self.names) != len(targets):
            raise ReplayError("one volume name per target")
        if replay_redirect is not None and replay_redirect not in self.names:
            raise ReplayError(f"replay_redirect {replay_redirect!r} is not a volume ({', '.join(self.names)})")
        self.speed = parse_timing(timing, replay_time_scale=replay_time_scale, replay_no_stall=replay_no_stall)
        self.queue_depth = queue_depth
        self.redirect = replay_redirect
        self.log_path = log_path
        self.pre_issue = pre_issue
        self.progress = progress
        self.total = total
        self.keep_history = keep_history
        self.history: list[WriteRecord] = []
        self.max_io_bytes = max_io_bytes
        self.trace_name = trace_name
        self.stop_on_error = stop_on_error
        self.geometry = [VolumeGeometry(n, t.info.size_bytes, t.info.block_size) for n, t in zip(self.names, targets, strict=False)]
        self.start_mono_ns = 0
        self.in_flight: dict[int, WriteRecord] = {}
        self._stop = False

    def stop(self) -> None:
        """Stop issuing; in-flight I/O completes and the log is closed."""
        self._stop = True

    def mapping_for(self, devices: Iterable[str]) -> VolumeMap:
        if self.redirect is not None:
            target = [g for g in self.geometry if g.name == self.redirect]
            return VolumeMap(devices, target, max_io_bytes=self.max_io_bytes)
        return VolumeMap(devices, self.geometry, max_io_bytes=self.max_io_bytes)

    async def run(self, records: Iterable[IoRecord], devices: Iterable[str] = ()) -> ReplayResult:
        vmap = self.mapping_for(devices)
        volume_index = ({0: self.names.index(self.redirect)} if self.redirect is not None else None)
        res = ReplayResult(speed=self.speed, log_path=self.log_path, mapping=vmap.describe())
        log.info("%s", res.mapping)
        sem = asyncio.Semaphore(self.queue_depth)
        busy: dict[tuple[int, int], asyncio.Future] = {}  # (volume, lba) -> completion of the write holding it
        tasks: set[asyncio.Task] = set()
        lateness: list[int] = []
        write_lat: list[int] = []
        failure: list[BaseException] = []
        self.start_mono_ns = start = time.monotonic_ns()
        writer = None
        if self.log_path:
            writer = ReplayLogWriter(self.log_path, [LogVolumeInfo(n, t.info.block_size, t.info.num_blocks)
                                                     for n, t in zip(self.names, self.targets, strict=False)],
                                     start_mono_ns=start, start_wall_ns=time.time_ns(), trace=self.trace_name)
        bar = None
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total, unit="io", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        next_id = 1
        t0 = None
        last_ts = 0

        async def do_write(dev: BlockDevice, w: WriteRecord, data: bytes, done: asyncio.Future) -> None:
            try:
                await dev.write(w.lba, data)
                w.ack_ns = time.monotonic_ns()
                write_lat.append(w.ack_ns - w.issue_ns)
            except Exception as e:  # noqa: BLE001 - recorded, reported, and stops the replay
                w.failed = True
                res.errors += 1
                failure.append(e)
                log.error("write %d to %s lba %d failed: %s", w.write_id, self.names[w.volume], w.lba, e)
            finally:
                self.in_flight.pop(w.write_id, None)
                if writer:
                    writer.append(w)
                if not done.done():
                    done.set_result(None)
                sem.release()

        async def do_other(coro: Awaitable) -> None:
            try:
                await coro
            except Exception as e:  # noqa: BLE001
                res.errors += 1
                failure.append(e)
                log.error("I/O failed: %s", e)
            finally:
                sem.release()

        try:
            for rec in records:
                if self._stop or (failure and self.stop_on_error):
                    break
                if rec.op == "T":
                    res.trims_skipped += 1
                    continue
                if t0 is None:
                    t0 = rec.ts_ns
                last_ts = max(last_ts, rec.ts_ns)
                m = vmap.map(rec)
                v = volume_index[m.volume] if volume_index is not None else m.volume
                dev = self.targets[v]
                deadline = None
                if self.speed is not None:
                    deadline = start + int(max(0, rec.ts_ns - t0) / self.speed)
                    delay = deadline - time.monotonic_ns()
                    if delay > 0:
                        await asyncio.sleep(delay / 1e9)
                await sem.acquire()
                if self._stop or (failure and self.stop_on_error):  # failed while we waited for a slot
                    sem.release()
                    break
                if m.op == "W":
                    keys = [(v, b) for b in range(m.lba, m.lba + m.nblocks)]
                    waits = {id(f): f for k in keys if (f := busy.get(k)) is not None}
                    if waits:
                        await asyncio.gather(*waits.values())
                    if self.pre_issue is not None:
                        await self.pre_issue(next_id)
                    data = stamp.encode(next_id, v, m.lba, m.nblocks, dev.info.block_size)
                    done: asyncio.Future = asyncio.get_running_loop().create_future()
                    for k in keys:
                        busy[k] = done
                    done.add_done_callback(lambda _f, keys=keys, done=done: [busy.pop(k) for k in keys if busy.get(k) is done])
                    now = time.monotonic_ns()
                    w = WriteRecord(next_id, v, m.lba, m.nblocks, now, None)
                    next_id += 1
                    self.in_flight[w.write_id] = w
                    if self.keep_history:
                        self.history.append(w)
                    res.writes += 1
                    res.bytes_written += len(data)
                    res.blocks_written += m.nblocks
                    task = asyncio.ensure_future(do_write(dev, w, data, done))
                else:
                    now = time.monotonic_ns()
                    if m.op == "R":
                        res.reads += 1
                        task = asyncio.ensure_future(do_other(dev.read(m.lba, m.nblocks)))
                    else:
                        res.flushes += 1
                        task = asyncio.ensure_future(do_other(dev.flush()))
                if deadline is not None:
                    lateness.append(max(0, now - deadline))
                res.ios += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if bar is not None:
                    bar.update(1)
            if tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            if writer:
                for w in list(self.in_flight.values()):  # cancelled mid-write: never acknowledged
                    writer.append(w)
                writer.close()
            if bar is not None:
                bar.close()
        res.elapsed_s = (time.monotonic_ns() - start) / 1e9
        res.recorded_duration_s = (last_ts - t0) / 1e9 if t0 is not None else 0.0
        res.lateness_ms = _stats_ms(lateness)
        res.write_latency_ms = _stats_ms(write_lat)
        res.write_latencies_ms = [x / 1e6 for x in write_lat]
        if failure and self.stop_on_error:
            raise ReplayError(f"replay stopped after an I/O error: {failure[0]}") from failure[0]
        return res
