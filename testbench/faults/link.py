"""Link faults through harness.faults.LinkProxy between the two processes:
corrupt, duplicate, reorder and delay frames, cut connections mid-stream,
then a network outage while the host keeps writing.

- corrupt_applied: blocks where C, after catching up with CG formation
  paused, differs from A (a corrupted frame that got applied would show
  here); C is also checked as a consistent cut.
- oos_bytes: out-of-sync (OOS + CR) tracks x track bytes just before the
  outage ends; resync_bytes: what the primary drained from then until it
  caught up (should be about oos_bytes, never the whole volume).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from testbench.faults.pair import TRACK_BYTES, VOLUME_BYTES, ProcessPair
from testbench.faults.workload import StampedWorkload, check_c, read_volume

log = logging.getLogger(__name__)


def run_link(workdir: Path, *, seed: int, seconds: float, progress=print) -> dict:
    from firmware import protocol
    from harness.faults import LinkFaultPlan, LinkProxyThread

    out = {"faults": 0, "corrupt_applied": 0, "resync_bytes": 0, "oos_bytes": 0}
    pair = ProcessPair(workdir)
    proxy = None
    try:
        sec = pair.start("secondary", format=True)
        data = LinkFaultPlan(seed=seed, direction="send", match=lambda f: len(f) > 5 and f[5] == protocol.Kind.DATA)
        # Replies only: a corrupted handshake reply makes the primary Fatal (reported
        # separately), which would end the part before the outage is measured.
        back = LinkFaultPlan(seed=seed + 1, direction="send", match=lambda f: len(f) > 5 and f[5] == protocol.Kind.ACK)
        proxy = LinkProxyThread(sec.ready["link"], data, back)
        pair.configs.set_peer(proxy.address)
        pair.start("primary", format=True)
        pair.wait_caught_up(60, after_cgs=0)
        wl = StampedWorkload(VOLUME_BYTES, seed=seed, region_bytes=VOLUME_BYTES // 2)
        url = pair.nbd_url()
        # 1. Damaged frames on both directions while the host writes.
        data.corrupt, data.duplicate, data.reorder, data.delay_s = 0.05, 0.05, 0.05, 0.001
        back.corrupt, back.duplicate = 0.02, 0.02
        asyncio.run(wl.run([url], 4, seconds / 3))
        data.corrupt = data.duplicate = data.reorder = data.delay_s = 0.0
        back.corrupt = back.duplicate = 0.0
        # 2. Connections cut mid-stream.
        cuts = 0
        for _ in range(3):
            stop_at = time.monotonic() + seconds / 9
            asyncio.run(wl.run([url], 4, seconds / 9, stop=lambda t=stop_at: time.monotonic() > t))
            cuts += proxy.cut()
        # 3. An outage: the host writes on, then the link comes back.
        proxy.proxy.blocked = True
        cuts += proxy.cut()
        asyncio.run(wl.run([url], 4, seconds / 3))
        time.sleep(0.5)  # a CG in flight fails; CR folds into OOS
        st = pair.status()
        out["oos_bytes"] = (st["oos_tracks"] + st["cr_tracks"]) * TRACK_BYTES
        drained = st["drain_bytes"]
        proxy.proxy.blocked = False
        st = pair.wait_caught_up(120, after_cgs=st["total_successful_cgs"])
        out["resync_bytes"] = st["drain_bytes"] - drained
        pair.pause()
        a = asyncio.run(read_volume(url))
        c = asyncio.run(read_volume(pair.nbd_url("secondary")))
        verdict = asyncio.run(check_c(pair.nbd_url("secondary"), wl.history))
        pair.resume()
        bs = 512
        out["corrupt_applied"] = sum(1 for i in range(0, len(a), bs) if a[i:i + bs] != c[i:i + bs])
        out["c_consistent"] = verdict["consistent"]
        if not verdict["consistent"]:
            out["violations"] = verdict["violations"]
        done = data.done + back.done
        out["faults"] = sum(done.values()) + cuts
        out["by_kind"] = dict(done) | {"cut": cuts}
        out["connections"] = proxy.proxy.connections
        out["writes"] = len(wl.history)
        out["acked"] = wl.acked
        out["bad_frame_lines"] = pair.procs["secondary"].logs().count("bad frame")
        return out
    finally:
        pair.close()
        if proxy is not None:
            proxy.close()
        shutil.rmtree(workdir, ignore_errors=True)
