"""CG benchmark: held-ack time per CG and CG cycle time against volume size
and dirty fraction, in process, on the real AsyncioClock.

A Primary and a Secondary (LocalRemote) run on sparse mem:// volumes of
1 TiB and 16 TiB with 64 KiB tracks. The dirty tracks stand for data written
and already destaged to A: their OOS bits are set (spread over the volume)
and one CG drains them. Meanwhile host writers keep writing 4 KiB blocks, so
every quiesce holds real acknowledgements.

    python -m testbench.bench.cg [--cases 1TiB_1pct,16TiB_0.1pct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

from drivers.mem import CHUNK, MemDevice
from drivers.mem import open as open_mem
from firmware.local_remote import LocalRemote
from firmware.params import SessionParams
from firmware.primary import Primary
from firmware.secondary import Secondary
from hal.clock import AsyncioClock
from hal.nvram import NvramRegion
from testbench import stats

log = logging.getLogger(__name__)

TRACK = 65536
CASES = {"1TiB_0.1pct": (1 << 40, 0.001), "1TiB_1pct": (1 << 40, 0.01),
         "16TiB_0.1pct": (16 << 40, 0.001), "16TiB_1pct": (16 << 40, 0.01)}


class BytesNvram(NvramRegion):
    def __init__(self, size_bytes: int) -> None:
        self.url = f"bench-nvram://{size_bytes}"
        self.size_bytes = size_bytes
        self._view = memoryview(bytearray(size_bytes))

    @property
    def view(self) -> memoryview:
        return self._view

    def persist(self, offset: int, length: int) -> None:
        return None

    def close(self) -> None:
        return None


class ThinMemDevice(MemDevice):
    """mem:// that keeps all-zero writes to never-written chunks unallocated
    (thin provisioning), so draining zero tracks of a sparse 16 TiB volume
    costs no memory."""

    async def _write(self, lba, data, fua):
        bs = self.info.block_size
        mv = memoryview(data).cast("B")
        if mv.nbytes <= CHUNK and (lba * bs) // CHUNK == (lba * bs + mv.nbytes - 1) // CHUNK \
                and (lba * bs) // CHUNK not in self._chunks and mv.tobytes() == bytes(mv.nbytes):
            return
        await super()._write(lba, data, fua)


def thin(url: str) -> ThinMemDevice:
    dev = open_mem(url)
    thin_dev = ThinMemDevice(dev.info)
    return thin_dev


async def _one_case(size_bytes: int, fraction: float, *, idle_cgs: int = 20, writers: int = 4) -> dict:
    clock = AsyncioClock()
    tracks = size_bytes // TRACK
    bitmap_bytes = (tracks + 7) // 8
    url = f"mem://?size={size_bytes}"
    a = {"vol0": thin(url)}
    sec = Secondary({"vol0": (thin(url), thin(url))}, BytesNvram(2 * bitmap_bytes + (1 << 20)), clock,
                    session_id="bench")
    await sec.open(format=True)
    sec.fc.record["established"] = 1  # an established pair: no full initial copy
    sec.fc.store.write(sec.fc.record)
    params = SessionParams(cg_interval_s=0.0, drain_inflight=32)
    nvram = BytesNvram(2 * bitmap_bytes + (1 << 20) + 64 * 1024 * 1024)
    p = Primary(a, nvram, clock, params, LocalRemote(sec), session_id="bench")
    await p.open(format=True)
    await p.start(form_cgs=False, destage=True)

    dirty = max(1, int(tracks * fraction))
    stride = tracks // dirty
    t0 = time.perf_counter()
    oos = p.oos[0]
    for i in range(dirty):  # spread over the volume, one per stride, jittered
        oos.set(i * stride + (i * 2654435761) % stride)
    setup_s = time.perf_counter() - t0

    stop = asyncio.Event()
    writes = [0]

    async def writer(k: int) -> None:
        i = 0
        while not stop.is_set():
            track = (k * 1000003 + i * 7919) % tracks
            await p.write("vol0", track * TRACK, b"w" * 4096)
            writes[0] += 1
            i += 1
            if i % 8 == 0:
                await asyncio.sleep(0.0005)

    tasks = [asyncio.ensure_future(writer(k)) for k in range(writers)]
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    ok = await p.form_cg()
    cycle_s = time.perf_counter() - t0
    drained = p.drain_bytes // TRACK
    idle_cycles = []
    for _ in range(idle_cgs):
        t1 = time.perf_counter()
        await p.form_cg()
        idle_cycles.append(time.perf_counter() - t1)
    stop.set()
    await asyncio.gather(*tasks)
    held = list(p.gate.held_ms)
    await p.stop(clean=False)
    return {"committed": ok, "dirty_tracks": dirty, "drained_tracks": drained, "cycle_s": cycle_s,
            "tracks_per_s": drained / cycle_s if cycle_s else 0.0, "setup_s": setup_s,
            "small_cg_cycle_s_p50": stats.percentile(idle_cycles, 0.5), "host_writes": writes[0],
            "held_ack_ms": stats.summary(held)}


def run_cg_bench(cases: list[str] | None = None) -> dict:
    """Returns {"cg_cycle_s": {case: s}, "held_ack_ms": {p50, p99, max}, "cases": {case: details}}; each
    held-ack figure is the worst over the cases (None when no case formed a CG)."""
    names = cases or list(CASES)
    details = {}
    held: list[dict] = []
    for name in names:
        size, frac = CASES[name]
        log.info("CG bench %s", name)
        details[name] = asyncio.run(_one_case(size, frac))
        held.append(details[name]["held_ack_ms"])
    return {
        "cg_cycle_s": {n: details[n]["cycle_s"] for n in names},
        "held_ack_ms": {k: max((h[k] for h in held if h[k] is not None), default=None) for k in ("p50", "p99", "max")},
        "cases": details,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run_cg_bench(args.cases.split(",")), indent=2))


if __name__ == "__main__":
    main()
