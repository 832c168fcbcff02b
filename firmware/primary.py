"""Primary: the controller that owns volume A (DESIGN.md section 1), as a
façade of commands and status over the rooms that do the work:

- firmware/region.py    the NVRAM: layout, format, recovery, OOS/CR, CG record
- firmware/hostpath.py  where a host write lands and a host read is answered
- firmware/cgcycle.py   where a CG forms and fails
- firmware/cgloop.py    the loop that forms them one after another
- firmware/drain.py     how an old image reaches the secondary
- firmware/copystate.py Running / Paused / Suspended / Fatal, one table

The commands here (start, stop, pause, resume, suspend, resume_pair, run,
set) are what the console and the harness call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from firmware.cg import Event, Phase
from firmware.cgloop import CgLoop
from firmware.copystate import CopyState, CopyStateMachine
from firmware.crashpoints import CrashPoints
from firmware.destage import Destager
from firmware.drain import LINK_ERRORS
from firmware.errors import CgFailed, InvalidTransition, NvramError
from firmware.events import EventBus
from firmware.hostpath import HostPath, PrimaryTarget
from firmware.layout import region_is_blank
from firmware.params import SessionParams
from firmware.region import PrimaryRegion
from firmware.remote import RemoteError, RemotePort, VolumeGeometry
from firmware.volumes import Volumes
from hal.block import BlockDevice
from hal.clock import Clock
from hal.host import HostTarget
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)


class Primary:
    def __init__(self, volumes: dict[str, BlockDevice], nvram: NvramRegion, clock: Clock,
                 params: SessionParams, remote: RemotePort, *, session_id: str = "default",
                 events: EventBus | None = None, crashpoints: CrashPoints | None = None) -> None:
        self.volumes = Volumes(volumes, params.track_bytes)
        self.nvram = nvram
        self.clock = clock
        self.params = params
        self.session_id = session_id
        self.events = events if events is not None else EventBus()
        crashpoints = crashpoints if crashpoints is not None else CrashPoints()
        self.region = PrimaryRegion(nvram)
        self.session = CopyStateMachine(self.events)
        self.cycle = CgLoop(self.volumes, self.region, remote, params, clock, self.events, crashpoints,
                            self.session, session_id)
        self.host = HostPath(self.volumes, self.region, self.cycle, params, crashpoints)
        self.cycle.before_switch = self.host.landed_whole
        self.destager: Destager | None = None
        self.recovered: dict = {}
        self.session_master = None  # firmware/session_master.py SessionMaster, when this primary is a session's master
        self._start_wall = 0.0
        self._opened = False

    # ================================================================ wiring
    @property
    def remote(self) -> RemotePort:
        return self.cycle.remote

    @remote.setter
    def remote(self, remote: RemotePort) -> None:
        self.cycle.remote = self.cycle.drainer.remote = remote

    @property
    def crashpoints(self) -> CrashPoints:
        return self.cycle.crashpoints

    @crashpoints.setter
    def crashpoints(self, crashpoints: CrashPoints) -> None:
        self.cycle.crashpoints = self.cycle.drainer.crashpoints = self.host.crashpoints = crashpoints

    @property
    def coordinate(self) -> Callable[[], Awaitable[None]] | None:
        """Hook for a session master: awaited between quiesce and run."""
        return self.cycle.coordinate

    @coordinate.setter
    def coordinate(self, hook: Callable[[], Awaitable[None]] | None) -> None:
        self.cycle.coordinate = hook

    # What tests and status look at, named as before the split.
    names = property(lambda self: self.volumes.names)
    devices = property(lambda self: self.volumes.devices)
    track_bytes = property(lambda self: self.volumes.track_bytes)
    plan = property(lambda self: self.region.plan)
    cache = property(lambda self: self.region.cache)
    oos = property(lambda self: self.region.oos)
    cr = property(lambda self: self.region.cr)
    machine = property(lambda self: self.cycle.machine)
    gate = property(lambda self: self.cycle.gate)
    copy_state = property(lambda self: self.session.state)
    fatal_reason = property(lambda self: self.session.fatal_reason)
    drain_bytes = property(lambda self: self.cycle.drainer.drain_bytes)
    fallbacks = property(lambda self: self.host.fallbacks)
    send_first_sends = property(lambda self: self.host.send_first_sends)

    @property
    def link_up(self) -> bool:
        """The link is up (the remote's word) and the pairing was said hello on it."""
        return self.cycle.connected and self.remote.link_up

    # ================================================================ NVRAM
    async def open(self, format: bool = False) -> None:  # noqa: A002 - contract name
        if format or region_is_blank(self.nvram.view):
            self._format()
        else:
            self._recover()
        self._opened = True
        self.destager = Destager(self.cache, self.volumes.devices, self.volumes.track_len,
                                 self.params.destage_inflight)
        self.host.attach(self.destager)

    def _format(self) -> None:
        tb = self.volumes.track_bytes = self.params.track_bytes
        for dev in self.devices:
            if tb % dev.info.block_size:
                raise NvramError(f"track_bytes {tb} is not a multiple of {dev.info.url}'s "
                                 f"block size {dev.info.block_size}")
        # A new generation per format: a secondary that committed for another
        # one demands a full copy (A may hold anything now).
        generation = max(1, int(self.clock.wall() * 1e6))
        self.region.format(list(self.volumes.sizes_by_name().items()), tb, self.session_id, generation)
        self.recovered = {"formatted": True}

    def _recover(self) -> None:
        self.recovered = self.region.recover(self.volumes.sizes_by_name())
        self.volumes.reorder(self.region.names)
        plan = self.region.plan
        self.volumes.track_bytes = plan.track_bytes
        if self.params.track_bytes != plan.track_bytes:
            log.warning("track_bytes %d from NVRAM overrides %d", plan.track_bytes, self.params.track_bytes)
            self.params.track_bytes = plan.track_bytes
        rec = self.region.record
        self.cycle.seq = rec["seq"]
        self.cycle.cut_wall = rec["cut_wall"]
        self.cycle.remote_committed = rec["committed_seq"]

    # ================================================================ start / stop
    async def start(self, *, form_cgs: bool = True, destage: bool = True) -> None:
        """Connect the remote and begin CG formation. ``form_cgs``/``destage``
        False leave the steps to the caller (tests drive them one by one)."""
        if not self._opened:
            await self.open()
        self.cycle.arm()
        self._start_wall = self.clock.wall()
        self.session.to(CopyState.RUNNING)
        try:
            await self.cycle.connect()
        except RemoteError:
            raise
        except LINK_ERRORS as e:
            log.warning("secondary not reachable at start: %s (will retry)", e)
        if destage:
            self.host.destaging_bg = True
            self.destager.start(self.clock.sleep)
        if form_cgs and not self.cycle.driven:  # a session member's CGs are formed by its master
            self.cycle.start_loop()

    async def stop(self, clean: bool = True) -> None:
        if self.session_master is not None:
            await self.session_master.stop_loop()
        await self.cycle.stop_loop()
        if self.destager is not None:
            await self.destager.stop()
            if clean:
                try:
                    await self.destager.destage()
                except Exception as e:  # noqa: BLE001 - the cache keeps the data; report and go on
                    log.warning("destage at stop failed: %s", e)
        await self.cycle.settle()
        if self._opened and clean:
            self.region.mark_clean(True)
        self.session.to(CopyState.SUSPENDED)

    # ================================================================ host I/O
    def host_target(self) -> HostTarget:
        return PrimaryTarget(self.host)

    async def write(self, volume: str, offset: int, data, *, fua: bool = False) -> None:
        await self.host.write(volume, offset, data, fua=fua)

    async def read(self, volume: str, offset: int, length: int) -> bytes:
        return await self.host.read(volume, offset, length)

    async def flush(self, volume: str | None = None) -> None:
        await self.host.flush(volume)

    # ================================================================ CG steps (tests drive them one by one)
    async def quiesce(self) -> int:
        """Step 1: hold write acknowledgements. Returns the CG sequence."""
        return await self.cycle.quiesce()

    async def drain(self, limit: int | None = None) -> bool:
        """Step 3: send OOS tracks; True when OOS is empty."""
        return await self.cycle.drain(limit)

    async def commit_cg(self) -> None:
        """Steps 4 and 5: two-phase commit at the secondary, then the swap."""
        await self.cycle.commit_cg()

    async def form_cg(self) -> bool:
        """One whole CG with the timers. True if committed."""
        return await self.cycle.form_cg()

    # ================================================================ commands
    async def run(self) -> None:
        """Claim 10: resume acknowledging host writes and record in CR (the
        drain follows). From quiescing: create CR and release the held acks.
        From Paused: resume forming CGs."""
        if self.machine.phase is Phase.QUIESCING:
            self.machine.handle(Event.RECORDING_ON)
        elif self.copy_state in (CopyState.PAUSED, CopyState.PAUSING):
            await self.cg_resume()
        elif self.machine.phase is Phase.IDLE and self.cycle.loop_task is None:
            raise InvalidTransition(self.machine.phase, Event.RECORDING_ON)
        elif self.cycle.kick is not None:
            self.cycle.kick.set()  # Running: the next CG forms now, not after the interval

    async def cg_start(self) -> None:
        cycle = self.cycle
        if cycle.driven:
            if self.session_master is None:
                raise CgFailed("this primary is a session member: its master forms the CGs")
            if self.copy_state in (CopyState.PAUSED, CopyState.PAUSING):
                self.session.to(CopyState.RUNNING)
            self.session_master.start_loop()
            self.session_master.kick.set()
            return
        if cycle.loop_task is None:
            if cycle.kick is None:
                await self.start()
                return
            cycle.stopping = False
            cycle.start_loop()
        if self.copy_state in (CopyState.PAUSED, CopyState.PAUSING):
            self.session.to(CopyState.RUNNING)
        cycle.kick.set()

    async def cg_pause(self) -> None:
        if self.copy_state in (CopyState.SUSPENDED, CopyState.FATAL):
            raise CgFailed(f"the pair is {self.copy_state.value}: no CG is being formed, nothing to pause")
        if self.machine.phase is Phase.IDLE:
            self.session.to(CopyState.PAUSED)
        else:
            self.session.to(CopyState.PAUSING)
            await self.cycle.wait_cg_end()
            self.session.to(CopyState.PAUSED)

    async def cg_resume(self) -> None:
        if self.copy_state is CopyState.FATAL:
            raise CgFailed(f"session is Fatal ({self.fatal_reason}); resume_pair after fixing it")
        self.session.to(CopyState.RUNNING)
        if self.cycle.kick is not None:
            self.cycle.kick.set()

    async def cg_fail(self, reason: str = "operator") -> None:
        await self.cycle.fail(reason)

    async def suspend(self) -> None:
        """Stop replicating; writes keep landing and setting OOS."""
        self.session.to(CopyState.SUSPENDED)
        if self.machine.phase is not Phase.IDLE:
            await self.cycle.fail("suspended")

    async def resume_pair(self) -> None:
        await self.cycle.connect()
        self.session.to(CopyState.RUNNING)
        if self.cycle.kick is not None:
            self.cycle.kick.set()

    def set_param(self, name: str, text: str) -> None:
        if name == "track_bytes" and self._opened and str(text).strip() != str(self.track_bytes):
            raise ValueError("track_bytes is fixed when the NVRAM is formatted")
        self.params.set(name, text)
        if self.destager is not None:
            self.destager.inflight = self.params.destage_inflight
        if self.cycle.kick is not None:
            self.cycle.kick.set()

    # ================================================================ status
    def oos_tracks(self) -> int:
        return self.region.oos_tracks()

    def cr_tracks(self) -> int:
        return self.region.cr_tracks()

    def geometry(self) -> list[VolumeGeometry]:
        return self.volumes.geometry()

    def data_exposure_s(self) -> float:
        now = self.clock.wall()
        rec = self.region.record
        if rec.get("committed_seq"):
            if self.cycle.last_write_wall <= rec["cut_wall"] and not self.oos_tracks() and not self.cr_tracks():
                return 0.0
            return max(0.0, now - rec["cut_wall"])
        return max(0.0, now - self._start_wall) if self._start_wall else 0.0

    def status(self) -> dict:
        rec = self.region.record
        state = self.copy_state
        consecutive = rec.get("consecutive", 0)
        recoverable = bool(rec.get("committed_seq") or self.cycle.remote_committed)
        if state in (CopyState.FATAL, CopyState.SUSPENDED) or (
                not recoverable and state is CopyState.RUNNING and self._start_wall and self.oos_tracks()):
            severity = "Severe" if state in (CopyState.FATAL, CopyState.SUSPENDED) else "Warning"
        elif consecutive or state is not CopyState.RUNNING or not self.link_up:
            severity = "Warning"
        else:
            severity = "Normal"
        # RPO thresholds (0: off) raise it further while the exposure exceeds them.
        exposure, params = self.data_exposure_s(), self.params
        if params.rpo_severe_s and exposure > params.rpo_severe_s:
            severity = "Severe"
        elif params.rpo_warning_s and exposure > params.rpo_warning_s and severity == "Normal":
            severity = "Warning"
        return {
            "copy_state": state.value,
            "fatal_reason": self.fatal_reason,
            "phase": self.machine.phase.value,
            "cg_seq": self.cycle.seq,
            "committed_seq": rec.get("committed_seq", 0),
            "last_cg_time": rec.get("commit_wall") or None,
            "data_exposure_s": exposure,
            "total_successful_cgs": rec.get("successful", 0),
            "total_failed_cgs": rec.get("failed", 0),
            "consecutive_failures": consecutive,
            "cg_interval_s": self.params.cg_interval_s,
            "max_coord_ms": self.params.max_coord_ms,
            "max_drain_s": self.params.max_drain_s,
            "collision_policy": self.params.collision_policy,
            "oos_tracks": self.oos_tracks(),
            "cr_tracks": self.cr_tracks(),
            "recoverable": recoverable,
            "severity": severity,
            "held_ack_ms": self.gate.stats(),
            "drain_bytes": self.drain_bytes,
            "link": "up" if self.link_up else "down",
            "fallbacks": self.fallbacks,
            "cache_full_waits": self.cache.counters.full_waits,  # host writes that waited: NVRAM truly full
        } | ({"members": self.session_master.members_status()} if self.session_master is not None else {})

    def volumes_info(self) -> list[dict]:
        out = []
        for vi, (name, dev) in enumerate(zip(self.names, self.devices, strict=True)):
            out.append({"name": name, "size_bytes": dev.info.size_bytes, "track_bytes": self.track_bytes,
                        "tracks": self.plan.volumes[vi].tracks, "oos_tracks": self.oos[vi].count(),
                        "cr_tracks": self.cr[vi].count(), "url": dev.info.url})
        return out

    def bitmap(self, kind: str, volume: str, start_track: int = 0, end_track: int | None = None) -> dict:
        if kind not in ("oos", "cr"):
            raise ValueError(f"bitmap kind must be 'oos' or 'cr', not {kind!r}")
        vi = self.volumes.index(volume)
        bm = (self.oos if kind == "oos" else self.cr)[vi]
        end = bm.tracks if end_track is None else min(end_track, bm.tracks)
        if start_track < 0 or start_track > end:
            raise ValueError(f"track range {start_track}..{end} outside 0..{bm.tracks}")
        count = bm.count() if (start_track, end) == (0, bm.tracks) else bm.count_range(start_track, end)
        return {"count": count, "tracks": end - start_track, "runs": bm.runs(start_track, end, 64)}

    def cache_stats(self) -> dict:
        return self.cache.stats()
