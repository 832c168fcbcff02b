"""C stays the cut of the last committed CG while host writes, destage,
drain workers, send-first sends and the CG loop interleave across their
awaits (the hypothesis state machine steps them one at a time and so never
saw these). Each targeted test failed before the fix it names; the random
test drives a seeded concurrent workload on jittery devices and link."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from firmware_doubles import jitter_rig, make_rig, settle, spy_rig_remote

from firmware.cg import Phase

pytestmark = pytest.mark.timeout(120)
T = 65536
SECTOR = 512


def blk(ch: str, n: int = 4096) -> bytes:
    return ch.encode() * n


async def steady(rig) -> None:
    assert await rig.primary.form_cg()
    await rig.primary.destager.destage()


def test_send_first_does_not_resend_a_track_the_drain_sent_meanwhile():
    """Root cause: ``_send_old`` sent whatever the track held when called, even
    if another sender had already sent the track and cleared its OOS bit in
    the meantime. A send-first write over two OOS tracks sends them one after
    the other; while it sent the first, the drain sent the second, a write
    landed on it in CR, and the send-first then sent that CR write into B
    under the CG being formed."""
    async def main():
        rig = await make_rig(policy="send-first")
        p = rig.primary
        await steady(rig)
        spy = spy_rig_remote(rig)
        await p.write("vol0", 0, blk("A"))
        await p.write("vol0", T, blk("A"))
        await p.quiesce()
        await p.run()
        assert p.oos[0].set_tracks() == [0, 1]
        drain: list[asyncio.Task] = []

        async def meanwhile(volume, track, data):
            if drain:
                return
            drain.append(asyncio.ensure_future(p.drain()))  # sends track 1 while track 0 is in flight
            await settle()
            assert (0, 1) in p.cycle.drainer.sent  # sent; its OOS bit stays until B is durable
            await p.write("vol0", T + 4096, blk("C"))  # track 1 is past its send: recorded in CR
            assert p.cr[0].test(1)

        spy.before_send = meanwhile
        await p.write("vol0", 0, blk("B", T + 4096))  # send-first of tracks 0 and 1
        assert await drain[0]
        await p.commit_cg()
        c = await rig.secondary.read_c("vol0", T, 8192)
        assert c == blk("A") + bytes(4096), "a CR write reached C in the CG before it"
        assert await p.form_cg()
        assert await rig.secondary.read_c("vol0", 0, T + 8192) == blk("B", T + 4096) + blk("C")
    asyncio.run(main())


def test_pause_that_comes_before_the_cg_body_runs_starts_no_cg():
    """Root cause: the CG loop creates the CG body as a task that starts one
    loop iteration later; a ``cg pause`` in between found the machine idle,
    reported Paused at once, and the CG then started and committed anyway
    while the demo read C across volumes (a read straddling a commit)."""
    async def main():
        hit = 0
        for k in range(12):
            rig = await make_rig(volumes=("v0", "v1"), size="256KiB", form_cgs=True, destage=True)
            p = rig.primary
            for _ in range(200):
                if p.status()["total_successful_cgs"]:
                    break
                await asyncio.sleep(0)
            await p.write("v0", 0, blk("w"))  # wakes the loop waiting for a write
            for _ in range(k):
                await asyncio.sleep(0)
            phase_at_pause = p.machine.phase
            await p.cg_pause()
            assert p.copy_state == "Paused"
            hit += phase_at_pause is Phase.IDLE
            seq, done = p.status()["cg_seq"], p.status()["total_successful_cgs"]
            await settle(100)
            assert p.machine.phase is Phase.IDLE, f"a CG started while Paused (pause after {k} yields)"
            assert (p.status()["cg_seq"], p.status()["total_successful_cgs"]) == (seq, done)
            await p.cg_resume()
            await p.stop()
        assert hit, "no pause came while the machine was idle"
    asyncio.run(main())


def test_c_is_the_last_commit_before_the_first_after_an_abort_and_across_a_restart():
    """Reported, not reproduced in-process (the process-level reports came
    with a device layer that lost B writes, see the report): C shows nothing
    before the first commit, nothing of a CG that aborted after part of it
    reached B, and the same after the secondary reopens its NVRAM."""
    from firmware.secondary import Secondary

    async def main():
        rig = await make_rig(volumes=("v0", "v1"))
        p, s = rig.primary, rig.secondary
        await p.write("v0", 0, blk("a"))
        await p.write("v1", T, blk("b"))
        await p.quiesce()
        await p.run()
        await p.drain(limit=1)  # part of the first CG is in B
        assert await s.read_c("v0", 0, 4096) == bytes(4096) and await s.read_c("v1", T, 4096) == bytes(4096)
        await p.cg_fail("test")
        assert await s.read_c("v0", 0, 4096) == bytes(4096)
        assert await p.form_cg()
        await p.write("v0", 0, blk("c"))
        await p.quiesce()
        await p.run()
        await p.drain(limit=1)
        await p.cg_fail("test")
        assert await s.read_c("v0", 0, 4096) == blk("a") and await s.read_c("v1", T, 4096) == blk("b")
        again = Secondary(rig.bc, rig.snv, rig.clock, grain_bytes=T)
        await again.open()
        assert await again.read_c("v0", 0, 4096) == blk("a")
    asyncio.run(main())


def test_a_write_whose_only_evictable_slot_is_its_own_track_waits_instead_of_failing():
    """CacheFull ('all N cache slots hold dirty or new images') from allocate
    inside HostPath.land, the host saw EIO. Root cause (fixed in 1126894, this pins
    it): the room check counted the write's own clean images as evictable,
    but landing applies to them first (making them dirty), so the allocation
    for the next track of the same write found nothing to evict. A write must
    wait for destage (back-pressure), never fail because the cache is busy."""
    async def main():
        rig = await make_rig(size="8MiB")
        p = rig.primary
        n = p.plan.n_slots
        assert n + 2 <= 128, "the volume must have more tracks than the cache has slots"
        await p.write("vol0", 0, blk("0"))
        for t in range(10, 10 + n - 1):
            await p.write("vol0", t * T, blk("x"))
        await p.destager.destage()
        for t in range(10, 10 + n - 1):  # dirty again; track 0 is the only clean image, no slot is free
            await p.write("vol0", t * T, blk("y"))
        assert p.cache.stats()["used"] == n and p.cache.dirty_count() == n - 1
        await p.write("vol0", T - 4096, blk("w", 8192))  # track 0 (its clean image) and track 1 (needs a slot)
        assert await p.read("vol0", T - 4096, 8192) == blk("w", 8192)
    asyncio.run(main())


# ---------------------------------------------------------------------------
# seeded random concurrent workload
# ---------------------------------------------------------------------------


def stamp(wid: int, vol: int, sector: int, n: int) -> bytes:
    return b"".join(struct.pack("<QQ", wid, vol * 10**9 + sector + i) * 32 for i in range(n))


def ids(data: bytes) -> list[int]:
    return [struct.unpack_from("<Q", data, i * SECTOR)[0] for i in range(len(data) // SECTOR)]


class Workload:
    """Writers issue partial-track, unaligned, overlapping writes (never two in
    flight on one sector, like a host), the CG loop and the destager run,
    and a checker pauses CG formation, reads C and compares it with the
    primary's content at the CR switch of the last committed CG (the model
    is updated right where a write lands, with no await in between)."""

    def __init__(self, rig, rng: random.Random, sizes: tuple[int, ...]) -> None:
        self.rig, self.rng, self.sizes = rig, rng, sizes
        p = rig.primary
        self.vols = p.names
        self.sectors = p.devices[0].info.size_bytes // SECTOR
        self.content = [[0] * self.sectors for _ in self.vols]
        self.acked = [[0] * self.sectors for _ in self.vols]
        self.snap: dict[int, list[list[int]]] = {}
        self.cut = [[0] * self.sectors for _ in self.vols]
        self.cut_seq = 0
        self.wid = 0
        self.busy: dict[tuple[int, int], asyncio.Future] = {}
        self.problems: list[str] = []
        land = p.host.land

        async def landing(vi, offset, mv):
            await land(vi, offset, mv)
            s = offset // SECTOR
            self.content[vi][s : s + mv.nbytes // SECTOR] = ids(bytes(mv))

        p.host.land = landing
        p.events.subscribe(self._on_event)

    def _on_event(self, ev) -> None:
        if ev.obj != "cg":
            return
        if ev.action == "change" and ev.fields.get("phase") == "draining":  # the CR switch
            self.snap[ev.fields["seq"]] = [list(c) for c in self.content]
        elif ev.action == "destroy" and ev.fields.get("result") == "committed":
            self.cut_seq, self.cut = ev.fields["seq"], self.snap.pop(ev.fields["seq"])

    async def writer(self, total: int) -> None:
        p, rng = self.rig.primary, self.rng
        while self.wid < total:
            v = rng.randrange(len(self.vols))
            n = min(rng.choice(self.sizes), self.sectors)
            s0 = rng.randrange(0, self.sectors - n + 1)
            keys = [(v, s) for s in range(s0, s0 + n)]
            while waits := {id(f): f for k in keys if (f := self.busy.get(k)) is not None}:
                await asyncio.gather(*waits.values())
            self.wid += 1
            me = self.wid
            done = asyncio.get_running_loop().create_future()
            for k in keys:
                self.busy[k] = done
            try:
                await p.write(self.vols[v], s0 * SECTOR, stamp(me, v, s0, n))
                for s in range(s0, s0 + n):
                    self.acked[v][s] = max(self.acked[v][s], me)
            finally:
                for k in keys:
                    if self.busy.get(k) is done:
                        del self.busy[k]
                done.set_result(None)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)

    async def read_c(self) -> list[list[int]]:
        s = self.rig.secondary
        return [ids(await s.read_c(v, 0, self.sectors * SECTOR)) for v in self.vols]

    async def check_c(self, total: int) -> None:
        p = self.rig.primary
        while self.wid < total:
            for _ in range(self.rng.randint(20, 200)):
                await asyncio.sleep(0)
            await p.cg_pause()
            seq = self.cut_seq
            c = await self.read_c()
            if p.machine.phase is not Phase.IDLE or seq != self.cut_seq:
                self.problems.append(f"a CG ran while Paused (cut {seq} -> {self.cut_seq})")
            self._compare(c, self.cut, f"C vs the cut of CG {seq} at write {self.wid}")
            await p.cg_resume()

    def _compare(self, got, want, what: str) -> None:
        bad = [(v, s, got[v][s], want[v][s]) for v in range(len(self.vols)) for s in range(self.sectors)
               if got[v][s] != want[v][s]]
        if bad:
            self.problems.append(f"{what}: {len(bad)} sectors differ, first (vol, sector, got, want) {bad[:3]}")

    async def run(self, total: int, writers: int) -> None:
        p, clock = self.rig.primary, self.rig.clock
        await p.start(form_cgs=True, destage=True)
        ticking = [True]

        async def ticker():  # virtual time moves with the event loop: timers fire, deterministically
            while ticking[0]:
                await asyncio.sleep(0)
                clock.advance(0.0005)

        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(*(self.writer(total) for _ in range(writers)), self.check_c(total))
        for v, name in enumerate(self.vols):
            a = ids(await p.read(name, 0, self.sectors * SECTOR))
            self._compare([a if i == v else self.content[i] for i in range(len(self.vols))], self.content,
                          f"primary {name} vs landed writes")
            if any(a[s] < self.acked[v][s] for s in range(self.sectors)):
                self.problems.append(f"primary {name} lost an acknowledged write")
        first = p.status()["total_successful_cgs"]
        for _ in range(50000):  # two more commits: the last one began after the last write
            if p.status()["total_successful_cgs"] >= first + 2:
                break
            await asyncio.sleep(0)
        await p.cg_pause()
        self._compare(await self.read_c(), self.content, "final C vs A")
        ticking[0] = False
        await tick
        await p.stop()


async def random_run(seed: int, *, volumes=("v0", "v1"), size="1MiB", track_bytes=16384, slots=24,
                     sizes=(1, 1, 2, 3, 8, 17, 32, 64, 100, 256), total=1200, writers=8, **params) -> Workload:
    rng = random.Random(seed)
    nvram = 49152 + 4096 * len(volumes) + (slots + 1) * track_bytes
    rig = await make_rig(volumes=volumes, size=size, track_bytes=track_bytes, nvram_bytes=nvram, start=False,
                         drain_inflight=params.pop("drain_inflight", 4),
                         destage_inflight=params.pop("destage_inflight", 2), **params)
    jitter_rig(rig, rng)
    w = Workload(rig, rng, sizes)
    await w.run(total, writers)
    return w


# Seeds that failed before the fixes above (a CR write sent in the CG before, a CG run while Paused).
@pytest.mark.parametrize("seed,policy", [(2, "dual-image"), (7, "dual-image"), (9, "dual-image"),
                                         (0, "send-first"), (6, "send-first")])
def test_concurrent_writes_keep_c_the_cut_of_the_last_commit(seed, policy):
    w = asyncio.run(random_run(seed, policy=policy))
    assert not w.problems, "\n".join(w.problems[:5])
    assert w.cut_seq > 10


def test_destage_writes_the_image_it_picked_not_what_its_slot_holds_when_the_task_starts():
    """Root cause: ``Destager.destage`` picked a dirty image with ``next_dirty``
    and spawned ``destage_entry`` for it, but the track was claimed (put in
    ``destaging``) and the image snapshot only when that task first ran. In
    between, (a) ``next_dirty`` handed the same image out again, so one image
    had several destage tasks, and the first to finish dropped the claim: the
    track's next image could be destaged while an older snapshot was still
    being written to A after it (the demo's torn write inside one track, once
    the clean image was evicted and the track composed from A); (b) a promote
    could discard the image and its slot be reused by another track, whose
    data the late task then wrote to this track on A (the demo's 'misplaced'
    stamp: another track's data at the same offset in the track)."""
    async def main():
        rig = await make_rig()
        p = rig.primary
        cache, a = p.cache, p.devices[0]
        writes: list[tuple[int, bytes]] = []
        inner = a._write

        async def spy(lba, data, fua):
            writes.append((lba, bytes(data)))
            await inner(lba, data, fua)

        a._write = spy
        await p.write("vol0", 0, blk("o"))
        await p.destager.destage()
        await p.write("vol0", 0, blk("O"))  # track 0's image, dirty: the old image of the next CG
        await p.quiesce()
        await p.run()
        await p.write("vol0", 4096, blk("N"))  # dual image: track 0's new image
        writes.clear()
        destage = asyncio.ensure_future(p.destager.destage())
        await asyncio.sleep(0)  # destage() has picked track 0's old image; its task has not run yet
        assert cache.promote(0, 0)  # what _send_old does once the old image is sent
        p.oos[0].clear(0)
        await p.write("vol0", 5 * T, blk("x", T))  # track 5 takes the freed slot
        await destage
        assert all(b"x" not in data for lba, data in writes if lba < T // 512), \
            "another track's data was destaged onto track 0"
        old = [data for lba, data in writes if lba == 0 and data == blk("O")]
        assert len(old) <= 1, f"the old image was destaged {len(old)} times"
        assert await a.read(0, 16) == blk("O") + blk("N")
    asyncio.run(main())


# Seeds that failed before the destager claimed its image when picking it (C showed
# an older write than the cut on part of a track), with the controller's default
# destage concurrency.
@pytest.mark.parametrize("seed", [2, 10])
def test_concurrent_writes_with_eight_destages_in_flight_keep_c_the_cut(seed):
    w = asyncio.run(random_run(seed, policy="dual-image", destage_inflight=8))
    assert not w.problems, "\n".join(w.problems[:5])
    assert w.cut_seq > 5


def test_a_chunked_host_write_never_straddles_the_cr_switch():
    """A write longer than the landing bound lands in chunks, with awaits
    between them. The first version let the CR switch fall between two
    chunks: the CG being formed took the first chunk and not the rest, and C
    showed half of one host write (the comment said it could not happen)."""
    async def main():
        rig = await make_rig()
        p = rig.primary
        await steady(rig)
        p.host.max_landing_tracks = 2
        land = p.host.land
        first_landed = asyncio.Event()

        async def slow_land(vi, offset, mv):
            await land(vi, offset, mv)
            first_landed.set()
            await settle(5)  # the CG loop runs between chunks

        p.host.land = slow_land
        write = asyncio.ensure_future(p.write("vol0", 0, blk("W", 6 * T)))  # three chunks
        await first_landed.wait()
        assert await p.form_cg()
        await write
        c = await rig.secondary.read_c("vol0", 0, 6 * T)
        assert c in (blk("W", 6 * T), bytes(6 * T)), \
            f"C holds {sum(c[t * T:(t + 1) * T] == blk('W', T) for t in range(6))} of the write's 6 tracks"
    asyncio.run(main())
