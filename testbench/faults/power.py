"""Power cuts (issue 12): every persist point of small workloads in virtual
time (testbench/powercut.py), then real processes on volatile+ devices.

The process part: a pair whose volumes are ``volatile+file://`` and whose
NVRAM is ``volatile+nvram://…?persist=msync`` (drivers/powerloss.py: what is
not flushed, FUA-written or persisted may be dropped, kept or torn), a
stamped NBD workload, and at a seeded moment ``power cut SEED`` on the
primary's or the secondary's console (the harness's switch cuts the
process's power domain and exits 137). Then the victim restarts on what
survived; for the primary every acknowledged write must read back; C must
be a consistent cut right after the restart and again after catching up;
catching up must not copy the whole volume again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import threading
import time
from pathlib import Path

from testbench.faults.pair import VOLUME_BYTES, ProcessPair
from testbench.faults.workload import StampedWorkload, check_c, lost_acked_writes, read_volume

log = logging.getLogger(__name__)

ROLES = ("primary", "secondary")


def run_power(workdir: Path, *, seed: int, quick: bool, progress=print) -> dict:
    from testbench.powercut import enumerate_cuts

    inproc = enumerate_cuts(seed=seed, count=4 if quick else 12, tears=1 if quick else 3, progress=None)
    progress(f"power in process: {inproc['cut_points']} cut points, {inproc['states_checked']} states, "
             f"{len(inproc['violations'])} violations in {inproc['seconds']} s")
    rounds = 1 if quick else 3
    proc = run_process_cuts(workdir, seed=seed, rounds=rounds, seconds=2.0 if quick else 4.0, progress=progress)
    return {
        "cut_points": inproc["cut_points"] + proc["cuts"],
        "states_checked": inproc["states_checked"] + proc["states_checked"],
        "acked_writes_lost": inproc["acked_writes_lost"] + proc["acked_writes_lost"],
        "inconsistent_copies": inproc["inconsistent_copies"] + proc["inconsistent_copies"],
        "full_resyncs": inproc["full_resyncs"] + proc["full_resyncs"],
        "process_cuts": proc["cuts"],
        "inproc": {k: inproc[k] for k in ("cut_points", "states_checked", "distinct_states", "acked_writes_lost",
                                          "inconsistent_copies", "full_resyncs", "reformats", "by_domain",
                                          "scenarios", "seconds")},
        "violations": [v["repro"] + ": " + "; ".join(v["found"][:2]) for v in inproc["violations"][:10]],
        "process": proc,
        "errors": proc["errors"],
    }


def volatile_configs(pair: ProcessPair) -> None:
    """Put every device URL of the pair's configs behind ``volatile+`` and
    the NVRAM behind ``volatile+`` with persist=msync."""
    for path in (pair.configs.primary, pair.configs.secondary):
        text = path.read_text()
        for key in ("url", "b_url", "c_url"):
            text = text.replace(f'{key} = "file://', f'{key} = "volatile+file://')
        lines = []
        for line in text.splitlines():
            if line.startswith('url = "nvram://'):
                line = line.replace('"nvram://', '"volatile+nvram://')[:-1] + '&persist=msync"'
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")


def run_process_cuts(workdir: Path, *, seed: int, rounds: int, seconds: float, progress=print) -> dict:
    rng = random.Random(f"power-process:{seed}")
    out = {"cuts": 0, "states_checked": 0, "acked_writes_lost": 0, "inconsistent_copies": 0, "full_resyncs": 0,
           "rounds": [], "errors": []}
    for i in range(rounds):
        for role in ROLES:
            cut_seed = rng.randrange(1 << 30)
            at = rng.uniform(0.3, seconds - 0.3)
            t0 = time.monotonic()
            try:
                r = _one_cut(workdir / f"{role}-{i}", role, cut_seed, at, seconds, rng.randrange(1 << 30))
            except Exception as e:  # noqa: BLE001 - a round that breaks is reported, the campaign goes on
                log.debug("power round %s %d", role, i, exc_info=True)
                r = {"role": role, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                out["errors"].append(f"{role} round {i}: {r['error']}")
            r["seconds"] = round(time.monotonic() - t0, 1)
            out["rounds"].append(r)
            if r.get("cut"):
                out["cuts"] += 1
                out["states_checked"] += r.get("states_checked", 0)
                out["acked_writes_lost"] += r.get("acked_writes_lost", 0)
                out["inconsistent_copies"] += r.get("inconsistent_copies", 0)
                out["full_resyncs"] += r.get("full_resync", 0)
            progress(f"power cut {role} round {i}: {r}")
    return out


def _one_cut(work: Path, role: str, cut_seed: int, at: float, seconds: float, wl_seed: int) -> dict:
    pair = ProcessPair(work)
    volatile_configs(pair)
    r: dict = {"role": role, "seed": cut_seed, "at_s": round(at, 2), "cut": False}
    try:
        pair.start_both()
        pair.wait_caught_up(60, after_cgs=0)  # the initial full copy is behind us
        victim = pair.procs[role]
        wl = StampedWorkload(VOLUME_BYTES, seed=wl_seed, region_bytes=VOLUME_BYTES // 2)
        url = pair.nbd_url()
        address = victim.ready["console"]

        def cut() -> None:
            from harness.console_client import ConsoleClient

            try:
                con = ConsoleClient(address, timeout_s=5.0)
            except Exception as e:  # noqa: BLE001 - reported through the exit status check below
                log.info("power cut: console unreachable: %s", e)
                return
            try:
                con.run_json(f"power cut {cut_seed}", check=False)
            except Exception:  # noqa: BLE001 - the victim ends before it can reply
                pass
            finally:
                try:
                    con.close()
                except Exception:  # noqa: BLE001
                    pass

        timer = threading.Timer(at, cut)
        timer.start()
        try:
            stop = (lambda: not victim.alive()) if role == "primary" else (lambda: False)
            asyncio.run(wl.run([url], 4, seconds, stop=stop))
        finally:
            timer.join()
        status = victim.wait(20)
        if status != 137:
            raise RuntimeError(f"the {role} ended with status {status}, not 137 (power cut)")
        r["cut"] = True
        r["cut_log"] = next((ln for ln in victim.logs().splitlines() if "mirrorfw: power cut" in ln), "")[:300]
        pair.drop_console(role)
        before = None
        if role == "secondary":
            # The primary goes on alone while the secondary is off.
            asyncio.run(wl.run([url], 4, min(1.0, seconds)))
            before = pair.status()
        r["acked"] = wl.acked
        pair.start(role)
        url = pair.nbd_url()  # a restarted primary listens on a new port
        if role == "primary":
            image = asyncio.run(read_volume(url))
            r["acked_writes_lost"], r["lost_examples"] = lost_acked_writes(image, wl.history, 512)
        pair.pause()
        first = asyncio.run(check_c(pair.nbd_url("secondary"), wl.history))
        pair.resume()
        st = pair.wait_caught_up(90, after_cgs=pair.status()["total_successful_cgs"])
        pair.pause()
        final = asyncio.run(check_c(pair.nbd_url("secondary"), wl.history))
        pair.resume()
        r["states_checked"] = 2
        r["inconsistent_copies"] = (not first["consistent"]) + (not final["consistent"])
        if r["inconsistent_copies"]:
            r["violations"] = first["violations"] + final["violations"]
        resent = st["drain_bytes"] - (before["drain_bytes"] if before else 0)
        r["resync_bytes"] = resent
        r["full_resync"] = int(resent >= VOLUME_BYTES)
        return r
    finally:
        pair.close()
        shutil.rmtree(work, ignore_errors=True)
