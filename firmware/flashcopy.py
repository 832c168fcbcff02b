"""FlashCopy B -> C, no-copy with copy-on-write, as the secondary keeps it.

C is never written as a whole: reading a grain of C gives C's copy when the
grain's "copied" bit is set and B otherwise. Before B's first overwrite of a
grain after the last commit, the grain is copied from B to C and the bit is
set (data first, then the bit), so C keeps showing the last committed CG.

Commit makes a new point in time, atomically across every volume: each
volume has two copied-bitmap areas in NVRAM; ``prepare`` empties the spare
ones and records PREPARED, ``commit`` rewrites the FlashCopy record with the
spare areas active (one sealed record write). A crash between the two keeps
the previous C; there is no half-applied commit to repair.
"""

from __future__ import annotations

import asyncio
import logging

from firmware.bitmap import TrackBitmap
from firmware.double_record import DoubleRecord
from firmware.layout import FC_IDLE, FC_PREPARED, RegionPlan
from firmware.pins import DEFAULT_MAX_PINNED_BYTES, Pins
from firmware.region import bitmap_pairs
from hal.block import BlockDevice
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)


class FlashCopy:
    def __init__(self, nvram: NvramRegion, plan: RegionPlan, store: DoubleRecord, record: dict,
                 b_devices: list[BlockDevice], c_devices: list[BlockDevice], *, fresh: bool,
                 max_pinned_bytes: int = DEFAULT_MAX_PINNED_BYTES) -> None:
        self.nvram = nvram
        self.plan = plan
        self.store = store
        self.record = record
        self.b = b_devices
        self.c = c_devices
        self.grain_bytes = plan.track_bytes
        self._areas = bitmap_pairs(nvram, plan, fresh=fresh)
        self._busy: dict[tuple[int, int], asyncio.Future] = {}
        self.cow_copies = 0
        self.pins = Pins(self, max_pinned_bytes)  # point-in-time reads of C (firmware/pins.py)

    # -- bitmaps ---------------------------------------------------------------
    def copied(self, vi: int) -> TrackBitmap:
        return self._areas[vi][(self.record["active_select"] >> vi) & 1]

    def _spare(self, vi: int) -> TrackBitmap:
        return self._areas[vi][1 - ((self.record["active_select"] >> vi) & 1)]

    def grains(self, vi: int, offset: int, length: int) -> range:
        return range(offset // self.grain_bytes, (offset + length - 1) // self.grain_bytes + 1)

    def grain_len(self, vi: int, g: int) -> int:
        return min(self.grain_bytes, self.plan.volumes[vi].size_bytes - g * self.grain_bytes)

    def grain_count(self, vi: int) -> int:
        return -(-self.plan.volumes[vi].size_bytes // self.grain_bytes)

    # -- grain locks: a COW and the B write that follows it are one step for readers of C --
    async def lock(self, vi: int, grains: range) -> None:
        for g in grains:
            while (vi, g) in self._busy:
                await asyncio.shield(self._busy[(vi, g)])
            self._busy[(vi, g)] = asyncio.get_running_loop().create_future()

    def unlock(self, vi: int, grains: range) -> None:
        for g in grains:
            fut = self._busy.pop((vi, g), None)
            self.pins.settle(vi, g)  # pins waiting on this grain decide it now, before anyone relocks it
            if fut is not None and not fut.done():
                fut.set_result(None)

    def locked_grains(self) -> list[tuple[int, int]]:
        return list(self._busy)

    def lock_future(self, vi: int, g: int) -> asyncio.Future | None:
        return self._busy.get((vi, g))

    async def wait_unlocked(self, vi: int, grains: range) -> None:
        for g in grains:
            while (vi, g) in self._busy:
                await asyncio.shield(self._busy[(vi, g)])

    # -- copy on write ------------------------------------------------------------------
    async def before_b_write(self, vi: int, grains: range, crash_hit=None) -> None:
        """Copy every not-yet-copied grain from B to C, then set its bit."""
        await self.pins.capture(vi, grains, cow=True)  # what pinned readers still need, first
        copied = self.copied(vi)
        b, c = self.b[vi], self.c[vi]
        for g in grains:
            if copied.test(g):
                continue
            n = self.grain_len(vi, g)
            off = g * self.grain_bytes
            data = await b.read(off // b.info.block_size, n // b.info.block_size)
            # FUA: the copy is durable in C before its bit persists and before B
            # is overwritten; else a power cut leaves a bit pointing at nothing.
            await c.write(off // c.info.block_size, data, fua=True)
            if crash_hit is not None:
                crash_hit()
            copied.set(g)  # the copy is in C before the bit says so
            self.cow_copies += 1

    async def read_c(self, vi: int, offset: int, length: int) -> bytes:
        """C at the last commit (per grain, C's copy if copied, else B), one
        point in time for the whole read: it pins its grains while it reads."""
        pin = self.pins.take("one read", {vi: self.grains(vi, offset, length)})
        try:
            return await self.pins.read(pin, vi, offset, length)
        finally:
            self.pins.drop(pin)

    # -- the new point in time ---------------------------------------------------------------
    def prepare(self, seq: int) -> None:
        for vi in range(len(self._areas)):
            self._spare(vi).clear_all()
        self.record.update(phase=FC_PREPARED, prepared_seq=seq)
        self.store.write(self.record)

    def commit(self, seq: int, wall: float, primary_generation: int) -> None:
        sel = self.record["active_select"]
        for vi in range(len(self._areas)):
            sel ^= 1 << vi
        self.record.update(phase=FC_IDLE, committed_seq=seq, active_select=sel, established=1, commit_wall=wall,
                           primary_generation=primary_generation)
        self.store.write(self.record)  # the one write that moves C to the new point in time

    def abort(self) -> None:
        if self.record["phase"] == FC_PREPARED:
            self.record.update(phase=FC_IDLE)
            self.store.write(self.record)

    async def reverse_restore(self) -> int:
        """Fast reverse restore: copy every copied grain C -> B, so B equals C.
        Idempotent until the bits are cleared at the end."""
        restored = 0
        for vi in range(len(self._areas)):
            copied = self.copied(vi)
            b, c = self.b[vi], self.c[vi]
            g = copied.next_set(0)
            while g >= 0:
                n = self.grain_len(vi, g)
                off = g * self.grain_bytes
                one = range(g, g + 1)
                await self.lock(vi, one)
                try:
                    await self.pins.capture(vi, one, cow=False)  # pins still reading B[g] keep it
                    data = await c.read(off // c.info.block_size, n // c.info.block_size)
                    await b.write(off // b.info.block_size, data)
                finally:
                    self.unlock(vi, one)
                restored += 1
                g = copied.next_set(g + 1)
            await b.flush()
        for vi in range(len(self._areas)):
            self.copied(vi).clear_all()
        return restored

