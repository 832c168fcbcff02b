"""Crash recovery, timers, commands and policies of the in-process primary."""

from __future__ import annotations

import asyncio

import pytest
from firmware_doubles import Crash, make_rig, settle

from firmware.cgcycle import AFTER_COMMIT, AFTER_PREPARE
from firmware.drain import BEFORE_OOS_CLEAR, MID_DRAIN
from firmware.errors import NvramError
from firmware.hostpath import AFTER_CACHE_WRITE
from firmware.primary import Primary

pytestmark = pytest.mark.timeout(60)
T = 65536


def blk(ch: str, n: int = 4096) -> bytes:
    return ch.encode() * n


@pytest.mark.parametrize("point", [MID_DRAIN, BEFORE_OOS_CLEAR, AFTER_PREPARE, AFTER_COMMIT])
@pytest.mark.parametrize("policy", ["dual-image", "send-first"])
def test_reopen_after_abandoned_mid_cg_loses_no_acked_write_and_merges_cr(point, policy):
    async def main():
        rig = await make_rig(policy=policy)
        p = rig.primary
        assert await p.form_cg()
        acked = {}
        for t in (1, 2, 3):
            await p.write("vol0", t * T, blk(str(t)))
            acked[t] = blk(str(t))
        await p.quiesce()
        await p.run()
        await p.write("vol0", 2 * T + 4096, blk("n"))  # new image (dual) or send-first
        await p.write("vol0", 9 * T, blk("c"))  # CR only
        acked[9] = blk("c")
        p.crashpoints.arm(point)
        with pytest.raises(Crash):
            await p.drain()
            await p.commit_cg()
        # abandoned, not stopped: a new controller on the same NVRAM bytes
        q = await rig.reopen_primary()
        assert q.recovered["cg_in_flight"] and q.cr_tracks() == 0 and not q.cache.with_new
        assert q.oos[0].test(9) and q.oos[0].test(2)  # CR bits merged into OOS
        for t, data in acked.items():
            assert await q.read("vol0", t * T, 4096) == data
        assert await q.read("vol0", 2 * T + 4096, 4096) == blk("n")
        await q.start(form_cgs=False, destage=False)
        assert await q.form_cg()
        for t, data in acked.items():
            assert await rig.secondary.read_c("vol0", t * T, 4096) == data
        assert await rig.secondary.read_c("vol0", 2 * T + 4096, 4096) == blk("n")
    asyncio.run(main())


def test_crash_after_cache_write_keeps_the_write_and_its_oos_bit():
    async def main():
        rig = await make_rig()
        p = rig.primary
        p.crashpoints.arm(AFTER_CACHE_WRITE)
        with pytest.raises(Crash):
            await p.write("vol0", 5 * T, blk("k"))
        q = await rig.reopen_primary()
        assert q.oos[0].test(5) and await q.read("vol0", 5 * T, 4096) == blk("k")
    asyncio.run(main())


def test_unformatted_or_mismatched_nvram_is_a_clear_error():
    async def main():
        rig = await make_rig()
        rig.pnv.buf[0:8192] = b"\x55" * 8192  # both header copies damaged
        with pytest.raises(NvramError, match="no readable header"):
            await rig.reopen_primary()
        from drivers.mem import open as open_mem
        rig2 = await make_rig()
        other = Primary({"vol0": open_mem("mem://?size=8MiB")}, rig2.pnv, rig.clock, rig.params, rig.remote)
        with pytest.raises(NvramError, match="formatted for volumes"):
            await other.open()
    asyncio.run(main())


def test_coordination_timeout_fails_the_cg_and_releases_acks():
    async def main():
        rig = await make_rig(form_cgs=False)
        p = rig.primary
        assert await p.form_cg()

        async def slow_master():
            await rig.clock.sleep(1.0)
        p.coordinate = slow_master
        await p.write("vol0", 3 * T, blk("z"))
        cg = asyncio.ensure_future(p.form_cg())
        await settle()
        held = asyncio.ensure_future(p.write("vol0", 4 * T, blk("h")))
        await settle()
        assert p.machine.phase.value == "quiescing" and not held.done()
        rig.clock.advance(0.051)
        await settle()
        assert cg.done() and cg.result() is False and held.done()
        s = p.status()
        assert s["total_failed_cgs"] == 1 and s["phase"] == "idle" and p.oos[0].set_tracks() == [3, 4]
    asyncio.run(main())


def test_drain_timeout_fails_then_untimed_cg_after_max_failures():
    async def main():
        rig = await make_rig(max_drain_s=1.0, max_failures_before_untimed=2, drain_inflight=1)
        p = rig.primary
        orig = rig.remote.send_track

        async def slow(volume, track, seq, data):
            await rig.clock.sleep(0.4)
            await orig(volume, track, seq, data)
        rig.remote.send_track = slow
        results = []
        for _ in range(3):
            cg = asyncio.ensure_future(p.form_cg())
            while not cg.done():
                await settle()
                rig.clock.advance(0.2)
            results.append(cg.result())
        # 64 tracks x 0.4 s cannot drain in 1 s: two timed failures, then one untimed CG commits
        assert results == [False, False, True]
        assert p.status()["total_failed_cgs"] == 2 and p.status()["consecutive_failures"] == 0
    asyncio.run(main())


def test_pause_resume_suspend_and_status_metrics():
    async def main():
        rig = await make_rig(form_cgs=True, cg_interval_s=1.0)
        p = rig.primary
        for _ in range(5):
            await settle()
            rig.clock.advance(1.0)
        assert p.status()["total_successful_cgs"] >= 1
        await p.write("vol0", 0, blk("a"))
        rig.clock.advance(2.5)
        assert p.status()["data_exposure_s"] > 0
        await p.cg_pause()
        assert p.status()["copy_state"] == "Paused"
        n = p.status()["total_successful_cgs"]
        for _ in range(3):
            rig.clock.advance(1.0)
            await settle()
        assert p.status()["total_successful_cgs"] == n
        await p.cg_resume()
        for _ in range(3):
            rig.clock.advance(1.0)
            await settle()
        assert p.status()["total_successful_cgs"] > n and p.status()["oos_tracks"] == 0
        await p.suspend()
        await p.write("vol0", T, blk("s"))
        assert p.status()["copy_state"] == "Suspended" and p.bitmap("oos", "vol0")["runs"] == [[1, 2]]
        await p.resume_pair()
        for _ in range(3):
            rig.clock.advance(1.0)
            await settle()
        assert await rig.secondary.read_c("vol0", T, 4096) == blk("s")
        assert set(p.status()) >= {"copy_state", "held_ack_ms", "recoverable", "severity", "link"}
        await p.stop()
    asyncio.run(main())


def test_both_policies_produce_the_same_consistent_copy():
    async def run(policy):
        rig = await make_rig(policy=policy)
        p = rig.primary
        assert await p.form_cg()
        for round_ in range(4):
            for t in range(0, 40, 3):
                await p.write("vol0", t * T + (round_ % 4) * 4096, blk(chr(65 + round_)))
            await p.quiesce()
            await p.run()
            for t in range(0, 40, 5):
                await p.write("vol0", t * T, blk(chr(97 + round_)))
                await p.drain(limit=2)
            assert await p.drain()
            await p.commit_cg()
        return await rig.secondary.read_c("vol0", 0, 40 * T), await p.read("vol0", 0, 40 * T)
    async def main():
        c1, a1 = await run("dual-image")
        c2, a2 = await run("send-first")
        assert c1 == c2 and a1 == a2 and c1 != a1
    asyncio.run(main())


def test_stop_in_the_middle_of_a_cg_leaves_no_body_running():
    """Root cause: stop cancelled the CG loop while form_cg waited on its
    body; form_cg's cleanup forgot the body, which went on draining and then
    signalled DRAINED to a machine stop had already failed to idle
    (InvalidTransition in a task nobody awaited, logged at ERROR on SIGTERM)."""
    async def main():
        rig = await make_rig(form_cgs=False)
        p = rig.primary
        for t in range(8):
            await p.write("vol0", t * 65536, b"s" * 65536)
        gate = asyncio.Event()
        send = rig.remote.send_track

        async def slow_send(*a):
            await gate.wait()
            await send(*a)

        rig.remote.send_track = slow_send
        p.cycle.start_loop()
        for _ in range(50):
            await asyncio.sleep(0)
            if p.machine.phase.value == "draining":
                break
        assert p.machine.phase.value == "draining"
        body = p.cycle.body
        await p.stop()
        gate.set()
        await asyncio.sleep(0)
        await asyncio.gather(body, return_exceptions=True)
        assert body.cancelled(), f"the CG body outlived stop: {body}"
    asyncio.run(main())
