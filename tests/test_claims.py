"""One test per claim group of DESIGN.md section 1, named after the claims,
each walking the claimed behaviour step by step on an in-process Primary and
Secondary (mem:// devices, virtual clock)."""

from __future__ import annotations

import asyncio

import pytest
from firmware_doubles import make_rig, settle, spy_rig_remote

from firmware.cg import Phase
from firmware.crashpoints import CrashPoints
from firmware.drain import BEFORE_OOS_CLEAR

pytestmark = pytest.mark.timeout(60)
T = 65536


def blk(ch: str, n: int = 4096) -> bytes:
    return ch.encode() * n


async def steady(rig):
    """Finish the full initial copy so the pair is in its steady state."""
    assert await rig.primary.form_cg()
    await rig.primary.destager.destage()
    assert rig.primary.oos_tracks() == 0


def spy_points(rig, seen: list, probe) -> None:
    cps = CrashPoints(lambda name: seen.append((name, probe())))
    rig.primary.crashpoints = cps
    return cps


def test_claims_1_11_21_drain_forms_consistent_set_and_cr_is_created_while_acks_are_held():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        await p.write("vol0", 1 * T, blk("1"))  # acknowledged before the CG
        await p.quiesce()
        # A host writing concurrently: what the CG looked like when its write() returned.
        acked_in: list[tuple[Phase, bool]] = []

        async def host():
            await p.write("vol0", 2 * T, blk("2"))
            acked_in.append((p.machine.phase, p.machine.recording))

        held = asyncio.ensure_future(host())
        await settle()
        # The write landed in the cache (reads see it) and set OOS, not CR: it
        # belongs to the CG being formed ...
        assert p.cache.has(0, 2) and await p.read("vol0", 2 * T, 4096) == blk("2")
        assert p.oos[0].test(2) and p.cr[0].count() == 0
        # ... but its acknowledgement is held: write() has not returned.
        assert acked_in == [] and not held.done()
        await p.run()  # RECORDING_ON: CR created, then the held acks released
        await settle()
        # The host saw its ack only once change recording was on (CR existed).
        assert acked_in == [(Phase.DRAINING, True)]
        # Drain: the OOS tracks form the consistent set at the secondary.
        assert await p.drain()
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 1 * T, 4096) == blk("1")
        assert await rig.secondary.read_c("vol0", 2 * T, 4096) == blk("2")
    asyncio.run(main())


def test_claims_2_12_22_after_cr_exists_held_acks_are_released_and_new_writes_set_cr():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        await p.write("vol0", 3 * T, blk("a"))
        await p.quiesce()
        held = [asyncio.ensure_future(p.write("vol0", i * T, blk("h"))) for i in (4, 5)]
        await settle()
        assert not any(h.done() for h in held)
        await p.run()
        await settle()
        assert all(h.done() for h in held)  # released once CR exists
        oos_before = p.oos[0].set_tracks()
        await p.write("vol0", 9 * T, blk("n"))  # new write: recorded in CR, not OOS
        assert p.cr[0].set_tracks() == [9]
        assert p.oos[0].set_tracks() == oos_before and 9 not in oos_before
        assert await p.drain()
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 9 * T, 4096) == bytes(4096)  # not in this CG
        assert p.oos[0].set_tracks() == [9] and p.cr[0].count() == 0  # swap: CR became OOS
        assert await p.form_cg()
        assert await rig.secondary.read_c("vol0", 9 * T, 4096) == blk("n")
    asyncio.run(main())


def test_claims_3_13_23_send_first_sends_the_cached_image_clears_oos_then_writes():
    async def main():
        rig = await make_rig(policy="send-first")
        p = rig.primary
        await steady(rig)
        spy = spy_rig_remote(rig)
        await p.write("vol0", 5 * T, blk("X"))  # cached old image
        await p.quiesce()
        await p.run()
        assert p.oos[0].test(5)
        at_send = []
        spy.before_send = lambda v, t, d: at_send.append((t, bytes(d[:4]), p.oos[0].test(t)))
        await p.write("vol0", 5 * T, blk("Y"))
        # The old image went out first, with OOS still set; then OOS was cleared ...
        assert at_send == [(5, b"XXXX", True)]
        assert not p.oos[0].test(5)
        # ... and the write was processed (recorded in CR, visible to reads).
        assert p.cr[0].test(5)
        assert await p.read("vol0", 5 * T, 4096) == blk("Y")
        assert p.cache.stats()["new"] == 0  # send-first never makes a second image
        assert await p.drain()
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 5 * T, 4096) == blk("X")
    asyncio.run(main())


def test_claims_4_14_24_dual_image_applies_a_write_to_the_existing_new_image():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        spy = spy_rig_remote(rig)
        await p.write("vol0", 6 * T, blk("X"))
        await p.quiesce()
        await p.run()
        await p.write("vol0", 6 * T, blk("Y"))  # allocates the new image (claim 6)
        cur, new = p.cache.images(0, 6)
        used = p.cache.used()
        await p.write("vol0", 6 * T + 4096, blk("Z"))  # applied to the existing new image
        assert p.cache.images(0, 6) == (cur, new) and p.cache.used() == used
        assert new.valid.count() == 16 and cur.valid.count() == 8
        assert spy.log == []  # nothing sent by the writes
        assert await p.read("vol0", 6 * T, 8192) == blk("Y") + blk("Z")
        assert await p.drain()
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 6 * T, 8192) == blk("X") + bytes(4096)
    asyncio.run(main())


def test_claims_5_15_25_normal_processing_when_not_recording_or_oos_clear():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        spy = spy_rig_remote(rig)
        # Not recording: the write lands in the (only) image and sets OOS.
        await p.write("vol0", 7 * T, blk("a"))
        assert p.oos[0].test(7) and p.cr[0].count() == 0
        assert p.cache.images(0, 7)[1] is None
        await p.quiesce()
        await p.run()
        # Recording, OOS clear on track 8: normal processing, recorded in CR, no send.
        await p.write("vol0", 8 * T, blk("b"))
        cur, new = p.cache.images(0, 8)
        assert cur is not None and new is None and p.cr[0].test(8) and not p.oos[0].test(8)
        assert spy.log == []
        await p.drain()
        await p.commit_cg()
    asyncio.run(main())


def test_claims_6_16_26_dual_image_allocates_a_new_image_and_falls_back_without_a_slot():
    async def main():
        rig = await make_rig(nvram_bytes=28672 + 16 * T, size="2MiB")
        p = rig.primary
        assert p.cache.n_slots == 16
        await steady(rig)
        spy = spy_rig_remote(rig)
        await p.write("vol0", 1 * T, blk("X"))
        await p.quiesce()
        await p.run()
        await p.write("vol0", 1 * T, blk("Y"))  # OOS set, no new image: allocate one
        cur, new = p.cache.images(0, 1)
        assert cur is not None and new is not None and p.cache.stats()["dual"] == 1
        assert spy.log == [] and p.oos[0].test(1)
        assert await p.drain()
        await p.commit_cg()
        await p.destager.destage()
        # Every slot dirty (nothing evictable), then a CG: no slot for a new image.
        for t in range(16):
            await p.write("vol0", t * T, blk("O"))
        assert p.cache.available() == 0
        await p.quiesce()
        await p.run()
        await p.write("vol0", 0, blk("N"))
        assert p.fallbacks == 1
        assert [e[2] for e in spy.log if e[0] == "send"][-1:] == [0]  # old image sent first
        assert not p.oos[0].test(0) and p.cr[0].test(0) and p.cache.images(0, 0)[1] is None
        assert await p.drain()
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 0, 4096) == blk("O")
        assert await p.read("vol0", 0, 4096) == blk("N")
    asyncio.run(main())


def test_claims_7_17_27_old_image_discarded_and_oos_cleared_only_after_it_was_sent():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        spy = spy_rig_remote(rig)
        await p.write("vol0", 4 * T, blk("X", 8192))  # old image: sectors 0..15
        await p.quiesce()
        await p.run()
        await p.write("vol0", 4 * T + 4096, blk("Y"))  # new image: sectors 8..15
        # Destage while OOS is set: the old image may reach A, the new one never.
        await p.destager.destage()
        a = rig.a["vol0"]
        assert await a.read(4 * T // 512, 16) == blk("X", 8192)
        states = []
        spy.before_send = lambda v, t, d: states.append(
            (t, bytes(d[:8192]) == blk("X", 8192), p.oos[0].test(t), p.cache.images(0, t)[1] is not None))
        seen = []
        cps = spy_points(rig, seen, lambda: (p.oos[0].test(4), p.cache.images(0, 4)[1] is not None))
        cps.arm(BEFORE_OOS_CLEAR)  # track 4 is the only OOS track
        assert await p.drain()
        # While being sent: old image content, OOS set, both images present.
        assert (4, True, True, True) in states
        # Sent and durable in B, OOS not yet cleared: the old image was discarded
        # when the secondary had it (claim 7's order: discard, then clear OOS).
        assert seen == [(BEFORE_OOS_CLEAR, (True, False))]
        # After: OOS clear; the new image is the only image and holds old sectors in its holes.
        cur, new = p.cache.images(0, 4)
        assert new is None and cur.valid.count() == 16 and not p.oos[0].test(4)
        assert await p.read("vol0", 4 * T, 8192) == blk("X") + blk("Y")
        await p.destager.destage()
        assert await a.read(4 * T // 512, 16) == blk("X") + blk("Y")
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 4 * T, 8192) == blk("X", 8192)
    asyncio.run(main())


def test_claims_8_18_28_oos_updated_by_writes_cr_updated_while_oos_drains():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        for t in (1, 2, 3, 4):
            await p.write("vol0", t * T, blk(str(t)))
        assert p.oos[0].set_tracks() == [1, 2, 3, 4] and p.cr[0].count() == 0
        await p.quiesce()
        await p.run()
        p.params.drain_inflight = 1
        remaining = [1, 2, 3, 4]
        for t in (10, 11, 12, 13):
            await p.drain(limit=1)
            remaining.pop(0)
            assert p.oos[0].set_tracks() == remaining  # OOS drains ...
            await p.write("vol0", t * T, blk("c"))
            assert p.cr[0].test(t) and not p.oos[0].test(t)  # ... while CR records
        assert p.cr[0].set_tracks() == [10, 11, 12, 13]
        await p.commit_cg()
    asyncio.run(main())


def test_claims_9_19_29_oos_cleared_after_the_block_was_copied():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        spy = spy_rig_remote(rig)
        for t in (3, 7):
            await p.write("vol0", t * T, blk("s"))
        await p.quiesce()
        await p.run()
        during = []
        spy.before_send = lambda v, t, d: during.append((t, p.oos[0].test(t)))
        spy.fail_sends = True
        with pytest.raises(ConnectionError):
            await p.drain()
        assert p.oos[0].set_tracks() == [3, 7]  # not copied: not cleared
        spy.fail_sends = False
        assert await p.drain()
        assert sorted(during) == [(3, True), (3, True), (7, True), (7, True)]  # set while being copied
        assert p.oos[0].count() == 0  # cleared after
        await p.commit_cg()
        assert await rig.secondary.read_c("vol0", 7 * T, 4096) == blk("s")
    asyncio.run(main())


def test_claims_10_20_30_run_resumes_writes_records_in_cr_and_drains_oos():
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        await p.write("vol0", 2 * T, blk("o"))
        await p.quiesce()
        held = asyncio.ensure_future(p.write("vol0", 3 * T, blk("q")))
        await settle()
        assert not held.done()
        await p.run()  # the run command
        await settle()
        assert held.done()  # host writes resume
        await p.write("vol0", 30 * T, blk("r"))
        assert p.cr[0].set_tracks() == [30] and not p.oos[0].test(30)  # CR instead of OOS
        assert p.oos[0].set_tracks() == [2, 3]
        assert await p.drain()  # OOS copied
        assert p.oos[0].count() == 0
        await p.commit_cg()
        for t, ch in ((2, "o"), (3, "q")):
            assert await rig.secondary.read_c("vol0", t * T, 4096) == blk(ch)
    asyncio.run(main())
