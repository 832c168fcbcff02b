"""The host port with replication off (``mirrorfw serve``) next to nbdkit's
file plugin, on the same backing file, in the same run.

Both servers listen on Unix sockets; fio's nbd engine (libnbd) drives each
with the same jobs: 4 KiB random write QD16, 1 MiB sequential write QD1,
4 KiB random read QD16. Figures are raw IOPS and MiB/s plus the ratios
mirrorfw/nbdkit.

    python -m testbench.bench.nbd --seconds 5 --workdir /tmp/nbdbench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BACKING_BYTES = 256 << 20
# nbdkit's file plugin goes through the page cache; so does our side, for a
# like-for-like comparison (the file driver would otherwise pick O_DIRECT).
DIRECT = "off"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FioJob:
    key: str
    rw: str
    bs: str
    iodepth: int

    @property
    def reads(self) -> bool:
        return "read" in self.rw


JOBS = (
    FioJob("randwrite_4k", "randwrite", "4k", 16),
    FioJob("seqwrite_1m", "write", "1m", 1),
    FioJob("randread_4k", "randread", "4k", 16),
)


class BenchSkipped(RuntimeError):
    """The bench cannot run here; the message says why."""


def run_fio(uri: str, job: FioJob, seconds: float, size_bytes: int = BACKING_BYTES) -> dict:
    """One fio job through its nbd engine (libnbd) against ``uri``."""
    cmd = ["fio", f"--name={job.key}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}", f"--bs={job.bs}",
           f"--iodepth={job.iodepth}", f"--runtime={seconds}", "--time_based", "--randrepeat=0",
           "--norandommap", f"--size={size_bytes}", "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0 or "{" not in proc.stdout:
        raise RuntimeError(f"fio {job.key} on {uri} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    j = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = j["read" if job.reads else "write"]
    clat = side.get("clat_ns", {}).get("percentile", {})
    return {"iops": round(side["iops"], 1), "mib_s": round(side["bw_bytes"] / (1 << 20), 1),
            "ios": side["total_ios"], "errors": j["error"], "bs": job.bs, "iodepth": job.iodepth,
            "seconds": side["runtime"] / 1000,
            "clat_p50_ms": clat.get("50.000000", 0) / 1e6, "clat_p99_ms": clat.get("99.000000", 0) / 1e6}


def _wait_for_socket(proc: subprocess.Popen, path: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read()[-500:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path} in {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_mirrorfw(backing: Path, sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "serve", f"file://{backing}?direct={DIRECT}", "--name", "vol0",
         "--listen", "none", "--socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        stop_process(proc)
        raise RuntimeError(f"mirrorfw serve did not start: {line!r} {proc.stderr.read()[-500:]}")
    return proc


def start_nbdkit(backing: Path, sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-U", str(sock), "file", f"file={backing}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_socket(proc, sock, "nbdkit")
    return proc


def run_nbd_bench(workdir: str, seconds: float) -> dict:
    """Measure (see the module docstring); raises BenchSkipped without fio/nbdkit."""
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise BenchSkipped(f"{tool} not installed (make deps)")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    backing = work / "nbd-bench.img"
    with open(backing, "wb") as f:
        f.truncate(BACKING_BYTES)
    # Lay the file down once so neither server pays for first allocation.
    with open(backing, "r+b") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(BACKING_BYTES >> 20):
            f.write(chunk)
        os.fsync(f.fileno())

    results: dict = {"backing": str(backing), "seconds_per_job": seconds, "transport": "unix"}
    servers = {
        "mirrorfw_local": (start_mirrorfw, "nbd+unix:///vol0?socket={sock}"),
        "nbdkit": (start_nbdkit, "nbd+unix:///?socket={sock}"),
    }
    for name, (start, uri_fmt) in servers.items():
        sock = work / f"{name}.sock"
        sock.unlink(missing_ok=True)  # a stale socket from an earlier run would look "ready" at once
        proc = start(backing, sock)
        try:
            uri = uri_fmt.format(sock=sock)
            results[name] = {job.key: run_fio(uri, job, seconds) for job in JOBS}
        finally:
            stop_process(proc)
    local, peer = results["mirrorfw_local"], results["nbdkit"]

    def ratio(key: str, field: str) -> float | None:
        return round(local[key][field] / peer[key][field], 3) if peer[key][field] else None

    results["ratios"] = {
        "randwrite_4k_local_vs_nbdkit": ratio("randwrite_4k", "iops"),
        "seqwrite_1m_local_vs_nbdkit": ratio("seqwrite_1m", "mib_s"),
        "randread_4k_vs_nbdkit": ratio("randread_4k", "iops"),
    }
    results.update(results["ratios"])
    results["mirrorfw_file_direct"] = DIRECT
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workdir", default="work/nbd-bench")
    args = ap.parse_args(argv)
    print(json.dumps(run_nbd_bench(args.workdir, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
