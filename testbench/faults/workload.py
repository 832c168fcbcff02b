"""A stamped write workload through the NBD host port, and the checks on
what the copies show afterwards.

Each worker owns a disjoint region and has one write in flight, so the
writes to any block are totally ordered and each is acknowledged before the
next is issued (what testbench.checker assumes). Write ids are unique across
every run of one workload object, so one history covers a whole round.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from testbench import stamp
from testbench.replaylog import WriteRecord

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20


class StampedWorkload:
    def __init__(self, size_bytes: int, block_size: int = 512, *, seed: int = 1, max_blocks: int = 16,
                 region_bytes: int | None = None) -> None:
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.max_blocks = max_blocks
        self.region_bytes = region_bytes or size_bytes
        self.history: list[WriteRecord] = []
        self.next_id = 1
        self.errors = 0

    @property
    def acked(self) -> int:
        return sum(1 for w in self.history if w.ack_ns is not None)

    async def run(self, urls: list[str], depth: int, seconds: float, stop: Callable[[], bool] = lambda: False) -> None:
        """``len(urls)`` NBD connections with ``depth`` workers each, for ``seconds``
        or until ``stop()``; a worker ends at its first error (the controller went away)."""
        from drivers.nbd.client import open_async

        devs = []
        for url in urls:
            try:
                devs.append(await open_async(url))
            except Exception as e:  # noqa: BLE001 - a dead controller refuses: nothing issued
                log.info("workload: cannot connect %s: %s", url, e)
                self.errors += 1
        workers = len(devs) * depth
        if not workers:
            return
        blocks = self.region_bytes // self.block_size
        per = blocks // workers
        deadline = time.monotonic() + seconds

        async def worker(dev, k: int) -> None:
            rng = random.Random(self.rng.random())
            first = k * per
            while time.monotonic() < deadline and not stop():
                n = rng.randrange(1, min(self.max_blocks, per) + 1)
                lba = first + rng.randrange(0, per - n + 1)
                wid = self.next_id
                self.next_id += 1
                data = stamp.encode(wid, 0, lba, n, self.block_size)
                w = WriteRecord(wid, 0, lba, n, time.monotonic_ns(), None)
                self.history.append(w)
                try:
                    await dev.write(lba, data)
                except Exception:  # noqa: BLE001 - never acknowledged; the check treats it as in flight
                    w.failed = True
                    self.errors += 1
                    return
                w.ack_ns = time.monotonic_ns()

        try:
            await asyncio.gather(*(worker(d, i * depth + j) for i, d in enumerate(devs) for j in range(depth)))
        finally:
            for d in devs:
                d.close()


async def read_volume(url: str) -> bytes:
    from drivers.nbd.client import open_async

    dev = await open_async(url, read_only=True)
    try:
        bs = dev.info.block_size
        out = bytearray()
        for lba in range(0, dev.info.num_blocks, READ_CHUNK_BYTES // bs):
            out += await dev.read(lba, min(READ_CHUNK_BYTES // bs, dev.info.num_blocks - lba))
        return bytes(out)
    finally:
        dev.close()


def lost_acked_writes(image: bytes, history: list[WriteRecord], block_size: int) -> tuple[int, list[str]]:
    """Acked writes the image does not show: a block must show its last acked
    write, or a later write issued to it (which may or may not have landed)."""
    last_acked: dict[int, int] = {}
    issued: dict[int, set[int]] = {}
    for w in history:
        for lba in range(w.lba, w.lba + w.nblocks):
            if w.ack_ns is not None:
                last_acked[lba] = max(last_acked.get(lba, 0), w.write_id)
            issued.setdefault(lba, set()).add(w.write_id)
    lost: set[int] = set()
    examples: list[str] = []
    for lba, want in last_acked.items():
        block = image[lba * block_size:(lba + 1) * block_size]
        try:
            s = stamp.decode(block)
        except stamp.StampError as e:
            s, why = None, f"torn block: {e}"
        else:
            why = "shows nothing" if s is None else f"shows write {s.write_id}"
        shown = s.write_id if s is not None else 0
        if shown == want or (shown > want and shown in issued[lba]):
            continue
        lost.add(want)
        if len(examples) < 5:
            examples.append(f"lba {lba}: {why}, lacks acked write {want}")
    return len(lost), examples


async def check_c(url: str, history: list[WriteRecord]) -> dict:
    """testbench.checker on C (read through the secondary's read-only export)."""
    from drivers.nbd.client import open_async
    from testbench.checker import check_copy

    dev = await open_async(url, read_only=True)
    try:
        res = await check_copy([dev], history, names=["vol0"])
    finally:
        dev.close()
    return {"consistent": res.consistent, "shown_writes": res.shown_writes,
            "violations": [v.as_dict() for v in res.violations[:3]]}
