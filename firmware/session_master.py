"""The session master: one consistency group over several primary
controllers (DESIGN.md section 3, the DS8000-style master/subordinate
session; issue 13).

``SessionMaster`` forms the CGs: start every member concurrently (all
answers within ``max_coord_ms``, round trips included), run all, drain all,
prepare all, then commit one member after the other. Any member failing,
slow or unreachable before the first commit fails the CG on every member
(CR OR-merged into OOS everywhere, every prepared secondary reverted).
After the first commit the CG commits: a member whose commit did not answer
is in doubt and is sent commit again before the next CG starts. ``status()``
and ``members_status()`` are what the console shows of the session.

The master itself is a member (a LocalMember over its own Primary,
firmware/session_member.py): one way of forming a CG, whoever the members
are. Its recovery (``recover_session``, ``failover_session``, the loop's
automatic recovery) is firmware/session_recovery.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import asdict, dataclass, field

from firmware import crashpoints as cp
from firmware.cgloop import wait_first
from firmware.copystate import CopyState
from firmware.drain import LINK_ERRORS
from firmware.member import FlashPort, MemberError, MemberPort, MemberState
from firmware.session_member import LocalMember
from firmware.session_recovery import MasterRecovery

log = logging.getLogger(__name__)

AFTER_PREPARE_ALL = cp.declare("session.after_prepare_all", "every member prepared, none committed")
AFTER_MEMBER_COMMIT = cp.declare("session.after_member_commit", "a member committed, the next not yet")


@dataclass
class MemberRecord:
    """What the master knows of one member (status ``members``)."""

    name: str
    state: str = "joining"  # joining | ok | failed | unreachable | in doubt
    phase: str = "idle"
    link: str = "down"
    last_cg: int = 0  # the member's last committed CG
    last_cg_time: float | None = None
    oos_tracks: int = 0
    cr_tracks: int = 0
    held_ack_ms: dict = field(default_factory=dict)
    cg_seq: int = 0
    in_doubt_seq: int = 0
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class _CgFailed(Exception):
    def __init__(self, reason: str, unreachable: set[str]) -> None:
        super().__init__(reason)
        self.unreachable = unreachable


class SessionMaster(MasterRecovery):
    """Forms CGs across ``primary`` (the master's own, driven as a member
    named ``name``) and ``subordinates``."""

    def __init__(self, primary, subordinates: list[MemberPort], *, name: str = "master",
                 secondaries: Mapping[str, FlashPort] | None = None) -> None:
        self.primary = primary
        self.own = LocalMember(primary, name)
        self.members: list[MemberPort] = [self.own, *subordinates]
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise MemberError(f"member names must differ: {names}")
        self.clock = primary.clock
        self.params = primary.params
        self.events = primary.events
        self.session_id = primary.session_id
        self.records = {m.name: MemberRecord(m.name) for m in self.members}
        self.seq = 0
        self.successful = 0
        self.failed = 0
        self.consecutive = 0
        self.last_reason = ""
        self.coord_ms: deque[float] = deque(maxlen=4096)  # start sent -> every member running
        self.unresolved: dict[str, tuple[int, str]] = {}  # member -> (CG, "commit" | "revert")
        self.stopping = False
        self.loop_task: asyncio.Task | None = None
        self.kick: asyncio.Event | None = None
        # Each member's secondary (session recovery); empty: recovery is the operator's.
        self.secondaries: dict[str, FlashPort] = dict(secondaries or {})
        unknown = sorted(set(self.secondaries) - set(names))
        if unknown:
            raise MemberError(f"secondaries of no member: {unknown}; members are {names}")
        self.auto_recover = True
        self.recovery: dict = {"needed": "", "last": None, "runs": 0}
        self._last_check = float("-inf")
        self._formation = asyncio.Lock()  # one CG, or one recovery, at a time
        primary.session_master = self

    @property
    def crashpoints(self):
        return self.primary.crashpoints

    # ---------------------------------------------------------------- records
    def _set(self, name: str, state: str, reason: str = "") -> None:
        rec = self.records[name]
        rec.reason = reason if state != "ok" else ""
        if rec.state != state:
            rec.state = state
            fields = {"state": state} | ({"reason": reason} if reason else {})
            self.events.emit("change", f"member name:{name}", **fields)

    def _note(self, name: str, st: MemberState) -> None:
        rec = self.records[name]
        rec.phase, rec.link, rec.last_cg, rec.last_cg_time = st.phase, st.link, st.committed_seq, st.last_cg_time
        rec.oos_tracks, rec.cr_tracks, rec.held_ack_ms = st.oos_tracks, st.cr_tracks, dict(st.held_ack_ms)
        rec.cg_seq, rec.in_doubt_seq = st.cg_seq, st.in_doubt_seq

    async def hello(self) -> None:
        """Say hello to every member (learns their CG numbers)."""
        await self._refresh(hello=True)

    async def _refresh(self, hello: bool = False) -> None:
        timeout = self.params.max_coord_ms / 1000.0 * 4

        async def one(m: MemberPort) -> None:
            try:
                coro = m.hello(self.session_id) if hello else m.status()
                st = await self._bounded(coro, timeout)
            except MemberError as e:
                self._set(m.name, "failed", str(e))
                return
            except (TimeoutError, *LINK_ERRORS) as e:
                self._set(m.name, "unreachable", f"{type(e).__name__}: {e}")
                return
            self._note(m.name, st)
            if hello and self.records[m.name].state in ("joining", "unreachable"):
                self._set(m.name, "in doubt" if st.in_doubt_seq else "ok")
        await asyncio.gather(*(one(m) for m in self.members))

    def members_status(self) -> list[dict]:
        return [self.records[m.name].as_dict() for m in self.members]

    def status(self) -> dict:
        return {"seq": self.seq, "successful": self.successful, "failed": self.failed,
                "consecutive": self.consecutive, "last_reason": self.last_reason,
                "coord_ms": _stats(self.coord_ms), "unresolved": dict(self.unresolved),
                "members": self.members_status(),
                "recovery": dict(self.recovery, secondaries=sorted(self.secondaries),
                                 automatic=self.auto_recover and self._can_recover())}

    # ---------------------------------------------------------------- one CG
    def _next_seq(self) -> int:
        c = self.own.cycle
        floor = max([self.seq, c.seq, c.region.record["seq"], c.remote_committed]
                    + [max(r.cg_seq, r.last_cg, r.in_doubt_seq) for r in self.records.values()])
        return floor + 1

    async def _all(self, what: str, seq: int, timeout_s: float | None) -> None:
        """Call ``what`` on every member at once; all answers within
        ``timeout_s`` (None: unbounded), else the CG fails. The first failure
        ends the wait (the rest are cancelled)."""
        tasks = {asyncio.ensure_future(getattr(m, what)(seq)): m for m in self.members}
        timer = asyncio.ensure_future(self.clock.sleep(timeout_s)) if timeout_s is not None else None
        pending = set(tasks)
        failure: _CgFailed | None = None
        try:
            while pending and failure is None:
                done, _ = await asyncio.wait(pending | ({timer} if timer else set()),
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done & pending:
                    pending.discard(t)
                    m = tasks[t]
                    exc = t.exception()
                    if exc is None:
                        continue
                    unreachable = isinstance(exc, (*LINK_ERRORS, TimeoutError))
                    self._set(m.name, "unreachable" if unreachable else "failed", f"{what}: {exc}")
                    failure = failure or _CgFailed(f"{m.name}: {what}: {exc}",
                                                   {m.name} if unreachable else set())
                if failure is None and timer is not None and timer.done() and pending:
                    slow = sorted(tasks[t].name for t in pending)
                    for n in slow:
                        self._set(n, "unreachable", f"{what} not answered within {timeout_s * 1000:.6g} ms")
                    failure = _CgFailed(f"{', '.join(slow)}: {what} not answered within "
                                        f"{timeout_s * 1000:.6g} ms", set(slow))
        finally:
            for t in pending:
                t.cancel()
            if timer is not None:
                timer.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if failure is not None:
            raise failure

    async def form_cg(self) -> bool:
        """One CG across every member. True if it committed everywhere (a
        member in doubt after the commit point still counts as committed:
        it is sent commit again before the next CG)."""
        if self.unresolved and not await self.resolve():
            return False
        seq = self.seq = self._next_seq()
        p = self.params
        drain_s = p.max_drain_s if self.consecutive < p.max_failures_before_untimed else None
        self.events.emit("create", "cg", seq=seq, phase="quiescing", role="master", members=len(self.members))
        t0 = self.clock.now()
        try:
            await self._all("start", seq, p.max_coord_ms / 1000.0)
            left = max(0.0, p.max_coord_ms / 1000.0 - (self.clock.now() - t0))
            await self._all("run", seq, left if left > 0 else 1e-9)
            self.coord_ms.append((self.clock.now() - t0) * 1000.0)
            await self._all("drain", seq, drain_s)
            await self._all("prepare", seq, drain_s)
        except _CgFailed as e:
            await self._fail_all(seq, str(e))
            await self._refresh()
            return False
        self.crashpoints.hit(AFTER_PREPARE_ALL)
        # The commit point: from here this CG commits on every member.
        for m in self.members:
            try:
                await self._bounded(m.commit(seq), drain_s)
            except Exception as e:  # noqa: BLE001 - any failure leaves this member in doubt, resolved later
                self.unresolved[m.name] = (seq, "commit")
                self._set(m.name, "in doubt", f"commit of CG {seq}: {type(e).__name__}: {e}")
            else:
                self._set(m.name, "ok")
            self.crashpoints.hit(AFTER_MEMBER_COMMIT)
        self.successful += 1
        self.consecutive = 0
        self.events.emit("destroy", "cg", seq=seq, result="committed", role="master",
                         in_doubt=len(self.unresolved), cycle_s=self.clock.now() - t0)
        await self._refresh()
        return True

    async def _bounded(self, aw: Awaitable, timeout_s: float | None):
        if timeout_s is None:
            return await aw
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self.clock.sleep(timeout_s))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise TimeoutError(f"no answer within {timeout_s:.6g} s")
        return task.result()

    async def _fail_all(self, seq: int, reason: str) -> None:
        """Fail CG ``seq`` on every member (none committed): CR folds into OOS,
        held acks go, every prepared secondary reverts."""
        self.failed += 1
        self.consecutive += 1
        self.last_reason = reason
        log.info("session CG %d failed: %s", seq, reason)

        async def one(m: MemberPort) -> None:
            try:
                await self._bounded(m.fail(seq, reason), self.params.max_coord_ms / 1000.0 * 4)
            except MemberError as e:
                log.info("fail of CG %d at %s: %s", seq, m.name, e)  # ended there already
            except Exception as e:  # noqa: BLE001 - not reached: it may hold a prepared CG; revert it later
                self.unresolved[m.name] = (seq, "revert")
                self._set(m.name, "unreachable", f"fail of CG {seq}: {type(e).__name__}: {e}")
        await asyncio.gather(*(one(m) for m in self.members))
        self.events.emit("destroy", "cg", seq=seq, result="failed", role="master", reason=reason)

    async def resolve(self) -> bool:
        """Send the outcome of each CG in doubt to its member again (commit
        after the commit point, revert before). True when none is left."""
        for name, (seq, action) in list(self.unresolved.items()):
            m = next(x for x in self.members if x.name == name)
            try:
                if action == "commit":
                    await self._bounded(m.commit(seq), self.params.max_coord_ms / 1000.0 * 4)
                else:
                    await self._bounded(m.fail(seq, "revert: the CG failed"), self.params.max_coord_ms / 1000.0 * 4)
            except MemberError as e:
                if action == "revert":  # it ended there by itself (not prepared): nothing to revert
                    log.info("revert of CG %d at %s: %s", seq, name, e)
                else:
                    self._set(name, "in doubt", str(e))
                    continue
            except Exception as e:  # noqa: BLE001 - still not reachable
                self._set(name, "unreachable" if action == "revert" else "in doubt", f"{type(e).__name__}: {e}")
                continue
            del self.unresolved[name]
            self._set(name, "ok")
        return not self.unresolved

    # ---------------------------------------------------------------- the loop
    def start_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.stopping = False
            self.kick = asyncio.Event()
            self.loop_task = asyncio.ensure_future(self._loop())

    async def stop_loop(self) -> None:
        self.stopping = True
        if self.kick is not None:
            self.kick.set()
        if self.loop_task is not None:
            self.loop_task.cancel()
            await asyncio.gather(self.loop_task, return_exceptions=True)
            self.loop_task = None

    async def _loop(self) -> None:
        await self.hello()
        await self._check_recovery(force=True)
        while not self.stopping:
            if self.primary.copy_state is not CopyState.RUNNING:
                self.kick.clear()
                await self._wait(1.0)
                continue
            try:
                async with self._formation:
                    committed = await self.form_cg()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any one CG's bug
                log.exception("session CG loop: unexpected error in CG %d", self.seq)
                committed = False
            if not committed:
                await self._check_recovery()
                await self._wait(0.1)
            elif self.params.cg_interval_s > 0:
                await self._wait(self.params.cg_interval_s)
            elif not any(r.oos_tracks or r.cr_tracks for r in self.records.values()):
                await self._wait(0.05)  # nothing to send anywhere: poll instead of spinning
            else:
                await asyncio.sleep(0)

    async def _wait(self, seconds: float) -> None:
        self.kick.clear()
        # The Primary's own commands (cg resume, pair resume, set) kick its
        # cycle's event; a driven cycle runs no loop of its own, so that kick
        # is the master's to take (cleared here, or it would wake every wait).
        kicks = [self.kick]
        own = self.primary.cycle.kick
        if own is not None:
            own.clear()
            kicks.append(own)
        await wait_first(*(k.wait() for k in kicks), self.clock.sleep(seconds))


def _stats(values) -> dict:
    v = sorted(values)
    if not v:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    def pct(p: float) -> float:
        return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]
    return {"p50": pct(0.5), "p99": pct(0.99), "max": v[-1], "count": len(v)}
