"""Where a consistency group forms: the steps of one CG and how one fails
(DESIGN.md section 1, "Cycle"). The loop that forms them one after another
is firmware/cgloop.py.

A CG: quiesce (hold acks) -> CR created, acks released (``run``) -> drain
every OOS track (firmware/drain.py) -> two-phase commit at the secondary ->
swap (CR becomes OOS). The phase table is firmware/cg.py; the side effects
of entering each phase are the ``_enter_*`` methods here, and nowhere else.

How a failure travels: whoever sees it (the drain timer, the quiesce timer,
a send-first write, an operator) calls ``request_fail``. While ``form_cg``
runs a CG body, that only resolves ``form_cg``'s fail future: ``form_cg``
cancels the body and fails the machine itself, so the fold back happens
once, in the task that owns the CG. With no body running (tests that step
by hand) ``request_fail`` fails the machine at once. Entering idle on a
failure opens the gate, folds CR back into OOS, and wakes everyone waiting
for the CG to end (``wait_cg_end``).

Driven mode (``driven``, a session member, firmware/session_member.py): the CG loop
is off and a session master calls the steps one by one, each under ``guard``
(the same failure path as ``form_cg``). The master gives the CG its sequence
(``quiesce(seq)``), the acks stay held after the CR switch until the master
says run (``release``; the gate's own max-hold timer still bounds them), and
prepare and commit are separate steps (``prepare_cg``, ``commit_prepared``).
A member that fails by itself after its secondary prepared does not abort
there: another member may have committed, so the master (or ``session
recover``) decides whether that CG commits or reverts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from firmware import crashpoints as cp
from firmware.cg import CgMachine, Event, Phase
from firmware.copystate import CopyState, CopyStateMachine
from firmware.crashpoints import CrashPoints
from firmware.drain import LINK_ERRORS, Drainer
from firmware.errors import CgFailed, InvalidTransition
from firmware.events import EventBus
from firmware.layout import PHASE_CODES
from firmware.params import SessionParams
from firmware.quiesce import QuiesceGate
from firmware.region import PrimaryRegion
from firmware.remote import RemoteError, RemotePort, RemoteState
from firmware.volumes import Volumes
from hal.clock import Clock

log = logging.getLogger(__name__)

BEFORE_COMMIT = cp.declare("primary.before_commit", "drain done, prepare not yet sent")
AFTER_PREPARE = cp.declare("primary.after_prepare", "the secondary prepared; commit not yet sent")
AFTER_RECORDING_ON = cp.declare("primary.after_recording_on", "CR exists, held acks not yet released")
AFTER_COMMIT = cp.declare("primary.after_commit", "the secondary committed; the swap is not yet recorded")


class CgCycle:
    def __init__(self, volumes: Volumes, region: PrimaryRegion, remote: RemotePort, params: SessionParams,
                 clock: Clock, events: EventBus, crashpoints: CrashPoints, session: CopyStateMachine,
                 session_id: str) -> None:
        self.volumes = volumes
        self.region = region
        self.remote = remote
        self.params = params
        self.clock = clock
        self.events = events
        self.crashpoints = crashpoints
        self.session = session
        self.session_id = session_id
        self.gate = QuiesceGate(clock)
        self.machine = CgMachine({Phase.IDLE: self._enter_idle, Phase.QUIESCING: self._enter_quiescing,
                                  Phase.DRAINING: self._enter_draining,
                                  Phase.COMMITTING: self._enter_committing})
        self.drainer = Drainer(volumes, region, remote, crashpoints, self.in_cg, self.link_lost)
        # Hook for a session master: awaited between quiesce and run (subordinates switch to CR).
        self.coordinate: Callable[[], Awaitable[None]] | None = None
        # Awaited right before the CR switch, gate closed: the host path's
        # chunked writes finish landing, so none straddles the switch.
        self.before_switch: Callable[[], Awaitable[None]] | None = None
        self.seq = 0
        self._next_seq: int | None = None  # the master's sequence for the next quiesce (driven mode)
        self.driven = False  # a session master drives the steps; the acks stay held until release()
        self.prepared_seq = 0  # the CG whose prepare the secondary answered (driven: not aborted by ourselves)
        self.remote_committed = 0
        self.connected = False  # hello done on the current link; False: say hello before the next CG
        self.last_write_wall = 0.0
        self.cut_wall = 0.0
        self.stopping = False  # a stop is under way: no CG may start
        self._fail_fut: asyncio.Future | None = None
        self._fail_reason = ""
        self.body: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()
        self._cg_end_waiters: list[asyncio.Future] = []
        self._cg_started = 0.0

    def in_cg(self, seq: int) -> bool:
        """CG ``seq`` is the one being formed and recording is on."""
        return self.machine.recording and seq == self.seq

    def note_write(self) -> None:
        """A host write landed (the CG loop's interval wait wakes for it)."""
        self.last_write_wall = self.clock.wall()

    # ================================================================ the pair
    async def connect(self) -> RemoteState:
        """Hello: learn what the secondary holds. A full copy (every OOS bit
        set) goes to a secondary that is new or emptied, that last committed
        for another NVRAM format (``new``), or that committed a CG this
        primary never formed: some other peer with the secret wrote C, and
        only a full copy makes it ours again (the next CG numbers above it)."""
        try:
            state = await self.remote.connect(self.session_id, self.volumes.geometry(),
                                              self.region.record["generation"])
        except RemoteError as e:
            self.connected = False
            self.session.to(CopyState.FATAL, reason=str(e))
            raise
        except LINK_ERRORS:
            self.connected = False
            raise
        self.connected = True
        self.remote_committed = state.committed_cg
        rec = self.region.record
        foreign = state.committed_cg > max(rec["seq"], self.seq)
        if foreign:
            log.warning("the secondary committed CG %d, which this primary never formed (last %d): full copy",
                        state.committed_cg, max(rec["seq"], self.seq))
        if state.new or state.committed_cg < rec["committed_seq"] or foreign:
            if self.machine.phase is not Phase.IDLE:
                self.fail_now("full copy requested by the secondary", Event.FAIL)
            for bm in self.region.oos:
                bm.set_range(0, bm.tracks)
            self.events.emit("change", "session", full_copy=True,
                             tracks=sum(b.tracks for b in self.region.oos))
        return state

    def link_lost(self) -> None:
        self.connected = False

    # ================================================================ the steps
    async def quiesce(self, seq: int | None = None) -> int:
        """Step 1: hold write acknowledgements (START). Returns the CG
        sequence: ``seq`` when a session master gives it, else the next one."""
        self._next_seq = seq
        try:
            self.machine.handle(Event.START)
        finally:
            self._next_seq = None
        return self.seq

    def release(self) -> float:
        """Driven mode, the master's run: release the acks held since the
        quiesce (CR exists on every member). Returns the hold in ms."""
        if self.machine.phase is not Phase.DRAINING:
            raise InvalidTransition(self.machine.phase, "run")
        held = self.gate.open()
        self.events.emit("change", "cg", seq=self.seq, phase="draining", held_ms=held, acks="released")
        return held

    async def drain(self, limit: int | None = None) -> bool:
        """Step 3: send OOS tracks (at most ``limit``; all when None) with
        ``drain_inflight`` in flight. True when OOS is empty."""
        if self.machine.phase is not Phase.DRAINING:
            raise InvalidTransition(self.machine.phase, "drain")
        await self.drainer.drain(self.seq, self.params.drain_inflight, limit)
        return self.region.oos_tracks() == 0

    async def commit_cg(self) -> None:
        """Steps 4 and 5: two-phase commit at the secondary, then the swap."""
        await self.prepare_cg()
        await self.commit_prepared()

    async def prepare_cg(self) -> None:
        """Step 4, phase one: drained -> committing; the secondary prepares."""
        seq = self.seq
        if self.machine.phase is Phase.DRAINING:
            if self.region.oos_tracks():
                raise CgFailed(f"CG {seq}: {self.region.oos_tracks()} OOS tracks not drained")
            await self.remote.drain_done(seq)
            self.machine.handle(Event.DRAINED)
        elif self.machine.phase is not Phase.COMMITTING:
            raise InvalidTransition(self.machine.phase, Event.DRAINED)
        self.crashpoints.hit(BEFORE_COMMIT)
        await self.remote.prepare(seq)
        self.prepared_seq = seq
        self.crashpoints.hit(AFTER_PREPARE)

    async def commit_prepared(self) -> None:
        """Step 4, phase two, and step 5: the secondary commits, then the swap."""
        seq = self.seq
        if self.machine.phase is not Phase.COMMITTING or self.prepared_seq != seq:
            raise InvalidTransition(self.machine.phase, Event.COMMITTED)
        await self.remote.commit(seq)
        self.crashpoints.hit(AFTER_COMMIT)
        self.remote_committed = seq
        self.machine.handle(Event.COMMITTED)

    # ================================================================ one whole CG
    async def form_cg(self) -> bool:
        """One whole CG with the timers, as the CG loop runs it. True if committed."""
        ok, result = await self.guard(self._cg_body())
        return ok and result

    async def guard(self, step: Awaitable) -> tuple[bool, object]:
        """Run ``step`` (a whole CG, or one step a session master asked
        for) as the body: a ``request_fail`` meanwhile cancels it, and a
        failure of either kind fails the machine here, once. Returns (True,
        the step's result) or (False, the reason)."""
        self._fail_fut = asyncio.get_running_loop().create_future()
        body = self.body = asyncio.ensure_future(step)
        try:
            await asyncio.wait({body, self._fail_fut}, return_when=asyncio.FIRST_COMPLETED)
            if not body.done():
                body.cancel()
                await asyncio.gather(body, return_exceptions=True)
            if not body.cancelled() and body.exception() is None:
                return True, body.result()
            if self._fail_fut.done():
                reason, event = self._fail_fut.result()
            else:
                exc = body.exception() if not body.cancelled() else CgFailed("cancelled")
                reason, event = f"{type(exc).__name__}: {exc}", Event.FAIL
                if isinstance(exc, (*LINK_ERRORS, RemoteError)):
                    self.link_lost()  # say hello again: it tells what the secondary holds now
            if self.machine.phase is not Phase.IDLE:
                self.fail_now(reason, event)
            return False, reason
        finally:
            if not body.done():  # guard itself was cancelled (stop): the body must not outlive it
                body.cancel()
            self._fail_fut = None
            self.body = None
            if self.machine.phase is Phase.IDLE or not self.driven:  # a driven step may end mid-CG
                self._wake_cg_end()

    def _wake_cg_end(self) -> None:
        waiters, self._cg_end_waiters = self._cg_end_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _cg_body(self) -> bool:
        # The body runs a loop iteration after form_cg created it: a pause (or
        # suspend) that came in between found the machine idle and reported
        # Paused at once, so no CG may start now (the demo reads C then).
        if self.session.state is not CopyState.RUNNING or self.stopping:
            return False
        await self.quiesce()
        if self.coordinate is not None:
            await self.coordinate()
        # No loop turn here: every ack it held waited for whatever else that
        # turn ran (NBD batches, drain and destage steps; bench held-ack p99
        # 3.4 ms for a p50 of 0.2). A write not yet landed lands after the
        # switch, in CR, and needs no hold; a write that waits for send-first
        # or a slot decides again, after the switch, where it lands.
        if self.before_switch is not None:
            await self.before_switch()
        self.machine.handle(Event.RECORDING_ON)
        timer = None
        consecutive = self.region.record["consecutive"]
        if consecutive < self.params.max_failures_before_untimed:
            timer = self.clock.call_later(self.params.max_drain_s,
                                          lambda: self.request_fail("max drain time exceeded", Event.TIMEOUT))
        else:
            log.info("CG %d drains without the timer after %d failures", self.seq, consecutive)
        try:
            await self.drain()
        finally:
            if timer is not None:
                timer.cancel()
        await self.commit_cg()
        return True

    # ================================================================ failing a CG
    def request_fail(self, reason: str, event: Event = Event.FAIL) -> None:
        """Fail the CG being formed (callable from timers and other tasks)."""
        if self.machine.phase is Phase.IDLE:
            return
        if self._fail_fut is not None:
            if not self._fail_fut.done():
                self._fail_fut.set_result((reason, event))
            return
        self.fail_now(reason, event)

    def fail_now(self, reason: str, event: Event) -> None:
        """Fail the machine here and now, and tell the secondary in the background."""
        seq = self.seq
        self._fail_reason = reason
        self.machine.handle(event)
        if self.driven and self.prepared_seq == seq:
            return  # in doubt: another member may have committed it; the master decides
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # failed from a timer outside the loop: the next CG's prepare supersedes it
            return
        task = loop.create_task(self._abort_remote(seq))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _abort_remote(self, seq: int) -> None:
        try:
            await self.remote.abort(seq)
        except Exception as e:  # noqa: BLE001 - best effort: C keeps the last commit anyway
            log.info("abort of CG %d not delivered: %s", seq, e)

    async def fail(self, reason: str) -> None:
        """Fail the CG in flight and return once it has ended (operator, suspend)."""
        if self.machine.phase is Phase.IDLE:
            raise InvalidTransition(Phase.IDLE, Event.FAIL)
        if self.body is not None and self._fail_fut is not None:
            fut = asyncio.get_running_loop().create_future()
            self._cg_end_waiters.append(fut)
            self.request_fail(reason, Event.FAIL)
            await fut
        else:
            self.fail_now(reason, Event.FAIL)

    async def wait_cg_end(self) -> None:
        if self.machine.phase is Phase.IDLE:
            return
        fut = asyncio.get_running_loop().create_future()
        self._cg_end_waiters.append(fut)
        if self.body is None and not self.driven:  # no runner will wake us: failing is synchronous then
            return
        await fut  # driven: entering idle wakes us, whichever step or request ends the CG

    async def settle(self) -> None:
        """Wait for background aborts (stop)."""
        for t in list(self._bg):
            await asyncio.gather(t, return_exceptions=True)

    # ================================================================ phase side effects
    def _enter_quiescing(self, event: Event) -> None:
        if self._next_seq is not None:
            self.seq = self._next_seq  # the session master's number, the same on every member
        else:
            self.seq = max(self.seq, self.region.record["seq"], self.remote_committed) + 1
        self.drainer.cg_tracks = 0
        self._cg_started = self.clock.now()
        self.gate.close(self.params.max_coord_ms / 1000.0,
                        lambda: self.request_fail("max coordination time exceeded", Event.TIMEOUT))
        self.region.save(seq=self.seq, phase=PHASE_CODES["quiescing"], start_wall=self.clock.wall())
        self.events.emit("create", "cg", seq=self.seq, phase="quiescing")

    def _enter_draining(self, event: Event) -> None:
        # Creating CR: one record write flips recording on (the CR area is
        # pre-allocated and empty). Only then are the held acks released.
        self.cut_wall = self.clock.wall()
        self.region.save(phase=PHASE_CODES["draining"], recording=1)
        self.crashpoints.hit(AFTER_RECORDING_ON)
        if self.driven:  # the acks stay held until the master's run (every member has CR by then)
            self.events.emit("change", "cg", seq=self.seq, phase="draining", oos_tracks=self.region.oos_tracks())
            return
        held = self.gate.open()
        self.events.emit("change", "cg", seq=self.seq, phase="draining", held_ms=held,
                         oos_tracks=self.region.oos_tracks())

    def _enter_committing(self, event: Event) -> None:
        self.region.save(phase=PHASE_CODES["committing"])
        self.events.emit("change", "cg", seq=self.seq, phase="committing")

    def _enter_idle(self, event: Event) -> None:
        self.drainer.cg_ended()
        rec = self.region.record
        if event is Event.COMMITTED:
            sel = self.region.swap()
            self.region.save(phase=0, recording=0, oos_select=sel, committed_seq=self.seq, cut_wall=self.cut_wall,
                             commit_wall=self.clock.wall(), successful=rec["successful"] + 1, consecutive=0)
            self.events.emit("destroy", "cg", seq=self.seq, result="committed", tracks=self.drainer.cg_tracks,
                             cycle_s=self.clock.now() - self._cg_started)
        else:
            self.gate.open()
            self.region.fold_back()
            self.region.save(phase=0, recording=0, failed=rec["failed"] + 1, consecutive=rec["consecutive"] + 1)
            log.info("CG %d failed: %s", self.seq, self._fail_reason)
            self.events.emit("destroy", "cg", seq=self.seq, result="failed", reason=self._fail_reason)
        if self.session.state is CopyState.PAUSING:
            self.session.to(CopyState.PAUSED)
        if self.driven and self.body is None:
            self._wake_cg_end()  # no guard runs to wake them (failed between two of the master's steps)
