"""Random interleavings of host writes, destage, drain progress, CG steps,
timeouts, failures, policy changes and crashes (hypothesis state machine),
checking after every step:

- OOS u CR u in-flight covers every track where the primary's current image
  differs from B (what B will hold after the next commit otherwise);
- C equals the primary's content at the CR switch of the last committed CG
  (a prefix-closed cut of the writes), across both volumes;
- no acknowledged write is ever lost from the primary, across crashes;
- the bitmaps' kept counts equal their bits.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from firmware_doubles import make_rig, raising_crashpoints, settle
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import firmware.cache
import firmware.drain
import firmware.layout
from firmware.cg import Phase
from firmware.cgcycle import AFTER_RECORDING_ON
from firmware.crashpoints import CrashPoints

TRACK = 4096
TRACKS = 16
SECTORS = TRACK * TRACKS // 512
VOLS = ("v0", "v1")


def stamp(wid: int, vol: int, sector: int, n: int) -> bytes:
    return b"".join(struct.pack("<QQ", wid, vol * 100000 + sector + i) * 32 for i in range(n))


def ids(data: bytes) -> list[int]:
    return [struct.unpack_from("<Q", data, i * 512)[0] for i in range(len(data) // 512)]


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.rig = self.run(make_rig(volumes=VOLS, size="64KiB", track_bytes=TRACK,
                                     nvram_bytes=49152 + 4096 + 20 * TRACK, drain_inflight=3,
                                     destage_inflight=2))
        self.wid = 0
        self.content = {v: [0] * SECTORS for v in range(2)}  # model: id landed per sector
        self.acked_min = {v: [0] * SECTORS for v in range(2)}  # newest acked id per sector
        self.pending_cut = None
        self.cut = {v: [0] * SECTORS for v in range(2)}
        self.tasks: list[asyncio.Task] = []
        self._wire(self.rig.primary)
        # finish the full initial copy so C is defined from here on
        self.run(self.rig.primary.form_cg())
        self.cut = {v: list(self.content[v]) for v in range(2)}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        for t in asyncio.all_tasks(self.loop):
            t.cancel()
        self.loop.run_until_complete(settle(5))
        self.loop.close()
        asyncio.set_event_loop(None)

    def _wire(self, p) -> None:
        orig = p.host.land

        async def land(vi, offset, mv):
            await orig(vi, offset, mv)  # returns right after landing, with no await in between
            s = offset // 512
            self.content[vi][s : s + mv.nbytes // 512] = ids(bytes(mv))

        p.host.land = land
        cps = CrashPoints(lambda name: setattr(self, "pending_cut",
                                               {v: list(self.content[v]) for v in range(2)}))
        p.crashpoints = cps
        cps.arm(AFTER_RECORDING_ON)
        p.events.subscribe(self._on_event)

    def _on_event(self, ev) -> None:
        if ev.obj == "cg" and ev.action == "destroy" and ev.fields.get("result") == "committed":
            self.cut = self.pending_cut
        if ev.obj == "cg" and ev.action == "create":
            self.rig.primary.crashpoints.arm(AFTER_RECORDING_ON)

    @property
    def p(self):
        return self.rig.primary

    # -- rules --------------------------------------------------------------------------
    @rule(vol=st.integers(0, 1), sector=st.integers(0, SECTORS - 1), n=st.integers(1, 20))
    def write(self, vol, sector, n):
        n = min(n, SECTORS - sector)
        self.wid += 1
        wid = self.wid
        task = self.loop.create_task(self.p.write(VOLS[vol], sector * 512, stamp(wid, vol, sector, n)))

        def acked(t, vol=vol, sector=sector, n=n, wid=wid):
            if not t.cancelled() and t.exception() is None:
                for s in range(sector, sector + n):
                    self.acked_min[vol][s] = max(self.acked_min[vol][s], wid)
        task.add_done_callback(acked)
        self.tasks.append(task)
        self.run(settle(10))

    @rule(k=st.integers(1, 6))
    def destage(self, k):
        self.run(self.p.destager.destage(limit=k))

    @precondition(lambda self: self.p.machine.phase is Phase.IDLE)
    @rule()
    def quiesce(self):
        self.run(self.p.quiesce())
        self.run(settle(5))

    @precondition(lambda self: self.p.machine.phase is Phase.QUIESCING)
    @rule()
    def run_command(self):
        self.run(self.p.run())
        self.run(settle(10))

    @precondition(lambda self: self.p.machine.phase is Phase.QUIESCING)
    @rule()
    def coordination_timeout(self):
        self.rig.clock.advance(self.p.params.max_coord_ms / 1000 + 0.001)
        assert self.p.machine.phase is Phase.IDLE
        self.run(settle(10))

    @precondition(lambda self: self.p.machine.phase is Phase.DRAINING)
    @rule(k=st.integers(1, 8))
    def drain_some(self, k):
        self.run(self.p.drain(limit=k))

    @precondition(lambda self: self.p.machine.phase is Phase.DRAINING and self.p.oos_tracks() == 0)
    @rule()
    def commit(self):
        self.run(self.p.commit_cg())

    @precondition(lambda self: self.p.machine.phase is not Phase.IDLE)
    @rule()
    def fail(self):
        self.run(self.p.cg_fail("random"))
        self.run(settle(10))

    @rule(policy=st.sampled_from(["dual-image", "send-first"]))
    def set_policy(self, policy):
        self.p.set_param("collision_policy", policy)

    @rule()
    def crash_and_recover(self):
        for t in self.tasks:
            if not t.done():
                t.cancel()  # unacknowledged: the host sees an error, nothing is promised
        self.run(settle(5))
        p = self.run(self.rig.reopen_primary())
        assert p.machine.phase is Phase.IDLE and p.cr_tracks() == 0 and not p.cache.with_new
        self.run(p.start(form_cgs=False, destage=False))
        p.crashpoints = raising_crashpoints()
        self._wire(p)

    # -- invariants -------------------------------------------------------------------
    def _read_all(self, read):
        return {v: ids(self.run(read(v))) for v in range(2)}

    @invariant()
    def covered_not_lost_and_consistent(self):
        p = self.p
        prim = self._read_all(lambda v: p.read(VOLS[v], 0, TRACK * TRACKS))
        b = self._read_all(lambda v: self.rig.bc[VOLS[v]][0].read(0, SECTORS))
        c = self._read_all(lambda v: self.rig.secondary.read_c(VOLS[v], 0, TRACK * TRACKS))
        per = TRACK // 512
        for v in range(2):
            assert p.oos[v].count() == p.oos[v].recount() and p.cr[v].count() == p.cr[v].recount()
            assert prim[v] == self.content[v]
            assert all(prim[v][s] >= self.acked_min[v][s] for s in range(SECTORS)), "acked write lost"
            assert c[v] == self.cut[v], "C is not the cut of the last committed CG"
            inflight = {t for (vi, t) in p.cycle.drainer.inflight if vi == v}
            for t in range(TRACKS):
                if t in p.oos[v] or t in p.cr[v] or t in inflight:
                    continue
                assert prim[v][t * per : (t + 1) * per] == b[v][t * per : (t + 1) * per], \
                    f"volume {v} track {t} differs from B but is in neither OOS nor CR"


class SegmentedMirrorMachine(MirrorMachine):
    """The same with 1 KiB segments, four per track, and evictions: the
    images' masks, the track mask records their evictions leave and the
    drain's runs are partial, so a segment a mask forgot shows as B (then
    C) missing it."""

    def __init__(self) -> None:
        self._segment_bytes = [(m, m.SEGMENT_BYTES) for m in SEGMENTED]
        for m, _ in self._segment_bytes:
            m.SEGMENT_BYTES = 1024
        super().__init__()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            for m, n in self._segment_bytes:
                m.SEGMENT_BYTES = n

    @rule(k=st.integers(1, 4))
    def evict(self, k):
        """Eviction pressure with fewer tracks written than slots: what
        allocate does to its victims (clean images, least recently used
        first), their slots then going back to the free list."""
        cache = self.p.cache
        for entry in list(cache._clean.values())[:k]:
            cache._evict(entry)
            cache._free.append(entry.slot)


SEGMENTED = (firmware.layout, firmware.cache, firmware.drain)

for machine in (MirrorMachine, SegmentedMirrorMachine):
    machine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestMirror = pytest.mark.timeout(120)(MirrorMachine.TestCase)
TestMirrorSegmented = pytest.mark.timeout(120)(SegmentedMirrorMachine.TestCase)
