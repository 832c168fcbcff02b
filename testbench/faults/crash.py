"""Crash points: SIGKILL a controller at each declared point while a stamped
workload runs through the host port, restart it, and count what was lost.

One fresh pair per point (so write ids and stamps never mix between rounds).
The point is armed through the victim's console (``fault arm NAME N`` with N
hits skipped, N from the seed). After the kill: restart; for the primary,
every write acknowledged to the host must read back from it; for either, C
is checked with testbench.checker, once right after the restart (CG
formation paused around the read) and once after catching up. A round whose
point never fired within its time is reported as not hit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from pathlib import Path

from firmware.crashpoints import POINTS
from testbench.faults.pair import VOLUME_BYTES, ProcessPair
from testbench.faults.workload import StampedWorkload, check_c, lost_acked_writes, read_volume

log = logging.getLogger(__name__)


def crash_points() -> list[str]:
    # Importing the firmware modules declares their points.
    import firmware.primary  # noqa: F401
    import firmware.secondary  # noqa: F401

    return sorted(POINTS)


def run_crash(workdir: Path, *, seed: int, seconds_per_point: float, points: list[str] | None = None,
              progress=print) -> dict:
    rng = random.Random(seed)
    out = {"injected": 0, "acked_writes_lost": 0, "inconsistent_copies": 0, "full_resyncs": 0,
           "points": {}, "not_hit": [], "errors": []}
    for name in points or crash_points():
        skip = rng.randrange(0, 4)
        t0 = time.monotonic()
        try:
            r = _one_point(workdir / name.replace(".", "_"), name, skip, seconds_per_point, rng.randrange(1 << 30))
        except Exception as e:  # noqa: BLE001 - a round that breaks is reported, the campaign goes on
            log.debug("crash round %s", name, exc_info=True)
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            out["errors"].append(f"{name}: {r['error']}")
        r["seconds"] = round(time.monotonic() - t0, 1)
        out["points"][name] = r
        if r.get("hit"):
            out["injected"] += 1
            out["acked_writes_lost"] += r.get("acked_writes_lost", 0)
            out["inconsistent_copies"] += r.get("inconsistent_copies", 0)
            out["full_resyncs"] += r.get("full_resync", 0)
        elif "error" not in r:
            out["not_hit"].append(name)
        progress(f"crash {name}: {r}")
    return out


def _one_point(work: Path, name: str, skip: int, seconds: float, seed: int) -> dict:
    role = name.split(".", 1)[0]
    pair = ProcessPair(work)
    r: dict = {"role": role, "skip": skip, "hit": False}
    try:
        pair.start_both()
        pair.wait_caught_up(60, after_cgs=0)  # the initial full copy is behind us
        pair.console(role).run_check(f"fault arm {name} after {skip}")
        victim = pair.procs[role]
        wl = StampedWorkload(VOLUME_BYTES, seed=seed, region_bytes=VOLUME_BYTES // 2)
        url = pair.nbd_url()
        asyncio.run(wl.run([url], 4, seconds, stop=lambda: not victim.alive()))
        if victim.alive():
            time.sleep(0.5)  # a CG-side point may fire just after the last write
        if victim.alive():
            pair.console(role).run_json(f"fault disarm {name}", check=False)
            pair.wait_caught_up(60)
            return r
        r["hit"] = True
        victim.wait(10)
        r["acked"] = wl.acked
        pair.drop_console(role)
        before = None
        if role == "secondary":
            # The primary goes on alone while the secondary is down.
            asyncio.run(wl.run([url], 4, min(1.0, seconds)))
            r["acked"] = wl.acked
            before = pair.status()
        pair.start(role)
        url = pair.nbd_url()  # a restarted primary listens on a new port
        if role == "primary":
            image = asyncio.run(read_volume(url))
            r["acked_writes_lost"], r["lost_examples"] = lost_acked_writes(image, wl.history, 512)
        # C right after the restart, then after catching up: both consistent cuts.
        inconsistent = 0
        pair.pause()
        first = asyncio.run(check_c(pair.nbd_url("secondary"), wl.history))
        pair.resume()
        inconsistent += not first["consistent"]
        st = pair.wait_caught_up(90, after_cgs=pair.status()["total_successful_cgs"])
        pair.pause()
        final = asyncio.run(check_c(pair.nbd_url("secondary"), wl.history))
        pair.resume()
        inconsistent += not final["consistent"]
        r["inconsistent_copies"] = inconsistent
        if not (first["consistent"] and final["consistent"]):
            r["violations"] = first["violations"] + final["violations"]
        # A full resync drains at least the whole volume once.
        resent = st["drain_bytes"] - (before["drain_bytes"] if before else 0)
        r["resync_bytes"] = resent
        r["full_resync"] = int(resent >= VOLUME_BYTES)
        return r
    finally:
        pair.close()
        for img in work.glob("*.img"):
            img.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
