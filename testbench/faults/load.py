"""Load: many NBD clients at a high queue depth through the primary's host
port for a bounded time; afterwards every acknowledged write must read back
and C must be a consistent cut."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from testbench.bench.replicating import vm_hwm_mib
from testbench.faults.pair import ProcessPair
from testbench.faults.workload import StampedWorkload, check_c, lost_acked_writes, read_volume

SIZE = "64MiB"
SIZE_BYTES = 64 << 20


def run_load(workdir: Path, *, seed: int, seconds: float, clients: int = 8, queue_depth: int = 32,
             progress=print) -> dict:
    out = {"clients": clients, "queue_depth": queue_depth, "seconds": seconds, "writes": 0, "lost": 0,
           "peak_rss_mib": None}
    pair = ProcessPair(workdir, size=SIZE, nvram_size="64MiB")
    try:
        pair.start_both()
        pair.wait_caught_up(120, after_cgs=0)
        before = pair.status()
        wl = StampedWorkload(SIZE_BYTES, seed=seed, max_blocks=8)
        url = pair.nbd_url()
        t0 = time.monotonic()
        asyncio.run(wl.run([url] * clients, queue_depth, seconds))
        out["seconds"] = round(time.monotonic() - t0, 2)
        out["writes"] = wl.acked
        out["write_errors"] = wl.errors
        out["iops"] = round(wl.acked / out["seconds"], 1)
        image = asyncio.run(read_volume(url))
        out["lost"], examples = lost_acked_writes(image, wl.history, 512)
        if examples:
            out["lost_examples"] = examples
        st = pair.wait_caught_up(120, after_cgs=pair.status()["total_successful_cgs"])
        out["cgs"] = st["total_successful_cgs"] - before["total_successful_cgs"]
        out["failed_cgs"] = st["total_failed_cgs"] - before["total_failed_cgs"]
        out["held_ack_ms"] = st["held_ack_ms"]
        pair.pause()
        verdict = asyncio.run(check_c(pair.nbd_url("secondary"), wl.history))
        pair.resume()
        out["c_consistent"] = verdict["consistent"]
        if not verdict["consistent"]:
            out["violations"] = verdict["violations"]
        out["peak_rss_mib"] = vm_hwm_mib(pair.procs["primary"].pid)
        out["secondary_peak_rss_mib"] = vm_hwm_mib(pair.procs["secondary"].pid)
        return out
    finally:
        pair.close()
        shutil.rmtree(workdir, ignore_errors=True)
