"""A session member in this process (DESIGN.md section 3, the DS8000-style
master/subordinate session; issue 13): ``LocalMember``, a ``MemberPort``
(firmware/member.py) over a Primary whose own CG loop is off (driven mode,
firmware/cgcycle.py).

Only the hold makes a cut across controllers consistent: a host may write on
controller 1, see the ack, and *then* write on controller 2. If controller 1
switched to CR and acknowledged before controller 2 switched, C could show
the second write without the first. So every member holds its acks from its
own quiesce until the master has heard every member's start answer and says
run.

Each call runs one step of the member's CG under the cycle's guard, so a
member's own timers (the gate's max hold, the drain time) fail it the same
way as in a single controller. A request for another CG than the member's
is refused. A CG prepared here whose commit did not happen is in doubt
(``in_doubt_seq``) until a master sends its outcome (commit or fail).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from firmware.cg import Event, Phase
from firmware.copystate import CopyState
from firmware.drain import LINK_ERRORS
from firmware.member import MemberError, MemberPort, MemberState
from firmware.remote import RemoteError


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
        # No loop turn before the switch (as CgCycle): a write not yet landed
        # lands in CR, and its ack waits at the closed gate until the run.
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
        # The CG failed here after prepare and another member committed it; or
        # this member restarted with the CG in doubt at its secondary (its
        # record lost the prepare, so in_doubt_seq says nothing): commit there.
        restarted_in_doubt = (c.machine.phase is Phase.IDLE and seq == c.seq and c.remote_committed < seq)
        if seq == self.in_doubt_seq or restarted_in_doubt:
            if not c.connected:
                await c.connect()
            if c.remote_committed < seq:
                await c.remote.commit(seq)
            self._resolved = seq
            c.remote_committed = max(c.remote_committed, seq)
            c.events.emit("change", "cg", seq=seq, result="committed", in_doubt="resolved")
            return
        if c.machine.phase is Phase.IDLE and c.remote_committed >= seq:
            # Committed at our secondary already (the answer was lost, or this
            # member restarted after its commit): a repeated commit is done, not
            # refused. What the member folded back is resent in the next CG.
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
