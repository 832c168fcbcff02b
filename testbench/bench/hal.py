"""The HAL's own O_DIRECT throughput next to fio's, on the same device in the
same run: 4K random write at queue depth 1 and 32, 1 MiB sequential write.

``run_hal_bench(target, seconds)`` takes a block device path (/dev/loopN), a
regular file path, or "loop" (a 1 GiB file in /tmp under a fresh loop device
with direct I/O, detached afterwards; root only). Ratios are HAL / fio
(higher is better; 1.0 means the HAL's path costs nothing over fio's).

    python -m testbench.bench.hal loop --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from drivers import open_device
from drivers.osio.pool import IO_THREADS

log = logging.getLogger(__name__)

LOOP_SIZE_BYTES = 1 << 30


def _cpu_seconds() -> float:
    """User and system CPU time of this process, every thread (the pool's too)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _figures(done: int, block_bytes: int, elapsed: float, cpu_s: float) -> dict:
    # CPU per I/O next to the rate: on a shared machine the rate swings with
    # what else runs; the CPU an I/O costs much less so.
    return {"iops": done / elapsed, "mib_s": done * block_bytes / elapsed / (1 << 20), "ios": done,
            "seconds": elapsed, "cpu_us_per_io": cpu_s / done * 1e6 if done else 0.0}


def _url_for(path: str) -> str:
    st = os.stat(path)
    return f"blk://{path}" if stat.S_ISBLK(st.st_mode) else f"file://{path}"


async def _hal_randwrite(url: str, seconds: float, block_bytes: int, depth: int, seed: int) -> dict:
    dev = open_device(url)
    try:
        slots = dev.info.size_bytes // block_bytes
        per = block_bytes // dev.info.block_size
        payload = random.Random(seed).randbytes(block_bytes)
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            rng = random.Random(seed * 1000 + k)
            while time.perf_counter() < deadline:
                await dev.write(rng.randrange(slots) * per, payload)
                done += 1

        start, cpu0 = time.perf_counter(), _cpu_seconds()
        await asyncio.gather(*(worker(k) for k in range(depth)))
        elapsed, cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu0
    finally:
        dev.close()
    return _figures(done, block_bytes, elapsed, cpu_s)


async def _hal_seqwrite(url: str, seconds: float, block_bytes: int) -> dict:
    dev = open_device(url)
    try:
        slots = dev.info.size_bytes // block_bytes
        per = block_bytes // dev.info.block_size
        payload = random.Random(3).randbytes(block_bytes)
        done = 0
        start, cpu0 = time.perf_counter(), _cpu_seconds()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await dev.write((done % slots) * per, payload)
            done += 1
        elapsed, cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu0
    finally:
        dev.close()
    return _figures(done, block_bytes, elapsed, cpu_s)


def _fio(path: str, seconds: float, rw: str, bs: str, depth: int, engine: str, size_bytes: int) -> dict:
    cmd = [
        "fio", "--name=hal-peer", f"--filename={path}", "--direct=1", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={depth}", f"--ioengine={engine}", f"--runtime={max(1, round(seconds * 1000))}ms", "--time_based",
        f"--size={size_bytes}", "--randrepeat=0", "--norandommap", "--output-format=json",
        "--group_reporting", "--thread",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip()[:300]}")
    out = proc.stdout[proc.stdout.index("{"):]  # fio may print notes before the JSON
    jobs = json.loads(out)["jobs"][0]
    job = jobs["write"]
    cpu_s = (jobs["usr_cpu"] + jobs["sys_cpu"]) / 100 * job["runtime"] / 1000  # fio's percent of its runtime
    return {"iops": job["iops"], "mib_s": job["bw_bytes"] / (1 << 20), "ios": job["total_ios"],
            "seconds": job["runtime"] / 1000, "engine": engine,
            "cpu_us_per_io": cpu_s / job["total_ios"] * 1e6 if job["total_ios"] else 0.0}


def _run(coro):
    """Run on uvloop when installed, as the controllers do (harness.controller)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _merged(parts: list[dict]) -> dict:
    """One figure from the rounds of a test: totals over their summed time."""
    ios = sum(p["ios"] for p in parts)
    secs = sum(p["seconds"] for p in parts)
    out = {**parts[0], "iops": ios / secs if secs else 0.0,
           "mib_s": sum(p["mib_s"] * p["seconds"] for p in parts) / secs if secs else 0.0,
           "ios": ios, "seconds": secs, "rounds": len(parts),
           "cpu_us_per_io": sum(p["cpu_us_per_io"] * p["ios"] for p in parts) / ios if ios else 0.0}
    return out


def _measure(path: str, seconds: float) -> dict:
    url = _url_for(path)
    probe = open_device(url, read_only=True)
    size_bytes = probe.info.size_bytes
    direct = probe.info.direct_io
    probe.close()
    tests = {
        "randwrite_4k_qd1": (lambda s: _run(_hal_randwrite(url, s, 4096, 1, 1)),
                             lambda s: _fio(path, s, "randwrite", "4k", 1, "psync", size_bytes)),
        "randwrite_4k_qd32": (lambda s: _run(_hal_randwrite(url, s, 4096, 32, 2)),
                              lambda s: _fio(path, s, "randwrite", "4k", 32, "libaio", size_bytes)),
        "seqwrite_1m": (lambda s: _run(_hal_seqwrite(url, s, 1 << 20)),
                        lambda s: _fio(path, s, "write", "1m", 1, "psync", size_bytes)),
    }
    # The HAL and fio take turns in rounds of about 2 s rather than one whole
    # run each: on a machine shared with other work the load shifts from one
    # run to the next, and a ratio of two runs minutes apart measured that.
    rounds = max(1, min(5, int(seconds // 2)))
    hal: dict = {}
    fio: dict = {}
    for name, (hal_fn, fio_fn) in tests.items():
        hal_parts, fio_parts = [], []
        for _ in range(rounds):
            hal_parts.append(hal_fn(seconds / rounds))
            fio_parts.append(fio_fn(seconds / rounds))
        hal[name], fio[name] = _merged(hal_parts), _merged(fio_parts)
    ratios = {f"hal_{k}_vs_fio": hal[k]["iops"] / fio[k]["iops"] if fio[k]["iops"] else 0.0 for k in hal}
    return {"device": path, "url": url, "size_bytes": size_bytes, "direct_io": direct,
            "seconds_per_test": seconds, "event_loop": _event_loop_name(),
            "io_threads": IO_THREADS, "hal": hal, "fio": fio, **ratios}


def _make_loop(size_bytes: int) -> tuple[str, str]:
    if os.geteuid() != 0:
        raise RuntimeError("a loop device needs root; pass a file path instead")
    fd, backing = tempfile.mkstemp(prefix="mirrorfw-bench-", suffix=".img", dir="/tmp")
    os.ftruncate(fd, size_bytes)
    os.close(fd)
    proc = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", backing],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        os.unlink(backing)
        raise RuntimeError(f"losetup failed: {proc.stderr.strip()}")
    return proc.stdout.strip(), backing


def run_hal_bench(device_path_or_loop: str, seconds: float) -> dict:
    """Measure the HAL and fio on one device; see the module docstring."""
    if shutil.which("fio") is None:
        raise RuntimeError("fio is not installed (make deps)")
    if device_path_or_loop != "loop":
        return _measure(device_path_or_loop, seconds)
    dev, backing = _make_loop(LOOP_SIZE_BYTES)
    try:
        result = _measure(dev, seconds)
        result["loop_backing_file"] = backing
        return result
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        os.unlink(backing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help='"loop", a block device path, or an existing file path')
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run_hal_bench(args.target, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
