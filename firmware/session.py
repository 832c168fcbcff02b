"""A session across several primary controllers: one consistency group over
all of them (DESIGN.md section 3, the DS8000-style master/subordinate
session; issue 13).

Only the hold makes such a cut consistent: a host may write on controller 1,
see the ack, and *then* write on controller 2. If controller 1 switched to CR
and acknowledged before controller 2 switched, C could show the second write
without the first. So every member holds its acks from its own quiesce until
the master has heard every member's start answer and says run.

- ``LocalMember`` is a member in this process: a ``MemberPort`` over a Primary
  whose own CG loop is off (driven mode, firmware/cgcycle.py). Each call runs
  one step of the member's CG under the cycle's guard, so a member's own
  timers (the gate's max hold, the drain time) fail it the same way as in a
  single controller. A request for another CG than the member's is refused.
- ``SessionMaster`` forms the CGs: start every member concurrently (all
  answers within ``max_coord_ms``, round trips included), run all, drain all,
  prepare all, then commit one member after the other. Any member failing,
  slow or unreachable before the first commit fails the CG on every member
  (CR OR-merged into OOS everywhere, every prepared secondary reverted).
  After the first commit the CG commits: a member whose commit did not answer
  is in doubt and is sent commit again before the next CG starts.
- ``plan_recovery``/``recover`` bring every member's C to one CG after
  crashes (commit all when any member committed the highest prepared CG,
  revert all otherwise); ``failover`` then restores B from C on every member.
- Session recovery by the master (``SessionMaster.recover_session``, the
  console's ``session recover``): given each member's secondary as a
  ``FlashPort`` (``secondaries``: a ControlRemote straight to that
  secondary's replication port, firmware/control_service.py says why), it
  applies ``recover`` between two CGs, then tells every member primary still
  in doubt the outcome (commit or fail of that CG), so its next start is
  not refused. The loop does this by itself (``auto_recover``) at its start
  and after a failed CG, when some secondary holds a CG prepared (a master
  or a member primary died between prepare and commit) and every secondary
  answers; until then ``status()["recovery"]`` says what waits for what.

The master itself is a member (a LocalMember over its own Primary): one way
of forming a CG, whoever the members are.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field

from firmware import crashpoints as cp
from firmware.cg import Event, Phase
from firmware.copystate import CopyState
from firmware.drain import LINK_ERRORS
from firmware.member import FlashPort, MemberError, MemberPort, MemberState, RecoveryState
from firmware.remote import RemoteError

log = logging.getLogger(__name__)

AFTER_PREPARE_ALL = cp.declare("session.after_prepare_all", "every member prepared, none committed")
AFTER_MEMBER_COMMIT = cp.declare("session.after_member_commit", "a member committed, the next not yet")

STEPS = ("start", "run", "drain", "prepare", "commit")


class LocalMember(MemberPort):
    """A session member in this process: drives ``primary`` (its own CG loop
    off) through the steps a master asks for. ``hold_acks`` False is a test
    switch: the acks are released at the member's own CR switch, as a single
    controller does, instead of at the master's run."""

    def __init__(self, primary, name: str | None = None) -> None:
        self.primary = primary
        self.cycle = primary.cycle
        self.cycle.driven = True
        self.name = name or primary.session_id
        self.hold_acks = True
        self._drain_timer = None
        self._resolved = 0  # the last CG in doubt that a master resolved here
        self.master = ""  # name@address of the master while its control link is up (a subordinate)
        self.master_down_reason = ""
        primary.session_member = self  # for status: a subordinate says who its master is

    # ---------------------------------------------------------------- helpers
    @property
    def in_doubt_seq(self) -> int:
        """A CG this member's secondary prepared whose commit did not happen
        here and that no master resolved yet (0: none)."""
        c = self.cycle
        if (c.machine.phase is Phase.IDLE and c.prepared_seq == c.seq and c.remote_committed < c.seq
                and self._resolved != c.seq):
            return c.seq
        return 0

    def _check(self, seq: int, what: str) -> None:
        c = self.cycle
        if seq != c.seq:
            raise MemberError(f"{self.name}: {what} of CG {seq} refused; this member's CG is {c.seq}")
        if c.machine.phase is Phase.IDLE:
            raise MemberError(f"{self.name}: {what} of CG {seq} refused; the CG ended here "
                              f"({c._fail_reason or 'committed'})")

    async def _step(self, seq: int, what: str, step: Callable[[], Awaitable]) -> object:
        task = asyncio.ensure_future(self.cycle.guard(step()))
        try:
            ok, result = await asyncio.shield(task)
        except asyncio.CancelledError:  # the master gave up waiting: this CG fails here too
            self.cycle.request_fail(f"the master gave up on {what}")
            await asyncio.gather(task, return_exceptions=True)
            raise
        if not ok:
            raise MemberError(f"{self.name}: {what} of CG {seq} failed: {result}")
        return result

    def _cancel_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    # ---------------------------------------------------------------- MemberPort
    async def hello(self, session_id: str) -> MemberState:
        if session_id != self.primary.session_id:
            raise MemberError(f"{self.name}: session {session_id!r} is not this member's "
                              f"{self.primary.session_id!r}")
        return await self.status()

    async def start(self, seq: int) -> None:
        c, p = self.cycle, self.primary
        if p.copy_state is not CopyState.RUNNING:
            raise MemberError(f"{self.name}: start of CG {seq} refused; copy state {p.copy_state.value}")
        if c.machine.phase is not Phase.IDLE:
            raise MemberError(f"{self.name}: start of CG {seq} refused; CG {c.seq} is {c.machine.phase.value}")
        doubt = self.in_doubt_seq
        if doubt:
            raise MemberError(f"{self.name}: start of CG {seq} refused; CG {doubt} is in doubt here")
        floor = max(c.seq, c.region.record["seq"], c.remote_committed)
        if seq <= floor:
            raise MemberError(f"{self.name}: start of CG {seq} refused; not newer than CG {floor}")
        if not c.connected:  # hello first, before the gate closes
            try:
                await c.connect()
            except RemoteError as e:
                raise MemberError(f"{self.name}: the secondary refused the pairing: {e}") from e
            except LINK_ERRORS as e:  # the member answers; its own secondary does not
                raise MemberError(f"{self.name}: its secondary is not reachable: {e}") from e
        await self._step(seq, "start", lambda: self._start(seq))

    async def _start(self, seq: int) -> None:
        c = self.cycle
        await c.quiesce(seq)
        await asyncio.sleep(0)  # writes already accepted land before CR exists
        if c.before_switch is not None:
            await c.before_switch()
        c.machine.handle(Event.RECORDING_ON)  # driven: the acks stay held
        if not self.hold_acks:
            c.release()

    async def run(self, seq: int) -> None:
        self._check(seq, "run")
        c = self.cycle
        c.release()
        if c.region.record["consecutive"] < c.params.max_failures_before_untimed:
            self._drain_timer = c.clock.call_later(
                c.params.max_drain_s, lambda: c.request_fail("max drain time exceeded", Event.TIMEOUT))

    async def drain(self, seq: int) -> None:
        self._check(seq, "drain")
        if not await self._step(seq, "drain", self.cycle.drain):
            raise MemberError(f"{self.name}: drain of CG {seq} left {self.cycle.region.oos_tracks()} OOS tracks")

    async def prepare(self, seq: int) -> None:
        self._check(seq, "prepare")
        self._cancel_drain_timer()
        await self._step(seq, "prepare", self.cycle.prepare_cg)

    async def commit(self, seq: int) -> None:
        c = self.cycle
        if seq == self.in_doubt_seq:  # the CG failed here after prepare; another member committed it
            await c.remote.commit(seq)
            self._resolved = seq
            c.remote_committed = max(c.remote_committed, seq)
            c.events.emit("change", "cg", seq=seq, result="committed", in_doubt="resolved")
            return
        self._check(seq, "commit")
        await self._step(seq, "commit", c.commit_prepared)

    async def fail(self, seq: int, reason: str) -> None:
        c = self.cycle
        if seq == self.in_doubt_seq:
            await c.remote.abort(seq)
            self._resolved = seq
            return
        if seq != c.seq:
            raise MemberError(f"{self.name}: fail of CG {seq} refused; this member's CG is {c.seq}")
        if c.remote_committed >= seq:
            raise MemberError(f"{self.name}: fail of CG {seq} refused; it is committed here")
        self._cancel_drain_timer()
        prepared = c.machine.phase is Phase.COMMITTING or c.prepared_seq == seq
        if c.machine.phase is not Phase.IDLE:
            await c.fail(reason)
        if prepared:  # in doubt by itself it would not abort: the master says revert
            await c.remote.abort(seq)
            self._resolved = seq

    def master_lost(self, reason: str = "master lost") -> None:
        """The control link to the master broke: fail the CG in flight here
        (before prepare it aborts at the secondary; after, it is in doubt)."""
        self.master, self.master_down_reason = "", reason
        self._cancel_drain_timer()
        self.cycle.request_fail(reason)

    def master_joined(self, master: str) -> None:
        self.master, self.master_down_reason = master, ""

    async def status(self) -> MemberState:
        p, c = self.primary, self.cycle
        rec = c.region.record
        return MemberState(name=self.name, session_id=p.session_id, copy_state=p.copy_state.value,
                           phase=c.machine.phase.value, link="up" if p.link_up else "down",
                           committed_seq=rec.get("committed_seq", 0), oos_tracks=p.oos_tracks(),
                           cr_tracks=p.cr_tracks(), held_ack_ms=c.gate.stats(),
                           last_cg_time=rec.get("commit_wall") or None, cg_seq=c.seq,
                           in_doubt_seq=self.in_doubt_seq)


# ============================================================================ the master
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


class SessionMaster:
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

    # ---------------------------------------------------------------- recovery
    def _can_recover(self) -> bool:
        return all(m.name in self.secondaries for m in self.members)

    async def _states(self) -> dict[str, RecoveryState]:
        """Every member's secondary's state; MemberError naming those that do not answer."""
        timeout = max(1.0, self.params.max_coord_ms / 1000.0 * 20)
        names = [m.name for m in self.members]
        missing = [n for n in names if n not in self.secondaries]
        if missing:
            raise MemberError(f"session recover needs every member's secondary; not configured for "
                              f"{', '.join(missing)} ([session] secondaries on the master)")
        got = await asyncio.gather(*(self._bounded(self.secondaries[n].recovery_state(), timeout)
                                     for n in names), return_exceptions=True)
        silent = [f"{n} ({type(g).__name__}: {g})" for n, g in zip(names, got, strict=True)
                  if isinstance(g, BaseException)]
        if silent:
            raise MemberError(f"secondaries not reachable: {'; '.join(silent)}")
        return dict(zip(names, got, strict=True))

    async def recover_session(self, reason: str = "operator") -> list[dict]:
        """``session recover``: between two CGs, bring every member's C to one
        CG (``recover``), then tell each member primary still in doubt what
        became of its CG. One row per member (``recover_members``)."""
        async with self._formation:
            return await self._recover(await self._states(), reason)

    async def _recover(self, states: Mapping[str, RecoveryState], reason: str) -> list[dict]:
        rows = await recover_members({n: self.secondaries[n] for n in states}, states)
        cg = rows[0]["committed"] if rows else 0
        self.recovery["runs"] += 1
        self.recovery["last"] = {"reason": reason, "cg": cg, "time": self.clock.wall(),
                                 "actions": {r["name"]: r["action"] for r in rows}}
        self.recovery["needed"] = ""
        for r in rows:
            if r["action"] != "none":
                self.events.emit("change", f"member name:{r['name']}", recovery=r["action"], seq=r["prepared"],
                                 committed=r["committed"])
        self.events.emit("change", "session", recover=reason, cg=cg)
        log.info("session recover (%s): %s -> every C at CG %d", reason,
                 {r["name"]: r["action"] for r in rows}, cg)
        # Each member primary in doubt learns the outcome from its own secondary's C.
        committed = {r["name"]: r["committed"] for r in rows}
        for m in self.members:
            rec = self.records[m.name]
            doubt = rec.in_doubt_seq or self.unresolved.get(m.name, (0, ""))[0]
            if doubt:
                self.unresolved[m.name] = (doubt, "commit" if committed[m.name] >= doubt else "revert")
        if self.unresolved:
            await self.resolve()
        await self._refresh()
        for r in rows:
            r["member"] = self.records[r["name"]].state
        return rows

    async def _check_recovery(self, force: bool = False) -> None:
        """The loop's automatic recovery: at most once a second, look at every
        secondary; one holding a prepared CG (in doubt) means recover, once
        every secondary answers."""
        doubt = {n: r.in_doubt_seq for n, r in self.records.items() if r.in_doubt_seq}
        if not self.auto_recover or not self._can_recover():
            if doubt and not self.unresolved:
                self.recovery["needed"] = (f"CG in doubt at {doubt}: run session recover (the master has no "
                                           "[session] secondaries to do it by itself)")
            return
        now = self.clock.now()
        if not force and now - self._last_check < 1.0:
            return
        self._last_check = now
        try:
            states = await self._states()
        except MemberError as e:
            if doubt:
                self.recovery["needed"] = f"CG in doubt at {doubt}; recovery waits: {e}"
            return
        prepared = {n: s.prepared_seq for n, s in states.items() if s.prepared_seq is not None}
        if not prepared and all(n in self.unresolved for n in doubt):
            self.recovery["needed"] = ""  # nothing in doubt, or only what resolve() sends again
            return
        try:
            async with self._formation:
                await self._recover(states, "automatic")
        except Exception as e:  # noqa: BLE001 - said in status; the next check tries again
            self.recovery["needed"] = f"automatic recovery failed: {type(e).__name__}: {e}"
            log.warning("session: automatic recovery failed: %s", e)

    async def failover_session(self) -> dict[str, int]:
        """``session failover``: fast reverse restore C -> B on every member's
        secondary. Refused while CGs form (pause first) or a CG is in doubt."""
        if self.primary.copy_state is CopyState.RUNNING:
            raise MemberError("session failover: CGs are being formed; cg pause (or pair suspend) first")
        async with self._formation:
            await self._states()  # every secondary configured and answering
            grains = await failover(self.secondaries)
        self.events.emit("change", "session", failover="done", grains=sum(grains.values()))
        return grains

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
        tasks = [*(asyncio.ensure_future(k.wait()) for k in kicks), asyncio.ensure_future(self.clock.sleep(seconds))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()


def _stats(values) -> dict:
    v = sorted(values)
    if not v:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    def pct(p: float) -> float:
        return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]
    return {"p50": pct(0.5), "p99": pct(0.99), "max": v[-1], "count": len(v)}


# ============================================================================ recovery
def plan_recovery(states: Mapping[str, RecoveryState]) -> dict[str, str]:
    """What brings every member's C to one CG: with P the highest CG any
    member holds prepared, commit P everywhere it is prepared when any member
    already committed P (the master had passed the commit point), else revert
    every prepared CG. Returns {member: "commit" | "revert" | "none"}."""
    prepared = [s.prepared_seq for s in states.values() if s.prepared_seq is not None]
    if not prepared:
        return {name: "none" for name in states}
    top = max(prepared)
    roll_forward = any(s.committed_seq >= top for s in states.values())
    plan = {}
    for name, s in states.items():
        if s.prepared_seq is None:
            plan[name] = "none"
        elif roll_forward and s.prepared_seq == top:
            plan[name] = "commit"
        else:
            plan[name] = "revert"
    return plan


async def recover(members: Mapping[str, FlashPort]) -> dict[str, str]:
    """``session recover``: read every member's secondary, apply
    ``plan_recovery``, and check that every C now shows the same CG."""
    rows = await recover_members(members)
    return {r["name"]: r["action"] for r in rows}


async def recover_members(members: Mapping[str, FlashPort],
                          states: Mapping[str, RecoveryState] | None = None) -> list[dict]:
    """``recover`` with what each member did: one row per member with
    ``name``, ``committed_before``, ``prepared`` (the CG in doubt, or None),
    ``action`` (commit | revert | none) and ``committed`` (its C's CG after).
    MemberError when the Cs still differ afterwards."""
    names = list(members)
    if states is None:
        states = dict(zip(names, await asyncio.gather(*(members[n].recovery_state() for n in names)),
                          strict=True))
    plan = plan_recovery(states)

    async def apply(name: str) -> None:
        seq = states[name].prepared_seq
        if plan[name] == "commit":
            await members[name].commit_flash(seq)
        elif plan[name] == "revert":
            await members[name].revert_flash(seq)
    await asyncio.gather(*(apply(n) for n in names))
    after = await asyncio.gather(*(members[n].recovery_state() for n in names))
    seqs = {n: s.committed_seq for n, s in zip(names, after, strict=True)}
    if len(set(seqs.values())) > 1:
        raise MemberError(f"after recovery the members' C show different CGs: {seqs}")
    log.info("session recover: %s -> CG %s", plan, next(iter(seqs.values()), None))
    return [{"name": n, "committed_before": states[n].committed_seq, "prepared": states[n].prepared_seq,
             "action": plan[n], "committed": seqs[n]} for n in names]


async def failover(members: Mapping[str, FlashPort]) -> dict[str, int]:
    """Fast reverse restore C -> B on every member (after ``recover``: every C
    at one CG). Returns grains restored per member."""
    names = list(members)
    states = await asyncio.gather(*(members[n].recovery_state() for n in names))
    doubt = {n: s.prepared_seq for n, s in zip(names, states, strict=True) if s.prepared_seq is not None}
    seqs = {s.committed_seq for s in states}
    if doubt or len(seqs) > 1:
        raise MemberError(f"failover needs every C at one CG (session recover first): in doubt {doubt}, "
                          f"committed {sorted(seqs)}")
    grains = await asyncio.gather(*(members[n].fast_reverse_restore() for n in names))
    return dict(zip(names, grains, strict=True))
