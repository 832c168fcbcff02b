"""The destager (firmware/destage.py): writes to A go on while a flush of A
runs, and an image is marked clean only after a flush that began once its
write had completed (the power-loss barrier of issue 12, hole 3)."""

from __future__ import annotations

import asyncio

import pytest
from firmware_doubles import make_rig, settle

pytestmark = pytest.mark.timeout(60)
T = 65536
INFLIGHT = 4


class GatedA:
    """Volume A whose flushes wait for ``gate``; logs ("w", track) when a
    write completes and ("f", n) / ("F", n) when flush n begins / returns."""

    def __init__(self, dev) -> None:
        self.dev = dev
        self.info = dev.info
        self.gate = asyncio.Event()
        self.log: list[tuple[str, int]] = []
        self.flushes = 0

    async def write(self, lba: int, data, *, fua: bool = False) -> None:
        await self.dev.write(lba, data, fua=fua)
        self.log.append(("w", lba * self.info.block_size // T))

    async def flush(self) -> None:
        n = self.flushes = self.flushes + 1
        self.log.append(("f", n))
        await self.gate.wait()
        await self.dev.flush()
        self.log.append(("F", n))

    def writes(self) -> int:
        return sum(1 for kind, _ in self.log if kind == "w")


async def rig_with_dirty(tracks: int):
    rig = await make_rig(size="4MiB", destage_inflight=INFLIGHT)
    p = rig.primary
    for t in range(tracks):
        await p.write("vol0", t * T, bytes([t + 1]) * T)
    gated = GatedA(p.destager.devices[0])
    p.destager.devices = [gated]
    return rig, p, gated


def test_writes_to_a_go_on_while_a_flush_runs():
    async def main():
        rig, p, a = await rig_with_dirty(3 * INFLIGHT)
        clean_at: dict[int, int] = {}  # track -> len(a.log) when it was marked clean
        done_orig = p.cache.destage_done

        def destage_done(entry, seq):
            clean_at[entry.track] = len(a.log)
            done_orig(entry, seq)
        p.cache.destage_done = destage_done
        task = asyncio.ensure_future(p.destager.destage())
        await settle()
        assert a.flushes == 1, "the first batch was not flushed"
        # The first flush is held: the next images are written meanwhile
        # (a destager that waits for the flush has written only the first batch).
        assert a.writes() > INFLIGHT, f"{a.writes()} writes while the first flush ran"
        assert not clean_at, "an image was marked clean before its flush returned"
        a.gate.set()
        assert await task == 3 * INFLIGHT
        assert p.cache.dirty_count() == 0 and not p.cache.destaging
        # The barrier: each image became clean after a flush that began
        # after its write completed had returned.
        for track, at in clean_at.items():
            log = a.log[:at]
            wrote = max(i for i, (k, v) in enumerate(log) if (k, v) == ("w", track))
            began = [n for k, n in log[wrote:] if k == "f"]
            assert any(("F", n) in log for n in began), f"track {track} clean without a flush after its write"
    asyncio.run(main())


def test_a_rewrite_during_the_flush_keeps_the_track_dirty():
    async def main():
        rig, p, a = await rig_with_dirty(INFLIGHT)
        task = asyncio.ensure_future(p.destager.destage(limit=INFLIGHT))  # one batch: track 0 once
        await settle()
        assert a.flushes == 1
        await p.write("vol0", 0, b"\xee" * T)  # track 0 rewritten after its write to A
        a.gate.set()
        await task
        cur, _ = p.cache.images(0, 0)
        assert cur.dirty, "a track rewritten during its flush was marked clean"
        assert await p.destager.destage() == 1
        assert await p.read("vol0", 0, T) == b"\xee" * T
    asyncio.run(main())


def test_a_destage_stopped_during_a_flush_leaves_its_images_dirty_and_unclaimed():
    async def main():
        rig, p, a = await rig_with_dirty(2 * INFLIGHT)
        task = asyncio.ensure_future(p.destager.destage())
        await settle()
        assert a.flushes == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not p.cache.destaging, "claims outlived the stopped round"
        assert p.cache.dirty_count() == 2 * INFLIGHT
        a.gate.set()
        assert await p.destager.destage() == 2 * INFLIGHT
    asyncio.run(main())
