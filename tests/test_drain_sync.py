"""Drainer.sync shared by concurrent callers (drain workers every SYNC_BATCH
sends, send-first host writes): one sync runs at a time, and the callers
that waited for it share the next one."""

from __future__ import annotations

import asyncio

from firmware_doubles import make_rig

T = 65536


def test_callers_waiting_for_a_sync_share_the_next_one_while_sends_go_on():
    """Five callers wait while a sync runs; sends go on during every sync.
    They share one more sync and every track they sent is cleared from OOS.
    Before, each ran one of its own in turn (each found a batch of tracks
    sent meanwhile): six syncs, the last caller waiting for five."""

    async def main():
        rig = await make_rig(policy="send-first")
        p = rig.primary
        assert await p.form_cg()
        await p.destager.destage()
        for t in range(16):
            await p.write("vol0", t * T, bytes([t + 1]) * 4096)
        seq = await p.quiesce()
        await p.run()
        drainer = p.cycle.drainer
        inner_sync = rig.remote.sync
        release = asyncio.Event()
        syncs = []
        more = iter(range(8, 16))

        async def sync(cg_seq):
            syncs.append(cg_seq)
            if len(syncs) == 1:
                await release.wait()
            # The drain goes on while the secondary flushes: a track sent now
            # is not in this sync's batch.
            t = next(more, None)
            if t is not None:
                await drainer.send_old(0, t, seq)
            await inner_sync(cg_seq)

        rig.remote.sync = sync
        await drainer.send_old(0, 0, seq)
        first = asyncio.ensure_future(drainer.sync(seq))
        await asyncio.sleep(0)
        assert syncs == [seq]  # held
        for t in range(1, 6):
            await drainer.send_old(0, t, seq)
        waiters = [asyncio.ensure_future(drainer.sync(seq)) for _ in range(5)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *waiters), 5)
        assert len(syncs) == 2
        for t in range(6):
            assert not p.oos[0].test(t), f"track {t} was sent before the waiters called and is still in OOS"
        assert await p.drain()
        await p.commit_cg()
        assert p.oos_tracks() == 0

    asyncio.run(main())
