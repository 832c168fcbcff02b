"""The demo's core: replay a trace into the primaries while checking the
secondaries' consistent copies again and again, then report.

``mirrorfw demo`` (testbench/cli_demo.py) starts the controllers and calls
``replay_and_check`` with their NBD URLs. Checks run in a background task
every ``check_every_s`` seconds while the replay keeps going. Each check asks
``take_copy(n)`` for one copy of every volume at one CG (an async context
manager yielding one URL per primary volume, e.g. ``nbd://…/vol0@check-3``
of a snapshot on the secondary's console, dropped when the context exits),
opens fresh devices on those URLs, judges them against the replay history
as of the end of the read (one T* across all volumes), and closes them.
Nothing pauses CG formation for the read: a snapshot is a point in time
while CGs keep committing.

A fixed ``copy_urls`` list instead of ``take_copy`` is read as is at every
check (fresh devices each time): right for a copy nothing changes during
the read (files after the replay, say). An NBD connection to a secondary's
C reads the CG committed when it opened, so two volumes opened by two
connections may be at two CGs; only a snapshot is one CG across volumes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import operator
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

from drivers import open_device
from testbench.checker import check_copy
from testbench.replay import Replayer, ReplayOptions
from testbench.replaylog import WriteRecord
from testbench.report import Fidelity, RunReport
from testbench.traces import IoRecord, read_trace, scan

log = logging.getLogger(__name__)

AsyncHook = Callable[[], Awaitable[None]]
CopyHook = Callable[[int], AbstractAsyncContextManager[list[str]]]

STRIPE_BYTES = 1 << 20
HISTORY_TIMEOUT_S = 60.0  # a replay loop that does not answer for this long has gone
HISTORY_ROW = operator.attrgetter("write_id", "volume", "lba", "nblocks", "issue_ns", "ack_ns", "failed")


class CopyUrls(list):
    """What ``take_copy`` may yield: the URLs, and the CG they show (kept in
    the check's report entry)."""

    def __init__(self, urls, cg: int | None = None) -> None:
        super().__init__(urls)
        self.cg = cg


def stripe_devices(records: Iterable[IoRecord], ways: int, stripe_bytes: int = STRIPE_BYTES) -> Iterator[IoRecord]:
    """Each trace device split into ``ways`` devices ``DEV#00``, ``DEV#01``…
    by offset stripe (``offset // stripe_bytes % ways``), every record kept
    whole, in order and at its offset: how a trace of 2 devices spreads over
    the volumes of 3 controllers. Sorted, a device's parts stay together, so
    the replayer's round-robin deal (testbench.traces.VolumeMap) gives part k
    of every device to the k-th volume of each group of ``ways``."""
    if ways <= 1:
        yield from records
        return
    for rec in records:
        part = (rec.offset_bytes // stripe_bytes) % ways
        yield replace(rec, device=f"{rec.device}#{part:02d}")


def _write_samples(history, start_ns: int, block_sizes: list[int]) -> list[tuple[float, float | None, int]]:
    """(issue s since the replay start, latency ms or None, bytes) per host write, for the report."""
    return [((w.issue_ns - start_ns) / 1e9, None if w.ack_ns is None else (w.ack_ns - w.issue_ns) / 1e6,
             w.nblocks * block_sizes[w.volume]) for w in history]


async def _open_copies(urls: list[str]) -> list:
    # open_device probes the export in a thread of its own; here off the
    # loop so the replay keeps running meanwhile.
    devices = []
    try:
        for url in urls:
            devices.append(await asyncio.to_thread(open_device, url, read_only=True))
    except BaseException:
        for d in devices:
            d.close()
        raise
    return devices


async def _check(urls: list[str], writes: Callable[[], list], names: list[str], check_ns: int,
                 max_violations: int):
    copies = await _open_copies(urls)
    try:
        return await check_copy(copies, writes, names=names, check_ns=check_ns, max_violations=max_violations)
    finally:
        for d in copies:
            d.close()


def _check_worker(conn) -> None:
    """The checking process: one job at a time from ``conn``; the write
    history is asked for once the copy has been read."""
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        urls, names, check_ns, max_violations = job

        def writes() -> list:
            conn.send(("history", None))
            return [WriteRecord(*row) for row in conn.recv()]
        try:
            conn.send(("done", asyncio.run(_check(urls, writes, names, check_ns, max_violations))))
        except Exception as e:  # noqa: BLE001 - the demo reports it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class CheckProcess:
    """Checks in a process of their own. Reading and decoding every block
    of a copy is seconds of Python: on the replay's loop it stalled the
    replay for up to a second at a time, and in a thread the replay waited
    for the GIL; either way the replay reported the stalls as host write
    latency and lateness. ``check`` blocks: call it in a thread."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_check_worker, args=(child,), name="mirrorfw-check", daemon=True)
        self.process.start()
        child.close()
        self._lock = threading.Lock()

    def check(self, urls: list[str], history: Callable[[], list], names: list[str], check_ns: int,
              max_violations: int):
        """``history()`` gives the write records as rows (``HISTORY_ROW``)."""
        with self._lock:
            self.conn.send((list(urls), list(names), check_ns, max_violations))
            while True:
                kind, value = self.conn.recv()
                if kind == "history":
                    self.conn.send(history())
                elif kind == "done":
                    return value
                else:
                    raise RuntimeError(f"check failed: {value}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


async def replay_and_check(trace: str, primary_urls: list[str], copy_urls: list[str] | None = None, *,
                           take_copy: CopyHook | None = None,
                           volume_names: list[str] | None = None, fmt: str | None = None, timing: str = "original",
                           queue_depth: int = 16, check_every_s: float = 5.0, log_path: str | None = None,
                           stripe_ways: int = 1, settle: AsyncHook | None = None,
                           cg_source: Callable[[], Awaitable[list[dict]]] | None = None,
                           report_dir: str | None = None, progress: bool = True, max_violations: int = 10,
                           fidelity: Fidelity | None = None, max_coord_ms: float | None = None) -> dict:
    """Returns the report as a dict (``passed`` is True only when every check
    found a consistent cut); writes report.json/.txt and plots when
    ``report_dir`` is given. ``take_copy`` (or a fixed ``copy_urls``) gives
    each check its copy, one URL per primary volume in the same order.
    ``stripe_ways`` > 1 splits each trace device over that many volumes
    (``stripe_devices``). ``settle`` is awaited after the replay, before the
    final check (e.g. wait for one more CG to commit). ``fidelity``: the
    replay-fidelity limits of the verdict (testbench.report.Fidelity);
    ``max_coord_ms``: the held-ack reference line of the figure."""
    if (take_copy is None) == (copy_urls is None):
        raise ValueError("give either copy_urls or take_copy")
    if copy_urls is not None and len(primary_urls) != len(copy_urls):
        raise ValueError("one copy URL per primary volume")
    if take_copy is None:
        fixed = list(copy_urls)

        @contextlib.asynccontextmanager
        async def take_copy(n: int):
            yield fixed

    def records():
        return stripe_devices(read_trace(trace, fmt), stripe_ways)

    stats = scan(records())
    primaries = [open_device(u) for u in primary_urls]
    names = volume_names or [f"vol{i}" for i in range(len(primaries))]
    opts = ReplayOptions(timing=timing, queue_depth=queue_depth, progress=progress,
                         total=stats.records - stats.by_op["T"], keep_history=True, trace_name=trace)
    rp = Replayer(primaries, log_path, opts, volume_names=names)
    report = RunReport(fidelity_limits=fidelity or Fidelity(), max_coord_ms=max_coord_ms)
    checks = 0
    checker: CheckProcess | None = None

    async def one_check() -> None:
        nonlocal checks
        checks += 1
        async with take_copy(checks) as urls:
            if len(urls) != len(primaries):
                raise ValueError(f"take_copy gave {len(urls)} URLs for {len(primaries)} volumes")
            check_ns = time.monotonic_ns()  # the copy exists now (its CG committed before this)
            # Read and decoded in a process of its own (CheckProcess says why).
            nonlocal checker
            if checker is None:
                checker = CheckProcess()
            result = await asyncio.to_thread(checker.check, list(urls), history_now, names, check_ns,
                                             max_violations)
        entry = result.as_dict() | {"time_s": (check_ns - rp.start_mono_ns) / 1e9}
        if getattr(urls, "cg", None) is not None:
            entry["cg"] = urls.cg
        report.checks.append(entry)
        log.info("check at %.1f s: %s", entry["time_s"], result.summary().splitlines()[0])
        if not result.consistent:
            log.error("%s", result.summary())

    replay_loop = asyncio.get_running_loop()

    def history_now() -> list:
        """The write history as of now, as rows taken on the replay's loop
        (which sets the records' acks) between two of its steps: one consistent view."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def snapshot() -> None:
            try:
                done.set_result(list(map(HISTORY_ROW, rp.history)))
            except BaseException as e:  # noqa: BLE001 - handed to the checking thread
                done.set_exception(e)
        replay_loop.call_soon_threadsafe(snapshot)
        return done.result(timeout=HISTORY_TIMEOUT_S)

    replay_done = asyncio.Event()

    async def checker_loop() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(replay_done.wait(), check_every_s)
            if replay_done.is_set():
                return  # a check under way when the replay ends finishes first (its snapshot dropped)
            await one_check()

    loop_task = None
    try:
        replay_task = asyncio.ensure_future(rp.run(records(), stats.devices))
        await asyncio.sleep(0)
        loop_task = asyncio.ensure_future(checker_loop())
        try:
            result = await replay_task
        finally:
            replay_done.set()
        await loop_task
        if settle is not None:
            await settle()
        await one_check()
        report.replay = result.as_dict()
        report.write_latencies_ms = result.write_latencies_ms
        report.origin_mono_s = rp.start_mono_ns / 1e9
        report.writes = _write_samples(rp.history, rp.start_mono_ns, [d.info.block_size for d in primaries])
        if cg_source is not None:
            report.cgs = await cg_source()
    finally:
        if loop_task is not None and not loop_task.done():
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
        for d in primaries:
            d.close()
        if checker is not None:
            await asyncio.to_thread(checker.close)
    out = report.as_dict()
    if report_dir:
        out["files"] = report.write(report_dir)
    out["text"] = report.text()
    return out
