"""Primary: the controller that owns volume A (DESIGN.md section 1).

Host writes land in the NVRAM write cache and set one bit per track, in OOS
while no CG is being formed, in CR while one is (change recording). A CG:
quiesce (hold acks) -> CR created, acks released (``run``) -> drain every OOS
track to the secondary -> two-phase commit -> swap (CR becomes OOS by a
pointer flip, because OOS is empty after a drain). A failure at any step
OR-merges CR into OOS and folds new images into old ones: nothing is lost.

The write path (``_land``) decides and lands a whole write without awaiting
in between, so a write is entirely before or entirely after the CR switch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from firmware import crashpoints as cp
from firmware.bitmap import TrackBitmap
from firmware.cache import Destager, WriteCache
from firmware.cg import CgMachine, Event, Phase
from firmware.crashpoints import CrashPoints
from firmware.errors import CacheFull, CgFailed, InvalidTransition, NvramError, VolumeError
from firmware.events import EventBus
from firmware.layout import (
    PHASE_CODES,
    PRIMARY_MAGIC,
    SECTOR_BYTES,
    STATE_CUR,
    STATE_NEW,
    VERSION,
    CgRecord,
    DoubleRecord,
    Header,
    RegionPlan,
    plan_region,
    read_header,
    region_is_blank,
)
from firmware.params import SessionParams
from firmware.quiesce import QuiesceGate
from firmware.remote import RemoteError, RemotePort, RemoteState, VolumeGeometry
from hal.block import BlockDevice
from hal.clock import Clock
from hal.host import HostTarget, HostVolume
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)

AFTER_CACHE_WRITE = cp.declare("primary.after_cache_write", "a host write is in NVRAM, not yet acknowledged")
BEFORE_OOS_CLEAR = cp.declare("primary.before_oos_clear", "a drained track was sent, its OOS bit not yet cleared")
MID_DRAIN = cp.declare("primary.mid_drain", "a drain track was read, not yet sent")
BEFORE_COMMIT = cp.declare("primary.before_commit", "drain done, prepare not yet sent")
AFTER_PREPARE = cp.declare("primary.after_prepare", "the secondary prepared; commit not yet sent")
AFTER_RECORDING_ON = cp.declare("primary.after_recording_on", "CR exists, held acks not yet released")
AFTER_COMMIT = cp.declare("primary.after_commit", "the secondary committed; the swap is not yet recorded")

RUNNING, PAUSED, PAUSING, SUSPENDED, FATAL = "Running", "Paused", "Pause in Progress", "Suspended", "Fatal"
LINK_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError)


class Primary:
    def __init__(self, volumes: dict[str, BlockDevice], nvram: NvramRegion, clock: Clock,
                 params: SessionParams, remote: RemotePort, *, session_id: str = "default",
                 events: EventBus | None = None, crashpoints: CrashPoints | None = None) -> None:
        if not volumes:
            raise VolumeError("a primary needs at least one volume")
        self.names = list(volumes)
        self.devices = [volumes[n] for n in self.names]
        self._vindex = {n: i for i, n in enumerate(self.names)}
        self.nvram = nvram
        self.clock = clock
        self.params = params
        self.remote = remote
        self.session_id = session_id
        self.events = events if events is not None else EventBus()
        self.crashpoints = crashpoints if crashpoints is not None else CrashPoints()
        self.gate = QuiesceGate(clock)
        self.machine = CgMachine({Phase.IDLE: self._enter_idle, Phase.QUIESCING: self._enter_quiescing,
                                  Phase.DRAINING: self._enter_draining,
                                  Phase.COMMITTING: self._enter_committing})
        # Hook for a session master: awaited between quiesce and run (subordinates switch to CR).
        self.coordinate: Callable[[], Awaitable[None]] | None = None
        self.track_bytes = params.track_bytes
        self.plan: RegionPlan | None = None
        self.cache: WriteCache | None = None
        self.destager: Destager | None = None
        self.oos: list[TrackBitmap] = []
        self.cr: list[TrackBitmap] = []
        self._areas: list[tuple[TrackBitmap, TrackBitmap]] = []
        self._rec: dict = {}
        self._rec_store: DoubleRecord | None = None
        self._header_store: DoubleRecord | None = None
        self._header: dict = {}
        self.copy_state = SUSPENDED
        self.fatal_reason = ""
        self.link_up = False
        self.drain_bytes = 0
        self.fallbacks = 0  # dual-image writes that fell back to send-first
        self.send_first_sends = 0
        self.total_loop_errors = 0  # unexpected errors the CG loop survived (each logged)
        self.recovered: dict = {}
        self._seq = 0
        self._remote_committed = 0
        self._inflight: dict[tuple[int, int], asyncio.Future] = {}
        self._last_write_wall = 0.0
        self._start_wall = 0.0
        self._fail_fut: asyncio.Future | None = None
        self._fail_reason = ""
        self._body: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None
        self._kick: asyncio.Event | None = None
        self._write_seen: asyncio.Event | None = None
        self._pause_requested = False
        self._stopping = False
        self._opened = False
        self._destaging_bg = False
        self._bg: set[asyncio.Task] = set()
        self._cg_end_waiters: list[asyncio.Future] = []
        self._max_landing_tracks = 1
        self._cut_wall = 0.0
        self._cg_tracks = 0
        self._cg_started = 0.0

    # ================================================================ NVRAM
    async def open(self, format: bool = False) -> None:  # noqa: A002 - contract name
        view = self.nvram.view
        if format or region_is_blank(view):
            self._format()
        else:
            self._recover()
        self._opened = True
        self._max_landing_tracks = max(1, self.plan.n_slots // 4)
        self.destager = Destager(self.cache, self.devices, self.track_len, self.params.destage_inflight)

    def _format(self) -> None:
        view = self.nvram.view
        self.track_bytes = self.params.track_bytes
        for dev in self.devices:
            if self.track_bytes % dev.info.block_size:
                raise NvramError(f"track_bytes {self.track_bytes} is not a multiple of {dev.info.url}'s "
                                 f"block size {dev.info.block_size}")
        plan = plan_region(PRIMARY_MAGIC, view.nbytes, [(n, d.info.size_bytes) for n, d in
                                                        zip(self.names, self.devices, strict=False)],
                           self.track_bytes, self.session_id, with_cache=True)
        view[: 4 * 4096] = bytes(4 * 4096)
        for v in plan.volumes:
            n = 2 * v.bitmap_bytes
            view[v.bitmap_offset : v.bitmap_offset + n] = bytes(n)
        self.nvram.persist(0, plan.dir_offset)
        self.plan = plan
        self._header_store = DoubleRecord(view, self.nvram.persist, RegionPlan.HEADER_OFFSET, _header_body())
        self._header = plan.header_fields(generation=1, clean=0)
        self._header_store.write(self._header)
        self._rec_store = DoubleRecord(view, self.nvram.persist, RegionPlan.RECORD_OFFSET, CgRecord)
        self._rec = {"seq": 0, "phase": 0, "recording": 0, "oos_select": 0, "start_wall": 0.0,
                     "committed_seq": 0, "cut_wall": 0.0, "commit_wall": 0.0, "successful": 0,
                     "failed": 0, "consecutive": 0}
        self._rec_store.write(self._rec)
        self.cache = WriteCache(self.nvram, plan)
        self.cache.format()
        self._attach_bitmaps(fresh=True)
        self.recovered = {"formatted": True}
        log.info("formatted NVRAM %s: %d slots of %d bytes", getattr(self.nvram, "url", "?"),
                 plan.n_slots, self.track_bytes)

    def _recover(self) -> None:
        view = self.nvram.view
        store, header = read_header(view, self.nvram.persist)
        if header is None:
            raise NvramError(f"{getattr(self.nvram, 'url', 'NVRAM')}: no readable header "
                             "(not formatted, or damaged); open with format=True to initialize")
        if header["magic"] != PRIMARY_MAGIC or header["version"] != VERSION:
            raise NvramError(f"NVRAM holds {header['magic']!r} version {header['version']}, "
                             f"not a primary region version {VERSION}")
        plan = RegionPlan.from_header(header)
        mine = {n: d.info.size_bytes for n, d in zip(self.names, self.devices, strict=False)}
        theirs = {v.name: v.size_bytes for v in plan.volumes}
        if mine != theirs:
            raise NvramError(f"NVRAM was formatted for volumes {theirs}, but the primary has {mine}; "
                             "format it again (this discards the cache and forces a full copy)")
        # The region's volume order rules (directory entries and selector bits use it).
        devices = dict(zip(self.names, self.devices, strict=False))
        self.names = [v.name for v in plan.volumes]
        self.devices = [devices[n] for n in self.names]
        self._vindex = {n: i for i, n in enumerate(self.names)}
        if plan.total_bytes > view.nbytes:
            raise NvramError(f"NVRAM region is {view.nbytes} bytes, its header needs {plan.total_bytes}")
        self.plan = plan
        self.track_bytes = plan.track_bytes
        if self.params.track_bytes != plan.track_bytes:
            log.warning("track_bytes %d from NVRAM overrides %d", plan.track_bytes, self.params.track_bytes)
            self.params.track_bytes = plan.track_bytes
        self._header_store = store
        self._header = dict(header)
        self._header["volumes"] = [{k: v for k, v in dict(vol).items() if k != "_io"} for vol in header["volumes"]]
        self._rec_store = DoubleRecord(view, self.nvram.persist, RegionPlan.RECORD_OFFSET, CgRecord)
        rec = self._rec_store.read()
        if rec is None:
            raise NvramError("NVRAM CG record is unreadable (both copies damaged)")
        self._rec = rec
        self._cut_wall = rec["cut_wall"]
        self._remote_committed = rec["committed_seq"]
        self.cache = WriteCache(self.nvram, plan)
        report = self.cache.load([v.tracks for v in plan.volumes])
        self._attach_bitmaps(fresh=False)
        self._seq = rec["seq"]
        in_flight = rec["recording"] or rec["phase"] != 0
        stray = bool(self.cache.with_new) or any(c.count() for c in self.cr)
        if in_flight or stray:
            self._fold_back()
            self._rec.update(phase=0, recording=0)
            if in_flight:
                self._rec.update(failed=rec["failed"] + 1, consecutive=rec["consecutive"] + 1)
            self._rec_store.write(self._rec)
        self._header.update(generation=header["generation"] + 1, clean=0)
        self._header_store.write(self._header)
        self.recovered = {"formatted": False, "clean": bool(header["clean"]), "cg_in_flight": bool(in_flight),
                          "failed_seq": rec["seq"] if in_flight else None, **report,
                          "oos_tracks": sum(b.count() for b in self.oos)}
        log.info("recovered NVRAM: %s", self.recovered)

    def _attach_bitmaps(self, fresh: bool) -> None:
        view = self.nvram.view
        self._areas = []
        self.oos, self.cr = [], []
        self._sel_bit = {n: i for i, n in enumerate(self.names)}
        for name, v in zip(self.names, self.plan.volumes, strict=False):
            pair = []
            for area in (0, 1):
                base = v.bitmap_offset + area * v.bitmap_bytes
                pair.append(TrackBitmap(v.tracks, view[base : base + v.bitmap_bytes],
                                        _persister(self.nvram, base), count=0 if fresh else None))
            self._areas.append((pair[0], pair[1]))
            sel = (self._rec["oos_select"] >> self._sel_bit[name]) & 1
            self.oos.append(pair[sel])
            self.cr.append(pair[1 - sel])

    def _fold_back(self) -> None:
        """A CG failed (or was caught in flight by a crash): new images fold into
        old ones, CR is OR-merged into OOS and emptied. Idempotent."""
        for key in list(self.cache.with_new):
            self.cache.merge_new_into_cur(*key)
        for oos, cr in zip(self.oos, self.cr, strict=False):
            oos.or_merge(cr)
            cr.clear_all()

    def _save_record(self, **changes) -> None:
        self._rec.update(changes)
        self._rec_store.write(self._rec)

    # ================================================================ geometry
    def track_len(self, vi: int, track: int) -> int:
        size = self.plan.volumes[vi].size_bytes
        return min(self.track_bytes, size - track * self.track_bytes)

    def _vi(self, volume: str) -> int:
        try:
            return self._vindex[volume]
        except KeyError:
            raise VolumeError(f"unknown volume {volume!r}; known: {', '.join(self.names)}") from None

    def _check_io(self, vi: int, offset: int, length: int) -> None:
        dev = self.devices[vi]
        bs = dev.info.block_size
        if offset < 0 or length < 0 or offset + length > dev.info.size_bytes:
            raise VolumeError(f"{self.names[vi]}: bytes {offset}..{offset + length} outside "
                              f"0..{dev.info.size_bytes}")
        if offset % bs or length % bs:
            raise VolumeError(f"{self.names[vi]}: offset {offset} and length {length} must be multiples "
                              f"of the block size {bs}")

    def geometry(self) -> list[VolumeGeometry]:
        return [VolumeGeometry(n, d.info.size_bytes, self.track_bytes) for n, d in zip(self.names, self.devices, strict=False)]

    # ================================================================ start / stop
    async def start(self, *, form_cgs: bool = True, destage: bool = True) -> None:
        """Connect the remote and begin CG formation. ``form_cgs``/``destage``
        False leave the steps to the caller (tests drive them one by one)."""
        if not self._opened:
            await self.open()
        self._kick = asyncio.Event()
        self._write_seen = asyncio.Event()
        self._start_wall = self.clock.wall()
        self._stopping = False
        self.copy_state = RUNNING
        try:
            await self._connect()
        except RemoteError:
            raise
        except LINK_ERRORS as e:
            log.warning("secondary not reachable at start: %s (will retry)", e)
        if destage:
            self._destaging_bg = True
            self.destager.start(self.clock.sleep)
        if form_cgs:
            self._loop_task = asyncio.ensure_future(self._cg_loop())

    async def _connect(self) -> RemoteState:
        try:
            state = await self.remote.connect(self.session_id, self.geometry())
        except RemoteError as e:
            self.copy_state, self.fatal_reason = FATAL, str(e)
            self.link_up = False
            self.events.emit("change", "session", copy_state=FATAL, reason=str(e))
            raise
        except LINK_ERRORS:
            self._set_link(False)
            raise
        self._set_link(True)
        self._remote_committed = state.committed_cg
        if state.new or state.committed_cg < self._rec["committed_seq"]:
            # A new pair (or a secondary that lost its state): full initial copy.
            if self.machine.phase is not Phase.IDLE:
                self._fail_sync("full copy requested by the secondary", Event.FAIL)
            for bm in self.oos:
                bm.set_range(0, bm.tracks)
            self.events.emit("change", "session", full_copy=True,
                             tracks=sum(b.tracks for b in self.oos))
        return state

    def _set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            self.events.emit("change", "link", state="up" if up else "down")

    async def stop(self, clean: bool = True) -> None:
        self._stopping = True
        if self._loop_task is not None:
            if self._body is not None and not self._body.done():
                self._request_fail("stopping", Event.FAIL)
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._body is not None and not self._body.done():
            self._body.cancel()
            await asyncio.gather(self._body, return_exceptions=True)
        if self.machine.phase is not Phase.IDLE:
            self._fail_sync("stopping", Event.FAIL)
        if self.destager is not None:
            await self.destager.stop()
            if clean:
                try:
                    await self.destager.destage()
                except Exception as e:  # noqa: BLE001 - the cache keeps the data; report and go on
                    log.warning("destage at stop failed: %s", e)
        for t in list(self._bg):
            await asyncio.gather(t, return_exceptions=True)
        if self._opened and clean:
            self._header.update(clean=1)
            self._header_store.write(self._header)
        self.copy_state = SUSPENDED

    # ================================================================ host I/O
    def host_target(self) -> HostTarget:
        return PrimaryTarget(self)

    async def write(self, volume: str, offset: int, data, *, fua: bool = False) -> None:
        vi = self._vi(volume)
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        self._check_io(vi, offset, n)
        tb = self.track_bytes
        pos = 0
        while pos < n:
            first = (offset + pos) // tb
            stop_track = min((offset + n - 1) // tb, first + self._max_landing_tracks - 1)
            end = min(n, (stop_track + 1) * tb - offset)
            await self._land(vi, offset + pos, mv[pos:end])
            pos = end
        await self.gate.wait()

    async def _land(self, vi: int, offset: int, mv: memoryview) -> None:
        """Decide every track of the write, await whatever must happen first
        (send-first sends, free slots), then land all tracks with no await."""
        cache = self.cache
        tb = self.track_bytes
        first, last = offset // tb, (offset + mv.nbytes - 1) // tb
        force_send_first: set[int] = set()
        pinned = {(vi, t) for t in range(first, last + 1)}
        while True:
            recording = self.machine.recording
            dual = self.params.collision_policy == "dual-image"
            oos = self.oos[vi]
            to_send: list[int] = []
            plan: list[tuple[int, object, int]] = []  # (track, entry or None, state to allocate)
            allocs = 0
            new_allocs: list[int] = []
            for t in range(first, last + 1):
                cur, new = cache.images(vi, t)
                if recording and oos.test(t):
                    if not dual or t in force_send_first:  # claim 3 (send-first)
                        to_send.append(t)
                    elif new is not None:  # claim 4: apply to the existing new image
                        plan.append((t, new, STATE_NEW))
                    else:  # claim 6: allocate a new image
                        plan.append((t, None, STATE_NEW))
                        allocs += 1
                        new_allocs.append(t)
                else:  # claim 5: normal processing
                    plan.append((t, cur, STATE_CUR))
                    allocs += cur is None
            if to_send:
                await self._send_first(vi, to_send)
                continue
            if allocs > cache.available(pinned):
                if new_allocs:  # dual-image with no free slot: fall back to send-first
                    self.fallbacks += len(new_allocs)
                    force_send_first.update(new_allocs)
                    continue
                await self._make_room(allocs, pinned)
                continue
            break
        # ---- landing: no await from here on ----
        bitmap = self.cr[vi] if recording else self.oos[vi]
        src = 0
        for t, entry, state in plan:
            bitmap.set(t)  # the bit before the data it announces
            if entry is None:
                entry = cache.allocate(vi, t, state, pinned)
            start = max(offset, t * tb)
            end = min(offset + mv.nbytes, (t + 1) * tb)
            cache.apply(entry, start - t * tb, mv[src : src + end - start])
            src += end - start
        self.crashpoints.hit(AFTER_CACHE_WRITE)
        self._last_write_wall = self.clock.wall()
        if self._write_seen is not None:
            self._write_seen.set()

    async def _send_first(self, vi: int, tracks: list[int]) -> None:
        seq = self._seq
        for t in tracks:
            try:
                await self._send_old(vi, t, seq)
                self.send_first_sends += 1
            except Exception as e:  # noqa: BLE001 - the CG fails; the write proceeds normally after
                log.info("send-first of %s track %d failed (%s); failing the CG", self.names[vi], t, e)
                self._request_fail(f"send-first failed: {e}", Event.FAIL)
                await self._wait_cg_end()
                return

    async def _make_room(self, needed: int, pinned: set) -> None:
        if self._destaging_bg:
            await self.cache.wait_space()
            return
        done = await self.destager.destage(limit=max(needed, 1))
        if not done and needed > self.cache.available(pinned):
            raise CacheFull(f"no cache slot can be freed ({self.cache.stats()})")

    async def read(self, volume: str, offset: int, length: int) -> bytes:
        vi = self._vi(volume)
        self._check_io(vi, offset, length)
        if length == 0:
            return b""
        cache = self.cache
        tb = self.track_bytes
        first, last = offset // tb, (offset + length - 1) // tb
        dev = self.devices[vi]
        bs = dev.info.block_size
        cached = [t for t in range(first, last + 1) if cache.has(vi, t)]
        if not cached:
            cache.counters.misses += 1
            return await dev.read(offset // bs, length // bs)
        cache.counters.hits += 1
        while True:
            before = [cache.images(vi, t) for t in cached]
            if self._covered(vi, offset, length, cached):
                out = bytearray(length)
            else:
                out = bytearray(await dev.read(offset // bs, length // bs))
                if [cache.images(vi, t) for t in cached] != before:
                    continue  # an image was evicted or replaced while A was read
            for t in cached:
                lo, hi = max(offset, t * tb), min(offset + length, (t + 1) * tb)
                cache.overlay(vi, t, out, lo - offset, lo - t * tb, hi - t * tb)
            return bytes(out)

    def _covered(self, vi: int, offset: int, length: int, cached: list[int]) -> bool:
        tb = self.track_bytes
        first, last = offset // tb, (offset + length - 1) // tb
        if len(cached) != last - first + 1:
            return False
        for t in cached:
            cur, new = self.cache.images(vi, t)
            lo, hi = max(offset, t * tb) - t * tb, min(offset + length, (t + 1) * tb) - t * tb
            s0, s1 = lo // SECTOR_BYTES, (hi + SECTOR_BYTES - 1) // SECTOR_BYTES
            union = 0
            if cur is not None and new is not None:
                union = (cur.valid[s0:s1] | new.valid[s0:s1]).count()
            elif cur is not None or new is not None:
                union = (cur or new).valid.count(1, s0, s1)
            if union != s1 - s0:
                return False
        return True

    async def flush(self, volume: str | None = None) -> None:
        """Acknowledged writes are already in NVRAM; nothing more is needed."""
        if volume is not None:
            self._vi(volume)

    # ================================================================ drain helpers
    async def _compose_old(self, vi: int, t: int) -> bytes:
        """The track as it belongs to the CG being formed: the old image over A."""
        length = self.track_len(vi, t)
        dev = self.devices[vi]
        bs = dev.info.block_size
        nsect = (length + SECTOR_BYTES - 1) // SECTOR_BYTES
        while True:
            cur, _ = self.cache.images(vi, t)
            if self.cache.fully_valid(cur, nsect):
                out = bytearray(length)
            else:
                out = bytearray(await dev.read(t * self.track_bytes // bs, (length + bs - 1) // bs))
                if self.cache.images(vi, t)[0] is not cur:
                    continue
            self.cache.overlay(vi, t, out, 0, 0, length, include_new=False)
            return bytes(out)

    async def _send_old(self, vi: int, t: int, seq: int) -> None:
        """Send the old image of one OOS track and, once the secondary has it,
        discard the old image (claim 7) and clear OOS (claim 9). Concurrent
        callers for the same track share one send.

        Only a track whose OOS bit is still set in the CG being formed has an
        old image: once a send cleared the bit, a write lands on the track's
        (now only) image and records in CR, so sending the track again would
        put a write of the next CG into B under this one. A caller that
        decided to send before awaiting (the drain's worker, a send-first
        write with several tracks) re-checks here, after any shared send."""
        key = (vi, t)
        while (fut := self._inflight.get(key)) is not None:
            await asyncio.shield(fut)
        if not (self.machine.recording and seq == self._seq and self.oos[vi].test(t)):
            return
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            data = await self._compose_old(vi, t)
            self.crashpoints.hit(MID_DRAIN)
            await self.remote.send_track(self.names[vi], t, seq, data)
            self.crashpoints.hit(BEFORE_OOS_CLEAR)
            if self.machine.recording and seq == self._seq and self.oos[vi].test(t):
                self.cache.promote(vi, t)
                self.oos[vi].clear(t)
                self.drain_bytes += len(data)
                self._cg_tracks += 1
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else CgFailed("drain interrupted"))
            fut.exception()  # retrieved: waiters re-raise it, nobody else must
            if isinstance(e, LINK_ERRORS):
                self._set_link(False)
            raise
        finally:
            self._inflight.pop(key, None)

    # ================================================================ CG steps
    async def quiesce(self) -> int:
        """Step 1: hold write acknowledgements (START). Returns the CG sequence."""
        self.machine.handle(Event.START)
        return self._seq

    async def run(self) -> None:
        """Claim 10: resume acknowledging host writes, record in CR, drain OOS.
        From quiescing: create CR and release the held acks (the drain is the
        next step). From Paused: resume forming CGs."""
        if self.machine.phase is Phase.QUIESCING:
            self.machine.handle(Event.RECORDING_ON)
        elif self.copy_state in (PAUSED, PAUSING):
            await self.cg_resume()
        elif self.machine.phase is Phase.IDLE and self._loop_task is None:
            raise InvalidTransition(self.machine.phase, Event.RECORDING_ON)

    async def drain(self, limit: int | None = None) -> bool:
        """Step 3: send OOS tracks (at most ``limit``; all when None) with
        ``drain_inflight`` in flight. True when OOS is empty."""
        if self.machine.phase is not Phase.DRAINING:
            raise InvalidTransition(self.machine.phase, "drain")
        seq = self._seq
        cursor = [0, 0]
        budget = [limit]

        def next_track() -> tuple[int, int] | None:
            while cursor[0] < len(self.oos):
                vi, t = cursor
                found = self.oos[vi].next_set(t)
                if found >= 0:
                    cursor[1] = found + 1
                    return vi, found
                cursor[0], cursor[1] = vi + 1, 0
            return None

        async def worker() -> None:
            while self.machine.phase is Phase.DRAINING and seq == self._seq:
                if budget[0] is not None:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                item = next_track()
                if item is None:
                    return
                await self._send_old(item[0], item[1], seq)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(self.params.drain_inflight):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:  # one failed send fails the drain: raise it as itself
            raise group.exceptions[0] from None
        return self.oos_tracks() == 0

    async def commit_cg(self) -> None:
        """Steps 4 and 5: two-phase commit at the secondary, then the swap."""
        seq = self._seq
        if self.machine.phase is Phase.DRAINING:
            if self.oos_tracks():
                raise CgFailed(f"CG {seq}: {self.oos_tracks()} OOS tracks not drained")
            await self.remote.drain_done(seq)
            self.machine.handle(Event.DRAINED)
        elif self.machine.phase is not Phase.COMMITTING:
            raise InvalidTransition(self.machine.phase, Event.DRAINED)
        self.crashpoints.hit(BEFORE_COMMIT)
        await self.remote.prepare(seq)
        self.crashpoints.hit(AFTER_PREPARE)
        await self.remote.commit(seq)
        self.crashpoints.hit(AFTER_COMMIT)
        self._remote_committed = seq
        self.machine.handle(Event.COMMITTED)

    async def form_cg(self) -> bool:
        """One whole CG with the timers, as the CG loop runs it. True if committed."""
        self._fail_fut = asyncio.get_running_loop().create_future()
        body = self._body = asyncio.ensure_future(self._cg_body())
        try:
            await asyncio.wait({body, self._fail_fut}, return_when=asyncio.FIRST_COMPLETED)
            if not body.done():
                body.cancel()
                await asyncio.gather(body, return_exceptions=True)
            if not body.cancelled() and body.exception() is None:
                return body.result()
            if self._fail_fut.done():
                reason, event = self._fail_fut.result()
            else:
                exc = body.exception() if not body.cancelled() else CgFailed("cancelled")
                reason, event = f"{type(exc).__name__}: {exc}", Event.FAIL
                if isinstance(exc, LINK_ERRORS):
                    self._set_link(False)
            if self.machine.phase is not Phase.IDLE:
                self._fail_sync(reason, event)
            return False
        finally:
            self._fail_fut = None
            self._body = None
            waiters, self._cg_end_waiters = self._cg_end_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    async def _cg_body(self) -> bool:
        # The body runs a loop iteration after form_cg created it: a pause (or
        # suspend) that came in between found the machine idle and reported
        # Paused at once, so no CG may start now (the demo reads C then).
        if self.copy_state != RUNNING or self._stopping:
            return False
        await self.quiesce()
        if self.coordinate is not None:
            await self.coordinate()
        else:
            await asyncio.sleep(0)  # writes already accepted land before CR exists
        self.machine.handle(Event.RECORDING_ON)
        timer = None
        if self._rec["consecutive"] < self.params.max_failures_before_untimed:
            timer = self.clock.call_later(self.params.max_drain_s,
                                          lambda: self._request_fail("max drain time exceeded", Event.TIMEOUT))
        else:
            log.info("CG %d drains without the timer after %d failures", self._seq, self._rec["consecutive"])
        try:
            await self.drain()
        finally:
            if timer is not None:
                timer.cancel()
        await self.commit_cg()
        return True

    def _request_fail(self, reason: str, event: Event = Event.FAIL) -> None:
        """Fail the CG being formed (callable from timers)."""
        if self.machine.phase is Phase.IDLE:
            return
        if self._fail_fut is not None:
            if not self._fail_fut.done():
                self._fail_fut.set_result((reason, event))
            return
        self._fail_sync(reason, event)

    def _fail_sync(self, reason: str, event: Event) -> None:
        seq = self._seq
        self._fail_reason = reason
        self.machine.handle(event)
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

    async def _wait_cg_end(self) -> None:
        if self.machine.phase is Phase.IDLE:
            return
        fut = asyncio.get_running_loop().create_future()
        self._cg_end_waiters.append(fut)
        if self._body is None:  # no runner will wake us: failing is synchronous in that case
            return
        await fut

    # ---------------------------------------------------------------- phase side effects
    def _enter_quiescing(self, event: Event) -> None:
        self._seq = max(self._seq, self._rec["seq"], self._remote_committed) + 1
        self._cg_tracks = 0
        self._cg_started = self.clock.now()
        self.gate.close(self.params.max_coord_ms / 1000.0,
                        lambda: self._request_fail("max coordination time exceeded", Event.TIMEOUT))
        self._save_record(seq=self._seq, phase=PHASE_CODES["quiescing"], start_wall=self.clock.wall())
        self.events.emit("create", "cg", seq=self._seq, phase="quiescing")

    def _enter_draining(self, event: Event) -> None:
        # Creating CR: one record write flips recording on (the CR area is
        # pre-allocated and empty). Only then are the held acks released.
        self._cut_wall = self.clock.wall()
        self._save_record(phase=PHASE_CODES["draining"], recording=1)
        self.crashpoints.hit(AFTER_RECORDING_ON)
        held = self.gate.open()
        self.events.emit("change", "cg", seq=self._seq, phase="draining", held_ms=held,
                         oos_tracks=self.oos_tracks())

    def _enter_committing(self, event: Event) -> None:
        self._save_record(phase=PHASE_CODES["committing"])
        self.events.emit("change", "cg", seq=self._seq, phase="committing")

    def _enter_idle(self, event: Event) -> None:
        if event is Event.COMMITTED:
            sel = self._rec["oos_select"]
            for vi, name in enumerate(self.names):
                oos, cr = self.oos[vi], self.cr[vi]
                if oos.count():  # cannot happen after a drain; never lose bits if it did
                    cr.or_merge(oos)
                    oos.clear_all()
                self.oos[vi], self.cr[vi] = cr, oos  # the swap: CR becomes OOS
                sel ^= 1 << self._sel_bit[name]
            now = self.clock.wall()
            self._save_record(phase=0, recording=0, oos_select=sel, committed_seq=self._seq,
                              cut_wall=self._cut_wall, commit_wall=now,
                              successful=self._rec["successful"] + 1, consecutive=0)
            self.events.emit("destroy", "cg", seq=self._seq, result="committed", tracks=self._cg_tracks,
                             cycle_s=self.clock.now() - self._cg_started)
        else:
            self.gate.open()
            self._fold_back()
            self._save_record(phase=0, recording=0, failed=self._rec["failed"] + 1,
                              consecutive=self._rec["consecutive"] + 1)
            log.info("CG %d failed: %s", self._seq, self._fail_reason)
            self.events.emit("destroy", "cg", seq=self._seq, result="failed", reason=self._fail_reason)
        if self._pause_requested and self.copy_state == PAUSING:
            self.copy_state = PAUSED
            self.events.emit("change", "session", copy_state=PAUSED)

    # ================================================================ the CG loop
    async def _cg_loop(self) -> None:
        while not self._stopping:
            try:
                await self._cg_loop_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any one CG's bug
                # A silent death of this task left a primary that never formed
                # another CG (link "down", phase idle). Log it, fail the CG in
                # flight so CR folds back into OOS, and go on.
                log.exception("CG loop: unexpected error in CG %d; failing it and going on", self._seq)
                self.total_loop_errors += 1
                if self.machine.phase is not Phase.IDLE:
                    try:
                        self._fail_sync("internal error", Event.FAIL)
                    except Exception:  # noqa: BLE001
                        log.exception("CG loop: could not fail CG %d", self._seq)
                self._set_link(False)  # reconnect and say hello again before the next CG
                await self.clock.sleep(0.5)

    async def _cg_loop_step(self) -> None:
        """One turn of the CG loop: connect if needed, form one CG, wait the interval."""
        if self.copy_state != RUNNING:
            self._kick.clear()
            await self._kick.wait()
            return
        if not self.link_up:
            try:
                await self._connect()
            except RemoteError:
                return
            except LINK_ERRORS:
                await self.clock.sleep(1.0)
                return
        before = self._rec["successful"] + self._rec["failed"]
        committed = await self.form_cg()
        if self._rec["successful"] + self._rec["failed"] == before:
            await self.clock.sleep(0.1)  # the CG did not even start
        if self.copy_state == PAUSING:
            self.copy_state = PAUSED
        if not committed and not self.link_up:
            return
        await self._interval_wait(committed)

    async def _interval_wait(self, committed: bool) -> None:
        interval = self.params.cg_interval_s
        if interval > 0:
            await self.clock.sleep(interval)
            return
        if committed and not self.oos_tracks() and self._last_write_wall <= self._cut_wall:
            # Nothing written since the cut: wait for a write (or a second) instead of spinning.
            self._write_seen.clear()
            waiter = asyncio.ensure_future(self._write_seen.wait())
            sleeper = asyncio.ensure_future(self.clock.sleep(1.0))
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            sleeper.cancel()
        else:
            await asyncio.sleep(0)

    # ================================================================ commands
    async def cg_start(self) -> None:
        if self._loop_task is None:
            if self._kick is None:
                await self.start()
                return
            self._stopping = False
            self._loop_task = asyncio.ensure_future(self._cg_loop())
        if self.copy_state in (PAUSED, PAUSING):
            self.copy_state = RUNNING
        self._pause_requested = False
        self._kick.set()

    async def cg_pause(self) -> None:
        self._pause_requested = True
        if self.machine.phase is Phase.IDLE:
            self.copy_state = PAUSED
        else:
            self.copy_state = PAUSING
            await self._wait_cg_end()
            self.copy_state = PAUSED
        self.events.emit("change", "session", copy_state=self.copy_state)

    async def cg_resume(self) -> None:
        if self.copy_state == FATAL:
            raise CgFailed(f"session is Fatal ({self.fatal_reason}); resume_pair after fixing it")
        self._pause_requested = False
        self.copy_state = RUNNING
        if self._kick is not None:
            self._kick.set()
        self.events.emit("change", "session", copy_state=RUNNING)

    async def cg_fail(self, reason: str = "operator") -> None:
        if self.machine.phase is Phase.IDLE:
            raise InvalidTransition(Phase.IDLE, Event.FAIL)
        if self._body is not None and self._fail_fut is not None:
            fut = asyncio.get_running_loop().create_future()
            self._cg_end_waiters.append(fut)
            self._request_fail(reason, Event.FAIL)
            await fut
        else:
            self._fail_sync(reason, Event.FAIL)

    async def suspend(self) -> None:
        """Stop replicating; writes keep landing and setting OOS."""
        self.copy_state = SUSPENDED
        if self.machine.phase is not Phase.IDLE:
            await self.cg_fail("suspended")
        self.events.emit("change", "session", copy_state=SUSPENDED)

    async def resume_pair(self) -> None:
        await self._connect()
        self.copy_state, self.fatal_reason = RUNNING, ""
        self._pause_requested = False
        if self._kick is not None:
            self._kick.set()
        self.events.emit("change", "session", copy_state=RUNNING)

    def set_param(self, name: str, text: str) -> None:
        if name == "track_bytes" and self._opened and str(text).strip() != str(self.track_bytes):
            raise ValueError("track_bytes is fixed when the NVRAM is formatted")
        self.params.set(name, text)
        if self.destager is not None:
            self.destager.inflight = self.params.destage_inflight
        if self._kick is not None:
            self._kick.set()

    # ================================================================ metrics
    def oos_tracks(self) -> int:
        return sum(b.count() for b in self.oos)

    def cr_tracks(self) -> int:
        return sum(b.count() for b in self.cr)

    def data_exposure_s(self) -> float:
        now = self.clock.wall()
        if self._rec.get("committed_seq"):
            if self._last_write_wall <= self._rec["cut_wall"] and not self.oos_tracks() \
                    and not self.cr_tracks():
                return 0.0
            return max(0.0, now - self._rec["cut_wall"])
        return max(0.0, now - self._start_wall) if self._start_wall else 0.0

    def status(self) -> dict:
        rec = self._rec
        consecutive = rec.get("consecutive", 0)
        recoverable = bool(rec.get("committed_seq") or self._remote_committed)
        if self.copy_state in (FATAL, SUSPENDED) or (not recoverable and self.copy_state == RUNNING
                                                     and self._start_wall and self.oos_tracks()):
            severity = "Severe" if self.copy_state in (FATAL, SUSPENDED) else "Warning"
        elif consecutive or self.copy_state != RUNNING or not self.link_up:
            severity = "Warning"
        else:
            severity = "Normal"
        return {
            "copy_state": self.copy_state,
            "fatal_reason": self.fatal_reason,
            "phase": self.machine.phase.value,
            "cg_seq": self._seq,
            "committed_seq": rec.get("committed_seq", 0),
            "last_cg_time": rec.get("commit_wall") or None,
            "data_exposure_s": self.data_exposure_s(),
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
        }

    def volumes_info(self) -> list[dict]:
        out = []
        for vi, (name, dev) in enumerate(zip(self.names, self.devices, strict=False)):
            out.append({"name": name, "size_bytes": dev.info.size_bytes, "track_bytes": self.track_bytes,
                        "tracks": self.plan.volumes[vi].tracks, "oos_tracks": self.oos[vi].count(),
                        "cr_tracks": self.cr[vi].count(), "url": dev.info.url})
        return out

    def bitmap(self, kind: str, volume: str, start_track: int = 0, end_track: int | None = None) -> dict:
        if kind not in ("oos", "cr"):
            raise ValueError(f"bitmap kind must be 'oos' or 'cr', not {kind!r}")
        vi = self._vi(volume)
        bm = (self.oos if kind == "oos" else self.cr)[vi]
        end = bm.tracks if end_track is None else min(end_track, bm.tracks)
        if start_track < 0 or start_track > end:
            raise ValueError(f"track range {start_track}..{end} outside 0..{bm.tracks}")
        count = bm.count() if (start_track, end) == (0, bm.tracks) else bm.count_range(start_track, end)
        return {"count": count, "tracks": end - start_track, "runs": bm.runs(start_track, end, 64)}

    def cache_stats(self) -> dict:
        return self.cache.stats()


def _header_body():
    return Header


def _persister(nvram: NvramRegion, base: int):
    def persist(offset: int, length: int) -> None:
        nvram.persist(base + offset, length)
    return persist


class PrimaryVolume(HostVolume):
    def __init__(self, primary: Primary, name: str) -> None:
        dev = primary.devices[primary._vi(name)]
        self.primary = primary
        self.name = name
        self.size_bytes = dev.info.size_bytes
        self.block_size = dev.info.block_size

    async def read(self, offset: int, length: int) -> bytes:
        return await self.primary.read(self.name, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.primary.write(self.name, offset, data, fua=fua)

    async def flush(self) -> None:
        await self.primary.flush(self.name)


class PrimaryTarget(HostTarget):
    def __init__(self, primary: Primary) -> None:
        self._volumes = {n: PrimaryVolume(primary, n) for n in primary.names}

    def volumes(self) -> dict[str, HostVolume]:
        return self._volumes
