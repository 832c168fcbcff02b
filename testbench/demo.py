"""The demo's core: replay a trace into the primary while checking the
secondary's consistent copy again and again, then report.

``mirrorfw demo`` (harness side) starts the controllers and calls
``replay_and_check`` with their NBD URLs. Checks run in a background task
every ``check_every_s`` seconds while the replay keeps going; each check reads
the copy (optionally between ``pause()`` and ``resume()`` callables, e.g.
pausing CG formation so C is not replaced mid-read), then judges it against
the replay history as of the end of the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from drivers import open_device
from testbench.checker import check_copy
from testbench.replay import Replayer, ReplayOptions
from testbench.report import RunReport
from testbench.traces import read_trace, scan

log = logging.getLogger(__name__)

AsyncHook = Callable[[], Awaitable[None]]


async def replay_and_check(trace: str, primary_urls: list[str], copy_urls: list[str], *,
                           volume_names: list[str] | None = None, fmt: str | None = None, timing: str = "original",
                           queue_depth: int = 16, check_every_s: float = 5.0, log_path: str | None = None,
                           pause: AsyncHook | None = None, resume: AsyncHook | None = None,
                           settle: AsyncHook | None = None,
                           cg_source: Callable[[], Awaitable[list[dict]]] | None = None,
                           report_dir: str | None = None, progress: bool = True, max_violations: int = 10) -> dict:
    """Returns the report as a dict (``passed`` is True only when every check
    found a consistent cut); writes report.json/.txt and plots when
    ``report_dir`` is given. ``settle`` is awaited after the replay, before
    the final check (e.g. wait for one more CG to commit)."""
    if len(primary_urls) != len(copy_urls):
        raise ValueError("one copy URL per primary volume")
    stats = scan(read_trace(trace, fmt))
    primaries = [open_device(u) for u in primary_urls]
    copies = [open_device(u, read_only=True) for u in copy_urls]
    names = volume_names or [f"vol{i}" for i in range(len(primaries))]
    opts = ReplayOptions(timing=timing, queue_depth=queue_depth, progress=progress,
                         total=stats.records - stats.by_op["T"], keep_history=True, trace_name=trace)
    rp = Replayer(primaries, log_path, opts, volume_names=names)
    report = RunReport()

    async def one_check() -> None:
        if pause is not None:
            await pause()
        try:
            check_ns = time.monotonic_ns()
            result = await check_copy(copies, lambda: list(rp.history), names=names, check_ns=check_ns,
                                      max_violations=max_violations)
        finally:
            if resume is not None:
                await resume()
        entry = result.as_dict() | {"time_s": (check_ns - rp.start_mono_ns) / 1e9}
        report.checks.append(entry)
        log.info("check at %.1f s: %s", entry["time_s"], result.summary().splitlines()[0])
        if not result.consistent:
            log.error("%s", result.summary())

    async def checker_loop() -> None:
        while True:
            await asyncio.sleep(check_every_s)
            await one_check()

    loop_task = None
    try:
        replay_task = asyncio.ensure_future(rp.run(read_trace(trace, fmt), stats.devices))
        await asyncio.sleep(0)
        loop_task = asyncio.ensure_future(checker_loop())
        result = await replay_task
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        if settle is not None:
            await settle()
        await one_check()
        report.replay = result.as_dict()
        report.write_latencies_ms = result.write_latencies_ms
        if cg_source is not None:
            report.cgs = await cg_source()
    finally:
        if loop_task is not None and not loop_task.done():
            loop_task.cancel()
        for d in primaries + copies:
            d.close()
    out = report.as_dict()
    if report_dir:
        out["files"] = report.write(report_dir)
    out["text"] = report.text()
    return out
