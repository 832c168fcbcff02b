"""The CG loop: a ``CgCycle`` (firmware/cgcycle.py, one CG) that forms CGs
one after another (DESIGN.md section 1, "Cycle").

Each turn: say hello when the link is new, form one CG under the cycle's
guard, then wait the interval (``cg_interval_s``; with none, the next CG
starts at once unless nothing was written since the cut). A kick (``cg
run``, resume, ``set``, pair resume) ends any wait. An unexpected error
fails the CG in flight, is logged and counted (``total_loop_errors``), and
the loop goes on. A session member (driven mode) runs no loop: its master
forms the CGs (firmware/session_master.py) and takes this loop's kick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from firmware.cg import Event, Phase
from firmware.cgcycle import CgCycle
from firmware.copystate import CopyState
from firmware.drain import LINK_ERRORS
from firmware.remote import RemoteError

log = logging.getLogger(__name__)


async def wait_first(*aws: Awaitable) -> None:
    """Wait until the first of ``aws`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class CgLoop(CgCycle):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.total_loop_errors = 0  # unexpected errors the CG loop survived (each logged)
        self.loop_task: asyncio.Task | None = None
        self.kick: asyncio.Event | None = None
        self._write_seen: asyncio.Event | None = None

    def arm(self) -> None:
        """Create the loop's events (in the running loop)."""
        self.kick = asyncio.Event()
        self._write_seen = asyncio.Event()
        self.stopping = False

    def note_write(self) -> None:
        super().note_write()
        if self._write_seen is not None:
            self._write_seen.set()

    def start_loop(self) -> None:
        self.loop_task = asyncio.ensure_future(self._loop())

    async def stop_loop(self) -> None:
        self.stopping = True
        if self.loop_task is not None:
            if self.body is not None and not self.body.done():
                self.request_fail("stopping", Event.FAIL)
            self.loop_task.cancel()
            await asyncio.gather(self.loop_task, return_exceptions=True)
            self.loop_task = None
        if self.body is not None and not self.body.done():
            self.body.cancel()
            await asyncio.gather(self.body, return_exceptions=True)
        if self.machine.phase is not Phase.IDLE:
            self.fail_now("stopping", Event.FAIL)

    async def _loop(self) -> None:
        while not self.stopping:
            try:
                await self._loop_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any one CG's bug
                # A silent death of this task left a primary that never formed
                # another CG (link "down", phase idle). Log it, fail the CG in
                # flight so CR folds back into OOS, and go on.
                log.exception("CG loop: unexpected error in CG %d; failing it and going on", self.seq)
                self.total_loop_errors += 1
                if self.machine.phase is not Phase.IDLE:
                    try:
                        self.fail_now("internal error", Event.FAIL)
                    except Exception:  # noqa: BLE001
                        log.exception("CG loop: could not fail CG %d", self.seq)
                self.link_lost()  # reconnect and say hello again before the next CG
                await self.clock.sleep(0.5)

    async def _loop_step(self) -> None:
        """One turn of the CG loop: connect if needed, form one CG, wait the interval."""
        if self.session.state is not CopyState.RUNNING:
            self.kick.clear()
            await self.kick.wait()
            return
        if not self.connected:
            try:
                await self.connect()
            except RemoteError:
                return
            except LINK_ERRORS:
                await self.clock.sleep(1.0)
                return
        rec = self.region.record
        before = rec["successful"] + rec["failed"]
        committed = await self.form_cg()
        if rec["successful"] + rec["failed"] == before:
            await self.clock.sleep(0.1)  # the CG did not even start
        if self.session.state is CopyState.PAUSING:
            self.session.to(CopyState.PAUSED)
        if not committed and not self.connected:
            return
        await self._interval_wait(committed)

    async def _interval_wait(self, committed: bool) -> None:
        # The loop's kick (a `set`, resume, run, pair resume) ends any wait:
        # a wait that only slept once outlived every command, so a long
        # interval set by mistake could not be undone. A kick from before
        # this wait began was for the CG that just ran.
        self.kick.clear()
        interval = self.params.cg_interval_s
        if interval > 0:
            wakers = [self.clock.sleep(interval)]
        elif committed and not self.region.oos_tracks() and self.last_write_wall <= self.cut_wall:
            # Nothing written since the cut: wait for a write (or a second) instead of spinning.
            self._write_seen.clear()
            wakers = [self._write_seen.wait(), self.clock.sleep(1.0)]
        else:
            await asyncio.sleep(0)
            return
        await wait_first(self.kick.wait(), *wakers)
