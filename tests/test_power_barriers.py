"""The durability barriers of issue 12, each against a power cut (a device
that loses what it has not flushed: drivers/powerloss.py), in process.

Each test is a hole found on the first version; each fails without its
barrier: OOS cleared before B was durable (hole 1), a C copy-on-write not
durable before its copied bit (hole 2), an image marked clean before A was
flushed (hole 3), a reformatted primary that was never fully copied
(hole 4, session identity)."""

from __future__ import annotations

import asyncio

import pytest

from firmware.primary import Primary
from testbench.powercut import PowerPair

pytestmark = pytest.mark.timeout(60)
T = 65536
SIZE = 128 * T


def blk(ch: str, n: int = T) -> bytes:
    return ch.encode() * n


def make_pair(nvram_bytes: int = 4 << 20) -> PowerPair:
    """One volume; A, B, C and both NVRAM regions behind volatile filters in
    the primary's and the secondary's power domains (testbench/powercut.py)."""
    return PowerPair(volumes=("vol0",), volume_bytes=SIZE, track_bytes=T, primary_nvram=nvram_bytes,
                     secondary_nvram=1 << 20)


async def steady() -> PowerPair:
    pair = make_pair()
    await pair.establish()  # the initial copy: C established
    return pair


def test_hole_1_a_track_is_resent_unless_b_was_durable_when_its_oos_bit_cleared():
    async def main():
        pair = await steady()
        p = pair.primary
        await p.write("vol0", 3 * T, blk("X"))
        await p.quiesce()
        await p.run()
        assert await p.drain()  # track 3 in B; its OOS bit clear
        await pair.cut("secondary")  # before prepare: what B did not flush is gone
        s = pair.secondary
        await p.cg_fail("the secondary lost power")
        await p.cycle.connect()
        assert await p.form_cg()
        assert await s.read_c("vol0", 3 * T, T) == blk("X"), "an acknowledged write never reached C"
        assert await s.read_c("vol0", 0, SIZE) == await p.read("vol0", 0, SIZE)
    asyncio.run(main())


def test_hole_2_a_copied_grain_of_c_survives_a_power_cut_before_commit():
    async def main():
        pair = await steady()
        p = pair.primary
        await p.write("vol0", 0, blk("1"))
        assert await p.form_cg()  # C holds "1" at track 0 (read through B)
        await p.write("vol0", 0, blk("2"))
        await p.quiesce()
        await p.run()
        assert await p.drain()  # track 0 copied B -> C ("1"), then B = "2"
        await pair.cut("secondary")
        s = pair.secondary
        assert s.committed_cg == p.status()["committed_seq"]
        assert await s.read_c("vol0", 0, T) == blk("1"), "C lost the last committed CG"
    asyncio.run(main())


def test_hole_3_an_evicted_clean_image_was_durable_on_a():
    async def main():
        pair = make_pair(nvram_bytes=2 << 20)  # a small cache: images get evicted
        await pair.open_secondary()
        p = await pair.open_primary()
        assert await p.form_cg()
        await p.write("vol0", 2 * T, blk("X"))
        await p.destager.destage()  # clean: evictable
        slots = p.plan.n_slots
        for t in range(3, 3 + slots + 1):  # more other tracks than slots: track 2's slot is taken
            await p.write("vol0", t * T, blk("o"))
            await p.destager.destage()
        assert not p.cache.has(0, 2), "track 2 was not evicted; the test proves nothing"
        await pair.cut("primary")
        p = pair.primary
        assert await p.read("vol0", 2 * T, T) == blk("X"), "an acknowledged write was lost from A"
    asyncio.run(main())


def test_hole_4_a_reformatted_primary_gets_a_full_copy_and_c_converges_to_a():
    async def main():
        pair = await steady()
        p = pair.primary
        await p.write("vol0", T, blk("X"))
        assert await p.form_cg()
        await p.write("vol0", 2 * T, blk("Y"))  # on A (destaged), never in a CG
        await p.destager.destage()
        await p.stop()
        # The NVRAM is formatted again (or replaced): its OOS bit for track 2 is gone.
        pair.primary = Primary({"vol0": p.devices[0]}, pair.pdom.regions[0], pair.clock, pair.params, pair.remote)
        await pair.primary.open(format=True)
        assert pair.primary.oos_tracks() == 0
        await pair.primary.start(form_cgs=False, destage=False)
        q = pair.primary
        assert q.oos_tracks() == SIZE // T, "a new format generation did not demand a full copy"
        assert await q.form_cg()
        assert await pair.secondary.read_c("vol0", 0, SIZE) == await q.read("vol0", 0, SIZE)
        # Once C descends from this format, a reconnect is no full copy.
        await q.cycle.connect()
        assert q.oos_tracks() == 0
    asyncio.run(main())
