"""The primary with replication on, next to nbdkit's file plugin, in one run.

A secondary and a primary run as real processes (harness.supervise) on
file:// volumes in a work folder; once the initial full copy has committed,
fio's nbd engine drives the primary's host port (Unix socket) while CGs
cycle (interval 0: as fast as they form), then the same fio jobs drive
``nbdkit file`` on a backing file of the same size in the same folder.
Meanwhile the primary's console is polled for data exposure (RPO) and, at
the end, for the held-ack time per CG; VmHWM of both processes gives the
RSS peaks. Each job is followed by a settle (OOS empty again), so the drain
bytes over the job and its settle, divided by the bytes fio wrote, are the
link bytes per host byte. Then ``pair suspend`` turns replication off on the
same primary (no drain, OOS still recorded) and the jobs run again: the
replication tax is the replicating figure over that one, same run.

    python -m testbench.bench.replicating --seconds 10 --workdir /tmp/rb
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from testbench import stats
from testbench.bench.nbd import BenchSkipped, FioJob, run_fio, start_nbdkit, stop_process

log = logging.getLogger(__name__)

VOLUME_SIZE = "256MiB"
VOLUME_BYTES = 256 << 20
NVRAM_MIB = 128
NVRAM_SIZE = f"{NVRAM_MIB}MiB"
INITIAL_COPY_TIMEOUT_S = 300.0
POLL_S = 0.25


JOBS = (FioJob("randwrite_4k_qd16", "randwrite", "4k", 16), FioJob("seqwrite_1m_qd1", "write", "1m", 1))


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident set of a live process (VmHWM), MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class StatusPoller:
    """Polls ``status --json`` on a console in a thread: data exposure samples
    (once a CG has committed) and the last status seen."""

    def __init__(self, console_url: str) -> None:
        from harness.console_client import ConsoleClient

        self.client = ConsoleClient(console_url, timeout_s=20.0)
        self.exposure_s: list[float] = []
        self.last: dict = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one console, two threads: one command at a time

    def status(self) -> dict:
        return self.run("status")

    def run(self, command: str) -> dict:
        with self._lock:
            return self.client.run_json(command)["data"]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                st = self.status()
            except Exception as e:  # noqa: BLE001 - reported with the results
                self.errors.append(str(e))
                continue
            self.last = st
            if st.get("total_successful_cgs") and st.get("data_exposure_s") is not None:
                self.exposure_s.append(float(st["data_exposure_s"]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def close(self) -> None:
        self.stop()
        self.client.close()


def wait_initial_copy(poller: StatusPoller, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = poller.status()
        if st.get("total_successful_cgs", 0) >= 1 and not st.get("oos_tracks"):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"initial copy not committed after {timeout_s} s: {st}")
        time.sleep(0.5)


def run_replicating_bench(seconds: float, workdir: str | Path | None = None) -> dict:
    """Measure (see the module docstring). Raises BenchSkipped when fio's nbd
    engine or nbdkit is missing."""
    from harness.supervise import start_controller, write_pair_configs

    if shutil.which("fio") is None:
        raise BenchSkipped("fio is not installed (make deps)")
    if shutil.which("nbdkit") is None:
        raise BenchSkipped("nbdkit is not installed (make deps)")
    engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout
    if "nbd" not in engines.split():
        raise BenchSkipped("this fio has no nbd engine")
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="mirrorfw-repl-", dir="/tmp") if own else workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pair = write_pair_configs(work / "pair", size=VOLUME_SIZE, nvram_size=NVRAM_SIZE, console=True, nbd_socket=True,
                              session={"cg_interval_s": 0.0})
    procs = []
    poller = None
    nbdkit = None
    result: dict = {"volume_bytes": VOLUME_BYTES, "seconds_per_test": seconds, "workdir": str(work)}
    try:
        sec = start_controller(pair.secondary, format=True, verbose=0)
        procs.append(sec)
        pri = start_controller(pair.primary, format=True, verbose=0)
        procs.append(pri)
        poller = StatusPoller(pri.ready["console"])
        t0 = time.monotonic()
        wait_initial_copy(poller, INITIAL_COPY_TIMEOUT_S)
        result["initial_copy_s"] = time.monotonic() - t0
        log.info("initial copy committed in %.1f s", result["initial_copy_s"])
        before = poller.status()
        poller.start()
        uri = f"nbd+unix:///vol0?socket={pri.ready['nbd_socket']}"
        mine = run_jobs(uri, seconds, poller)
        poller.stop()
        after = poller.status()
        mine["cgs_during"] = after["total_successful_cgs"] - before["total_successful_cgs"]
        mine["failed_cgs_during"] = after["total_failed_cgs"] - before["total_failed_cgs"]
        mine["drain_bytes_during"] = after["drain_bytes"] - before["drain_bytes"]
        mine["copy_state"] = after["copy_state"]
        result["status_after"] = after
        result["held_ack_ms"] = {k: after["held_ack_ms"].get(k) for k in stats.SUMMARY_KEYS}
        result["rpo_s"] = stats.summary(poller.exposure_s)
        # The NVRAM beside the peak: the primary maps all of it, so it is a floor of its RSS.
        result["rss_mib"] = {"primary_peak": vm_hwm_mib(pri.pid), "secondary_peak": vm_hwm_mib(sec.pid),
                             "primary_nvram": NVRAM_MIB}
        result["poll_errors"] = poller.errors[:5]
        result["mirrorfw_replicating"] = mine
        result["link_bytes_per_host_byte"] = mine.get("randwrite_4k_qd16", {}).get("link_bytes_per_host_byte")
        # Replication off on the same primary: the pair suspended (no drain, OOS still recorded).
        try:
            poller.run("pair suspend")
            result["mirrorfw_suspended"] = run_jobs(uri, seconds)
            result["status_suspended"] = poller.status()
        except Exception as e:  # noqa: BLE001 - the replicating figures stand without it
            result["mirrorfw_suspended"] = {"error": str(e)}
        # The peer, on an equal backing file in the same folder, after the
        # controllers are done (so they do not share the two cores with it).
        for p in reversed(procs):
            p.stop()
        backing = work / "nbdkit-backing.img"
        with open(backing, "wb") as f:
            f.truncate(VOLUME_BYTES)
        nbdkit_sock = work / "nbdkit.sock"
        nbdkit = start_nbdkit(backing, nbdkit_sock)
        result["nbdkit"] = run_jobs(f"nbd+unix:///?socket={nbdkit_sock}", seconds)
        off = result["mirrorfw_suspended"]
        result["ratios"] = {
            "randwrite_4k_replicating_vs_nbdkit": _ratio(mine, result["nbdkit"], "randwrite_4k_qd16", "iops"),
            "seqwrite_1m_replicating_vs_nbdkit": _ratio(mine, result["nbdkit"], "seqwrite_1m_qd1", "mib_s"),
            "replication_tax_4k_qd16": _ratio(mine, off, "randwrite_4k_qd16", "iops"),
            "seqwrite_1m_replicating_vs_local": _ratio(mine, off, "seqwrite_1m_qd1", "mib_s"),
            "randwrite_4k_suspended_vs_nbdkit": _ratio(off, result["nbdkit"], "randwrite_4k_qd16", "iops"),
        }
        return result
    finally:
        if poller is not None:
            poller.close()
        if nbdkit is not None:
            stop_process(nbdkit)
        for p in reversed(procs):
            if p.alive():
                p.kill()
        if own:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for img in work.rglob("*.img"):
                img.unlink(missing_ok=True)  # sparse, but do not leave GiBs of images behind


def _ratio(mine: dict, peer: dict, key: str, figure: str) -> float | None:
    ours = mine.get(key, {}).get(figure)
    theirs = peer.get(key, {}).get(figure)
    return ours / theirs if ours is not None and theirs else None


SETTLE_TIMEOUT_S = 60.0


def run_jobs(uri: str, seconds: float, poller: StatusPoller | None = None) -> dict:
    """Every job of JOBS; a failed job records its error instead of figures.
    With ``poller``: after each job, wait until OOS is empty (or a minute),
    and record the drain bytes over the job and that settle against the
    bytes the job wrote (``link_bytes_per_host_byte``)."""
    out = {}
    for job in JOBS:
        before = poller.status() if poller is not None else None
        try:
            out[job.key] = res = run_fio(uri, job, seconds, VOLUME_BYTES)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log.warning("%s", e)
            out[job.key] = {"error": str(e)}
            continue
        if poller is not None:
            t0 = time.monotonic()
            while True:
                st = poller.status()
                if not st.get("oos_tracks") and not st.get("cr_tracks") or time.monotonic() - t0 > SETTLE_TIMEOUT_S:
                    break
                time.sleep(POLL_S)
            host = res["ios"] * _size(job.bs)
            res["settle_s"] = round(time.monotonic() - t0, 2)
            res["drain_bytes"] = st["drain_bytes"] - before["drain_bytes"]
            res["link_bytes_per_host_byte"] = round(res["drain_bytes"] / host, 3) if host else None
            res["cache_full_waits"] = st.get("cache", {}).get("full_waits")
    return out


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(text[:-1]) * units[text[-1].lower()] if text[-1].lower() in units else int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run_replicating_bench(args.seconds, args.workdir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
