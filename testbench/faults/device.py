"""Device faults: harness.faults.FaultyDevice under A (the primary's volume)
and B (the secondary's), in one process (the harness wraps the devices).

Stamped writes go through Primary.write; a write that raised is a reported
failure, fine. A silent loss is a write that returned (acknowledged) whose
data then reads back wrong from the primary without an error being raised.
"""

from __future__ import annotations

import asyncio
import errno
import random
import shutil
from pathlib import Path

from testbench import stamp

BLOCK = 512


async def _run(workdir: Path, seed: int, writes: int) -> dict:
    from harness.faults import DeviceFaultPlan, FaultyDevice
    from testbench.faults.inproc import InProcessPair

    rng = random.Random(seed)
    plans = {
        "a_eio": DeviceFaultPlan(ops=frozenset({"write", "read"}), fail_rate=0.05, seed=seed),
        "b_eio": DeviceFaultPlan(ops=frozenset({"write"}), fail_rate=0.05, seed=seed + 1, err=errno.EIO),
    }
    a_plan, b_plan = plans["a_eio"], plans["b_eio"]
    a_plan.delay_s = b_plan.delay_s = 0.0005
    pair = await InProcessPair.create(workdir, wrap_a=lambda d: FaultyDevice(d, a_plan),
                                      wrap_b=lambda d: FaultyDevice(d, b_plan))
    p = pair.primary
    size = pair.a["vol0"].info.size_bytes
    acked: dict[int, int] = {}  # lba -> write id of the last acked write there (single-block writes)
    reported_write_errors = reported_read_errors = silent = 0
    examples = []
    try:
        for wid in range(1, writes + 1):
            lba = rng.randrange(0, size // BLOCK // 4)
            try:
                await asyncio.wait_for(p.write("vol0", lba * BLOCK, stamp.encode(wid, 0, lba, 1, BLOCK)), 10)
                acked[lba] = wid
            except Exception:  # noqa: BLE001 - reported to the host: not silent
                reported_write_errors += 1
                acked.pop(lba, None)  # the block's content is now undefined for the host
            if wid % 50 == 0:
                await asyncio.sleep(0.01)  # let destage and CGs run into the faults
        await asyncio.sleep(0.5)
        for lba, wid in acked.items():
            try:
                block = await asyncio.wait_for(p.read("vol0", lba * BLOCK, BLOCK), 10)
            except Exception:  # noqa: BLE001 - an error is not silent
                reported_read_errors += 1
                continue
            try:
                s = stamp.decode(block)
            except stamp.StampError:
                s = None
            if s is None or s.write_id != wid:
                silent += 1
                if len(examples) < 3:
                    examples.append(f"lba {lba}: wanted write {wid}, got {s.write_id if s else 'nothing'}")
        st = p.status()
    finally:
        await pair.close()
    return {"faults": sum(pl.done["fail"] for pl in plans.values()), "silent_losses": silent,
            "delays": sum(pl.done["delay"] for pl in plans.values()),
            "by_plan": {k: dict(pl.done) for k, pl in plans.items()}, "writes": writes, "blocks_checked": len(acked),
            "write_errors_reported": reported_write_errors, "read_errors_reported": reported_read_errors,
            "copy_state": st.get("copy_state"), "fatal_reason": st.get("fatal_reason"), "examples": examples}


def run_device(workdir: Path, *, seed: int, writes: int, progress=print) -> dict:
    import logging

    logging.getLogger("firmware").setLevel(logging.ERROR)  # every injected EIO is logged by the destager
    try:
        return asyncio.run(_run(workdir, seed, writes))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
