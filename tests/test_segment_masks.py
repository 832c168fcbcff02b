"""Segment-granular drain (issue 15): a track goes to the secondary as the
4 KiB segments its image's mask names, and the mask never forgets a segment
B may lack (firmware/layout.py has the rules, firmware/cache.py keeps them)."""

from __future__ import annotations

import asyncio

import pytest

from firmware import layout as L
from firmware.errors import NvramError
from tests.firmware_doubles import make_rig

T = 65536
S = L.SEGMENT_BYTES


def blk(ch: str, n: int = 4096) -> bytes:
    return ch.encode() * n


def spy_runs(rig) -> list:
    """(track, runs or None) of every track the secondary receives."""
    got: list = []
    receive = rig.secondary.receive_track

    async def spy(volume, track, cg_seq, data, runs=None):
        got.append((track, runs))
        await receive(volume, track, cg_seq, data, runs)

    rig.secondary.receive_track = spy
    return got


async def steady(rig) -> None:
    assert await rig.primary.form_cg()
    await rig.primary.destager.destage()
    assert rig.primary.oos_tracks() == 0


async def b_equals_a(rig, tracks) -> None:
    b = rig.bc["vol0"][0]
    p = rig.primary
    for t in tracks:
        want = await p.read("vol0", t * T, T)
        assert await b.read(t * T // 512, T // 512) == want, f"B differs from the primary at track {t}"


def test_a_4k_write_goes_as_one_run_and_its_mask_empties_once_b_is_durable():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        got = spy_runs(rig)
        await p.write("vol0", 3 * T + 2 * S, blk("a"))
        entry = p.cache.images(0, 3)[0]
        assert p.cache.segment_mask(entry) == 0b100
        assert await p.form_cg()
        assert got == [(3, [(2 * S, S)])]
        assert entry.segs == 0 and p.cache.segment_mask(entry) == 0
        await b_equals_a(rig, [3])
    asyncio.run(main())


def test_an_image_allocated_for_a_track_that_owes_starts_full():
    """Track 5's first write is destaged and its image evicted before any
    CG: a second write allocates a new image that cannot know the first,
    so the track must go whole (B would lack the first write otherwise)."""
    async def main():
        rig = await make_rig(nvram_bytes=1280 << 10)  # a cache of ~17 slots
        p = rig.primary
        await steady(rig)
        got = spy_runs(rig)
        await p.write("vol0", 5 * T, blk("f"))
        await p.destager.destage()
        for t in range(6, 6 + p.cache.n_slots + 2):  # evict track 5's clean image
            await p.write("vol0", t * T, blk("x"))
            await p.destager.destage()
        assert not p.cache.has(0, 5) and p.oos[0].test(5)
        await p.write("vol0", 5 * T + 3 * S, blk("g"))
        assert p.cache.segment_mask(p.cache.images(0, 5)[0]) == p.cache.seg_full
        assert await p.form_cg()
        assert (5, None) in got  # whole
        await b_equals_a(rig, [5])
    asyncio.run(main())


def test_writes_after_the_send_stay_in_the_mask_after_sync():
    async def main():
        rig = await make_rig(policy="send-first")
        p = rig.primary
        await steady(rig)
        await p.write("vol0", 4 * T, blk("s"))
        seq = await p.quiesce()
        await p.run()
        drainer = p.cycle.drainer
        await drainer.send_old(0, 4, seq)  # sent, B not yet durable: OOS stays
        assert p.oos[0].test(4)
        await p.write("vol0", 4 * T + 3 * S, blk("t"))  # lands in the image, records in CR
        entry = p.cache.images(0, 4)[0]
        assert entry.segs == 0b1001  # until sync: what was sent and what came after
        await drainer.sync(seq)
        assert not p.oos[0].test(4) and p.cr[0].test(4)
        assert entry.segs == 0b1000  # B durable for segment 0: only the later write is owed
        assert await p.drain()
        await p.commit_cg()
        got = spy_runs(rig)
        assert await p.form_cg()
        assert got == [(4, [(3 * S, S)])]
        await b_equals_a(rig, [4])
    asyncio.run(main())


def test_dual_image_new_writes_are_what_remains_after_the_old_image_is_synced():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        await p.write("vol0", 7 * T + S, blk("o"))
        await p.quiesce()
        await p.run()
        await p.write("vol0", 7 * T + 5 * S, blk("n"))  # the track owes: a new image
        assert p.cache.images(0, 7)[1] is not None
        got = spy_runs(rig)
        assert await p.drain()
        assert got == [(7, [(S, S)])]  # the old image's segment only
        await p.commit_cg()
        assert p.cache.images(0, 7)[0].segs == 1 << 5
        got.clear()
        assert await p.form_cg()
        assert got == [(7, [(5 * S, S)])]
        await b_equals_a(rig, [7])
    asyncio.run(main())


def test_masks_are_read_back_after_a_crash_and_a_full_copy_voids_them():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        await p.write("vol0", 2 * T + S, blk("m"))
        await p.write("vol0", 2 * T + 9 * S, blk("m", 2 * S))
        q = await rig.reopen_primary()  # the first one abandoned, not stopped
        entry = q.cache.images(0, 2)[0]
        assert q.cache.segment_mask(entry) == (1 << 1) | (1 << 9) | (1 << 10)
        epoch = q.region.record["mask_epoch"]
        q.oos[0].set_range(0, q.oos[0].tracks)  # a full copy: every track whole, whatever its mask
        assert q.region.record["mask_epoch"] == epoch + 1
        assert q.cache.segment_mask(entry) == q.cache.seg_full
        r = await rig.reopen_primary()
        assert r.cache.segment_mask(r.cache.images(0, 2)[0]) == r.cache.seg_full
    asyncio.run(main())


def test_a_region_of_the_previous_layout_is_refused_with_a_clear_message():
    async def main():
        rig = await make_rig()
        p = rig.primary
        header = dict(p.region._header)
        p.region._header_store.write(dict(header, version=2))
        with pytest.raises(NvramError, match="layout version 2.*format again"):
            await rig.reopen_primary()
    asyncio.run(main())


def test_runs_of_a_mask():
    from firmware.drain import segment_runs
    assert segment_runs(0b1, T) == [(0, S)]
    assert segment_runs(0b1101, T) == [(0, S), (2 * S, 2 * S)]
    assert segment_runs(1 << 15, T) == [(15 * S, S)]
    assert segment_runs(0b11, 6144) == [(0, 6144)]  # clipped to a short last track
    assert segment_runs(0, T) == []
