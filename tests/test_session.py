"""One consistency group across several primary controllers (issue 13), in
process: 3 controllers, each with its own Primary, Secondary and LocalRemote
on mem:// devices, one VirtualClock, a SessionMaster on the first driving
every member through MemberPort (firmware/session_master.py).

The test the issue exists for: a host writes on controller 1, sees the ack,
THEN writes on controller 2 while CGs form. With the hold on every member C
is always one cut across all volumes (the testbench checker, one T* for the
session); with the hold disabled on one subordinate the checker finds a
write on controller 2 in C without the controller-1 write it depended on."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

import pytest
from firmware_doubles import Crash, MemNvram, raising_crashpoints

from drivers.mem import open as open_mem
from firmware.cg import Phase
from firmware.local_remote import LocalRemote
from firmware.member import MemberError, MemberPort, RecoveryState
from firmware.params import SessionParams
from firmware.primary import Primary
from firmware.secondary import Secondary
from firmware.session_master import AFTER_MEMBER_COMMIT, AFTER_PREPARE_ALL, SessionMaster
from firmware.session_member import LocalMember
from firmware.session_recovery import failover, plan_recovery, recover
from hal.clock import VirtualClock
from testbench import stamp
from testbench.checker import check_copy
from testbench.replaylog import WriteRecord

pytestmark = pytest.mark.timeout(120)
T = 65536
BS = 512
VOLS = ("v0", "v1")
SIZE = 8 * T


@dataclass
class Controller:
    name: str
    a: dict
    bc: dict
    pnv: MemNvram
    snv: MemNvram
    params: SessionParams
    primary: Primary = None
    secondary: Secondary = None

    async def open_secondary(self, clock) -> Secondary:
        self.secondary = Secondary(self.bc, self.snv, clock, grain_bytes=T, session_member=True,
                                   session_id="s")
        await self.secondary.open()
        return self.secondary

    async def open_primary(self, clock, crashpoints=None) -> Primary:
        self.primary = Primary(self.a, self.pnv, clock, self.params, LocalRemote(self.secondary),
                               session_id="s", crashpoints=crashpoints or raising_crashpoints())
        await self.primary.open()
        return self.primary


class DelayedMember(MemberPort):
    """A member behind a link: ``delay[step]`` event-loop turns before the
    call reaches it (a round trip that lets host writes run meanwhile);
    ``hang`` steps never answer; ``fail_at`` steps raise."""

    def __init__(self, inner: LocalMember) -> None:
        self.inner = inner
        self.name = inner.name
        self.delay: dict[str, int] = {}
        self.hang: set[str] = set()
        self.fail_at: set[str] = set()

    async def _go(self, step: str) -> None:
        for _ in range(self.delay.get(step, 0)):
            await asyncio.sleep(0)
        if step in self.hang:
            await asyncio.Event().wait()
        if step in self.fail_at:
            raise ConnectionError(f"{self.name}: {step} lost (test)")

    async def hello(self, session_id):
        return await self.inner.hello(session_id)

    async def start(self, seq):
        await self._go("start")
        await self.inner.start(seq)

    async def run(self, seq):
        await self._go("run")
        await self.inner.run(seq)

    async def drain(self, seq):
        await self._go("drain")
        await self.inner.drain(seq)

    async def prepare(self, seq):
        await self._go("prepare")
        await self.inner.prepare(seq)

    async def commit(self, seq):
        await self._go("commit")
        await self.inner.commit(seq)

    async def fail(self, seq, reason):
        await self.inner.fail(seq, reason)

    async def status(self):
        return await self.inner.status()


@dataclass
class Session:
    clock: VirtualClock
    ctls: list[Controller]
    master: SessionMaster = None
    members: list[DelayedMember] = field(default_factory=list)

    @property
    def secondaries(self) -> dict[str, Secondary]:
        return {c.name: c.secondary for c in self.ctls}

    async def build_master(self) -> SessionMaster:
        self.members = [DelayedMember(LocalMember(c.primary, c.name)) for c in self.ctls[1:]]
        self.master = SessionMaster(self.ctls[0].primary, self.members, name=self.ctls[0].name)
        await self.master.hello()
        return self.master

    async def c_devices(self) -> list:
        """C of every volume of every controller, copied into mem devices in
        global volume order (controller-major), as the checker reads them."""
        out = []
        for c in self.ctls:
            for v in VOLS:
                dev = open_mem(f"mem://?size={SIZE}")
                await dev.write(0, await c.secondary.read_c(v, 0, SIZE))
                out.append(dev)
        return out

    def committed(self) -> list[int]:
        return [c.secondary.committed_cg for c in self.ctls]


async def make_session(n: int = 3, **param_kw) -> Session:
    clock = VirtualClock()
    ctls = []
    for i in range(n):
        ctl = Controller(f"c{i}", {v: open_mem(f"mem://?size={SIZE}") for v in VOLS},
                         {v: (open_mem(f"mem://?size={SIZE}"), open_mem(f"mem://?size={SIZE}")) for v in VOLS},
                         MemNvram(4 << 20), MemNvram(1 << 20), SessionParams(track_bytes=T, **param_kw))
        await ctl.open_secondary(clock)
        await ctl.open_primary(clock)
        await ctl.primary.start(form_cgs=False, destage=False)  # the master drives the CGs
        ctls.append(ctl)
    s = Session(clock, ctls)
    await s.build_master()
    return s


class Host:
    """Writers of stamped 4 KiB writes, each a chain of dependent writes (the
    next is issued only after the last was acked) over random controllers,
    each writer on its own blocks; a logical clock orders issues and acks."""

    def __init__(self, session: Session, rng: random.Random, writers: int = 2) -> None:
        self.s = session
        self.rng = rng
        self.log: list[WriteRecord] = []
        self.tick = itertools.count(1)
        self.ids = itertools.count(1)
        self.writers = writers
        self.stop = False
        self.pattern: list[int] | None = None  # controllers in turn (None: random)

    async def write(self, ci: int, vi: int, lba: int, nblocks: int = 8) -> None:
        wid = next(self.ids)
        gv = ci * len(VOLS) + vi
        rec = WriteRecord(wid, gv, lba, nblocks, next(self.tick), None)
        self.log.append(rec)
        await self.s.ctls[ci].primary.write(VOLS[vi], lba * BS, stamp.encode(wid, gv, lba, nblocks, BS))
        rec.ack_ns = next(self.tick)

    async def writer(self, k: int) -> None:
        span = SIZE // BS // self.writers  # each writer its own blocks of every volume
        n = 0
        while not self.stop:
            ci = self.pattern[n % len(self.pattern)] if self.pattern else self.rng.randrange(len(self.s.ctls))
            lba = k * span + self.rng.randrange(span // 8) * 8
            await self.write(ci, self.rng.randrange(len(VOLS)), lba)
            n += 1
            for _ in range(self.rng.randint(0, 2)):
                await asyncio.sleep(0)

    def snapshot(self) -> list[WriteRecord]:
        return [WriteRecord(w.write_id, w.volume, w.lba, w.nblocks, w.issue_ns, w.ack_ns) for w in self.log]


async def check(s: Session, host: Host | None = None, writes=None):
    writes = writes if writes is not None else host.snapshot()
    return await check_copy(await s.c_devices(), writes, names=[f"{c.name}/{v}" for c in s.ctls for v in VOLS])


# ---------------------------------------------------------------------------- CGs across members
def test_cgs_commit_across_three_members_one_seq_one_cut():
    async def main():
        s = await make_session()
        host = Host(s, random.Random(1))
        tasks = [asyncio.ensure_future(host.writer(k)) for k in range(host.writers)]
        for _ in range(8):
            assert await s.master.form_cg()
            assert len(set(s.committed())) == 1, s.committed()
            r = await check(s, host)
            assert r.consistent, r.summary()
        host.stop = True
        await asyncio.gather(*tasks)
        assert await s.master.form_cg()
        r = await check(s, host)
        assert r.consistent and r.missing_acked_before_check == 0, r.summary()
        assert s.committed() == [s.master.seq] * 3 and r.shown_writes > 20
        st = s.ctls[0].primary.status()
        assert [m["name"] for m in st["members"]] == ["c0", "c1", "c2"]
        assert all(m["state"] == "ok" and m["last_cg"] == s.master.seq and m["link"] == "up"
                   for m in st["members"])
        assert all(m["held_ack_ms"]["count"] == 9 for m in st["members"])
    asyncio.run(main())


def test_member_refuses_a_seq_that_is_not_its_cg():
    async def main():
        s = await make_session()
        m = s.members[0].inner
        assert await s.master.form_cg()
        seq = s.master.seq
        with pytest.raises(MemberError, match="not newer"):
            await m.start(seq)
        with pytest.raises(MemberError, match="this member's CG"):
            await m.run(seq + 5)
        await m.start(seq + 1)
        for bad in (m.run, m.drain, m.prepare, m.commit):
            with pytest.raises(MemberError, match="refused"):
                await bad(seq + 2)
        assert m.primary.gate.closed  # driven: acks held after the CR switch until run
        await m.run(seq + 1)
        assert not m.primary.gate.closed
        await m.fail(seq + 1, "test")
        assert m.primary.machine.phase is Phase.IDLE
    asyncio.run(main())


# ---------------------------------------------------------------------------- the hold matters
async def hold_run(seed: int, hold: bool) -> tuple[int, int]:
    """CGs form while one host chain writes controller 1, then controller 2
    (each acked before the next is issued). Controller 1's start answers at
    once, controller 2's after a seeded delay (its round trip). Returns
    (CGs checked, inconsistent ones)."""
    rng = random.Random(seed)
    s = await make_session()
    s.members[0].inner.hold_acks = hold
    host = Host(s, rng, writers=1)
    host.pattern = [1, 2]
    task = asyncio.ensure_future(host.writer(0))
    bad = checked = 0
    for _ in range(6):
        s.members[1].delay["start"] = rng.randint(20, 60)
        for _ in range(rng.randint(0, 10)):
            await asyncio.sleep(0)
        assert await s.master.form_cg()
        r = await check(s, host)
        checked += 1
        if not r.consistent:
            bad += 1
            kinds = {v.kind for v in r.violations}
            assert kinds <= {"lost-write", "stale-block"}, r.summary()
            assert any(v.volume.startswith("c1/") for v in r.violations), r.summary()
    host.stop = True
    await task
    return checked, bad


@pytest.mark.parametrize("seed", range(8))
def test_hold_on_every_member_keeps_c_one_cut_across_controllers(seed):
    checked, bad = asyncio.run(hold_run(seed, hold=True))
    assert checked == 6 and bad == 0


@pytest.mark.parametrize("seed", range(8))
def test_without_the_hold_on_one_subordinate_c_is_not_a_cut(seed):
    """The reason for the whole issue: controller 1 acks at its own CR switch,
    the host then writes controller 2 before controller 2 switched, and C shows
    that write without the controller-1 write acknowledged before it."""
    checked, bad = asyncio.run(hold_run(seed, hold=False))
    assert bad >= 1, f"seed {seed}: the unheld member left every C consistent"


# ---------------------------------------------------------------------------- failures
def test_member_silent_at_start_fails_the_cg_everywhere_and_the_next_commits():
    async def main():
        s = await make_session()
        host = Host(s, random.Random(3))
        for i in range(30):
            await host.write(i % 3, i % 2, (i % 16) * 64)
        assert await s.master.form_cg()
        committed = s.committed()
        for i in range(30):
            await host.write(i % 3, (i + 1) % 2, (i % 16) * 64 + 8)
        dirty = [c.primary.oos_tracks() for c in s.ctls]
        s.members[1].hang.add("start")
        cg = asyncio.ensure_future(s.master.form_cg())
        for _ in range(50):
            await asyncio.sleep(0)
        assert not cg.done()
        held = asyncio.ensure_future(host.write(0, 0, 0))  # acks held on c0 while c2 says nothing
        for _ in range(20):
            await asyncio.sleep(0)
        assert not held.done()
        s.clock.advance(0.051)  # past max_coord_ms (50)
        for _ in range(100):
            await asyncio.sleep(0)
        assert cg.done() and cg.result() is False and held.done()
        assert s.committed() == committed  # no C moved
        for c, n in zip(s.ctls, dirty, strict=True):
            p = c.primary
            assert p.machine.phase is Phase.IDLE and not p.gate.closed
            assert p.cr_tracks() == 0 and p.oos_tracks() >= n  # CR OR-merged into OOS
        rec = {m["name"]: m for m in s.master.members_status()}
        assert rec["c2"]["state"] == "unreachable" and "start not answered" in rec["c2"]["reason"]
        assert (await check(s, host)).consistent
        s.members[1].hang.clear()
        assert await s.master.form_cg()
        assert len(set(s.committed())) == 1 and s.committed()[0] > committed[0]
        r = await check(s, host)
        assert r.consistent and r.missing_acked_before_check == 0, r.summary()
        assert {m["state"] for m in s.master.members_status()} == {"ok"}
    asyncio.run(main())


def test_member_events_on_the_master_bus():
    async def main():
        s = await make_session()
        lines = []
        s.ctls[0].primary.events.subscribe(lambda e: lines.append(e.line()) if "member" in e.obj else None)
        s.members[0].fail_at.add("drain")
        assert not await s.master.form_cg()
        s.members[0].fail_at.clear()
        assert await s.master.form_cg()
        assert lines == ["change member name:c1 state:unreachable reason:drain:_c1:_drain_lost_(test)",
                         "change member name:c1 state:ok"], lines
    asyncio.run(main())


@pytest.mark.parametrize("step", ["drain", "prepare"])
def test_member_failing_at_drain_or_prepare_fails_all(step):
    async def main():
        s = await make_session()
        host = Host(s, random.Random(5))
        for i in range(24):
            await host.write(i % 3, i % 2, i * 16)
        assert await s.master.form_cg()
        committed = s.committed()
        for i in range(24):
            await host.write(i % 3, (i + 1) % 2, i * 16 + 8)
        s.members[0].fail_at.add(step)
        assert not await s.master.form_cg()
        for _ in range(20):
            await asyncio.sleep(0)  # background aborts
        assert s.committed() == committed
        for c in s.ctls:
            st = await c.secondary.recovery_state()
            assert st == RecoveryState(committed[0], None)  # every prepared secondary reverted
            assert c.primary.machine.phase is Phase.IDLE and c.primary.cr_tracks() == 0
        if step == "drain":
            assert s.ctls[1].primary.oos_tracks() > 0  # c1 never drained; CR OR-merged into its OOS
        s.members[0].fail_at.clear()
        assert await s.master.form_cg()
        r = await check(s, host)
        assert r.consistent and r.missing_acked_before_check == 0, r.summary()
    asyncio.run(main())


# ---------------------------------------------------------------------------- recovery
async def crash_between_commits(s: Session, point: str, host: Host) -> int:
    for i in range(24):
        await host.write(i % 3, i % 2, i * 16)
    assert await s.master.form_cg()
    for i in range(24):
        await host.write(i % 3, (i + 1) % 2, i * 16 + 8)
    s.ctls[0].primary.crashpoints.arm(point)
    with pytest.raises(Crash):
        await s.master.form_cg()
    return s.master.seq


def test_crash_between_two_members_commits_then_recover_commits_all():
    async def main():
        s = await make_session()
        host = Host(s, random.Random(7))
        seq = await crash_between_commits(s, AFTER_MEMBER_COMMIT, host)
        assert s.committed() == [seq, seq - 1, seq - 1]  # the master crashed after c0 committed
        # Every secondary restarts (session members keep the prepared CG).
        for c in s.ctls:
            await c.open_secondary(s.clock)
            assert c.secondary.recovered.get("in_doubt_seq", 0) in (0, seq)
        states = {n: await x.recovery_state() for n, x in s.secondaries.items()}
        assert states == {"c0": RecoveryState(seq, None), "c1": RecoveryState(seq - 1, seq),
                          "c2": RecoveryState(seq - 1, seq)}
        assert plan_recovery(states) == {"c0": "none", "c1": "commit", "c2": "commit"}
        with pytest.raises(Exception, match="in doubt"):
            await s.ctls[1].secondary.prepare(seq + 1)  # tracks too: they would overwrite its B
        assert await recover(s.secondaries) == {"c0": "none", "c1": "commit", "c2": "commit"}
        assert s.committed() == [seq] * 3
        r = await check(s, host)
        assert r.consistent and r.missing_acked_before_check == 0, r.summary()
        assert await recover(s.secondaries) == {"c0": "none", "c1": "none", "c2": "none"}  # idempotent
        # The primaries restart too (their CG failed at reopen), a new master, the next CG commits.
        for c in s.ctls:
            await c.open_primary(s.clock)
            await c.primary.start(form_cgs=False, destage=False)
        await s.build_master()
        for i in range(6):
            await host.write(i % 3, 0, 900 + i * 8)
        assert await s.master.form_cg() and s.committed() == [s.master.seq] * 3 and s.master.seq > seq
        r = await check(s, host)
        assert r.consistent and r.missing_acked_before_check == 0, r.summary()
        grains = await failover(s.secondaries)
        assert set(grains) == {"c0", "c1", "c2"}
        for c in s.ctls:
            for v in VOLS:
                assert await c.bc[v][0].read(0, SIZE // BS) == await c.secondary.read_c(v, 0, SIZE)
    asyncio.run(main())


def test_crash_before_any_commit_then_recover_reverts_all():
    async def main():
        s = await make_session()
        host = Host(s, random.Random(8))
        seq = await crash_between_commits(s, AFTER_PREPARE_ALL, host)
        for c in s.ctls:
            await c.open_secondary(s.clock)
        states = {n: await x.recovery_state() for n, x in s.secondaries.items()}
        assert all(st == RecoveryState(seq - 1, seq) for st in states.values()), states
        with pytest.raises(MemberError, match="in doubt"):
            await failover(s.secondaries)
        assert await recover(s.secondaries) == {"c0": "revert", "c1": "revert", "c2": "revert"}
        assert s.committed() == [seq - 1] * 3
        assert [(await x.recovery_state()).prepared_seq for x in s.secondaries.values()] == [None] * 3
        r = await check(s, host)
        assert r.consistent, r.summary()
    asyncio.run(main())


def test_plan_recovery_cases():
    R = RecoveryState
    assert plan_recovery({}) == {}
    assert plan_recovery({"a": R(4), "b": R(4)}) == {"a": "none", "b": "none"}
    assert plan_recovery({"a": R(4, 5), "b": R(5), "c": R(4, 5)}) == {"a": "commit", "b": "none", "c": "commit"}
    assert plan_recovery({"a": R(4, 5), "b": R(4, 5)}) == {"a": "revert", "b": "revert"}
    assert plan_recovery({"a": R(4, 5), "b": R(4)}) == {"a": "revert", "b": "none"}


def test_commit_failing_after_the_commit_point_is_in_doubt_then_committed_again():
    """A member whose commit did not answer after another committed keeps its
    secondary prepared (it does not abort by itself); the master sends commit
    again before the next CG, so every C reaches the same CG online."""
    async def main():
        s = await make_session()
        host = Host(s, random.Random(9))
        for i in range(12):
            await host.write(i % 3, 0, i * 16)
        s.members[1].fail_at.add("commit")
        assert await s.master.form_cg()
        seq = s.master.seq
        assert s.committed() == [seq, seq, seq - 1] and s.master.unresolved == {"c2": (seq, "commit")}
        st = await s.members[1].status()
        assert st.in_doubt_seq == 0 and st.phase == "committing"  # the call never reached c2
        s.members[1].fail_at.clear()
        assert await s.master.form_cg()
        assert s.committed() == [seq + 1] * 3 and not s.master.unresolved
        r = await check(s, host)
        assert r.consistent and r.missing_acked_before_check == 0, r.summary()
    asyncio.run(main())
