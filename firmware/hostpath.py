"""Where a host write lands, and where a host read is answered (DESIGN.md
section 1, "A host write during drain", and the collision policies).

A write is decided track by track (claims 3-6: send-first, apply to the new
image, allocate a new image, or normal processing), then everything that
must happen first is awaited (send-first sends, free slots), and then every
track of the chunk lands with no await in between: the bit before the data
it announces, in OOS while no CG is recording and in CR while one is. The
ack waits at the quiesce gate (claims 1, 2).

A write longer than ``max_landing_tracks`` tracks lands in chunks, each
decided and landed on its own (a chunk may wait for free slots). Such a write
still falls entirely on one side of the CR switch: it starts landing only
while the gate is open, and the CG cycle switches recording on only once no
chunked write is half landed (``landed_whole``).
"""

from __future__ import annotations

import asyncio
import logging

from firmware import crashpoints as cp
from firmware.cgcycle import CgCycle
from firmware.crashpoints import CrashPoints
from firmware.destage import Destager
from firmware.errors import CacheFull
from firmware.layout import SECTOR_BYTES, STATE_CUR, STATE_NEW
from firmware.params import SessionParams
from firmware.region import PrimaryRegion
from firmware.volumes import Volumes
from hal.host import HostTarget, HostVolume

log = logging.getLogger(__name__)

AFTER_CACHE_WRITE = cp.declare("primary.after_cache_write", "a host write is in NVRAM, not yet acknowledged")


class HostPath:
    def __init__(self, volumes: Volumes, region: PrimaryRegion, cycle: CgCycle, params: SessionParams,
                 crashpoints: CrashPoints) -> None:
        self.volumes = volumes
        self.region = region
        self.cycle = cycle
        self.params = params
        self.crashpoints = crashpoints
        self.destager: Destager | None = None
        self.destaging_bg = False  # the destager runs on its own; writes wait for it to free slots
        self.max_landing_tracks = 1
        self.fallbacks = 0  # dual-image writes that fell back to send-first
        self.send_first_sends = 0
        self._chunked = 0  # chunked writes with some chunks landed and more to come
        self._whole_waiters: list[asyncio.Future] = []

    def attach(self, destager: Destager) -> None:
        """The region is open: bound a landing by a quarter of the cache."""
        self.destager = destager
        self.max_landing_tracks = max(1, self.region.plan.n_slots // 4)

    # ================================================================ writes
    async def write(self, volume: str, offset: int, data, *, fua: bool = False) -> None:
        vols = self.volumes
        vi = vols.index(volume)
        mv = memoryview(data).cast("B")
        vols.check_io(vi, offset, mv.nbytes)
        await self.write_checked(vi, offset, mv)

    async def write_checked(self, vi: int, offset: int, mv: memoryview) -> None:
        """A write already checked against the volume's bounds and block size
        (a host port checks every request, hal/host.py); ``mv`` is bytes."""
        n = mv.nbytes
        tb = self.volumes.track_bytes
        gate = self.cycle.gate
        if n and (offset + n - 1) // tb - offset // tb >= self.max_landing_tracks:
            while gate.closed:  # a CR switch is pending: land after it, never across it
                await gate.wait()
            self._chunked += 1
            try:
                pos = 0
                while pos < n:
                    first = (offset + pos) // tb
                    end = min(n, (first + self.max_landing_tracks) * tb - offset)
                    await self.land(vi, offset + pos, mv[pos:end])
                    pos = end
            finally:
                self._chunked -= 1
                if not self._chunked:
                    waiters, self._whole_waiters = self._whole_waiters, []
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(None)
        else:
            await self.land(vi, offset, mv)
        if gate.closed:  # only then is there anything to wait for
            await gate.wait()

    async def landed_whole(self) -> None:
        """Return when no chunked write is half landed (the CR switch waits
        for this, with the gate closed so no new one starts)."""
        while self._chunked:
            fut = asyncio.get_running_loop().create_future()
            self._whole_waiters.append(fut)
            await fut

    async def land(self, vi: int, offset: int, mv: memoryview) -> None:
        """Decide every track of the chunk, await whatever must happen first
        (send-first sends, free slots), then land all tracks with no await."""
        cache = self.region.cache
        machine = self.cycle.machine
        drainer = self.cycle.drainer
        tb = self.volumes.track_bytes
        first, last = offset // tb, (offset + mv.nbytes - 1) // tb
        force_send_first: set[int] = set()
        pinned = {(vi, t) for t in range(first, last + 1)}
        while True:
            recording = machine.recording
            dual = self.params.collision_policy == "dual-image"
            to_send: list[int] = []
            plan: list[tuple[int, object, int]] = []  # (track, entry or None, state to allocate)
            allocs = 0
            new_allocs: list[int] = []
            for t in range(first, last + 1):
                cur, new = cache.images(vi, t)
                if recording and drainer.owes(vi, t):
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
        oos, cr = self.region.oos[vi], self.region.cr[vi]
        bitmap = cr if recording else oos
        src = 0
        for t, entry, state in plan:
            # A new image knows nothing the track owed before it: a cur image
            # of a track with a bit set, or a new image of one already in CR,
            # starts with a full segment mask (firmware/layout.py).
            owed = (cr.test(t) if state == STATE_NEW else oos.test(t) or cr.test(t)) if entry is None else False
            bitmap.set(t)  # the bit before the data it announces
            if entry is None:
                entry = cache.allocate(vi, t, state, pinned, owed=owed)
            start = max(offset, t * tb)
            end = min(offset + mv.nbytes, (t + 1) * tb)
            cache.apply(entry, start - t * tb, mv[src : src + end - start])
            src += end - start
        self.crashpoints.hit(AFTER_CACHE_WRITE)
        self.cycle.note_write()

    async def _send_first(self, vi: int, tracks: list[int]) -> None:
        cycle = self.cycle
        seq = cycle.seq
        try:
            for t in tracks:
                await cycle.drainer.send_old(vi, t, seq)
                self.send_first_sends += 1
            await cycle.drainer.sync(seq)  # B durable and OOS cleared before the write lands
        except Exception as e:  # noqa: BLE001 - the CG fails; the write proceeds normally after
            log.info("send-first of %s tracks %s failed (%s); failing the CG", self.volumes.names[vi], tracks, e)
            cycle.request_fail(f"send-first failed: {e}")
            await cycle.wait_cg_end()

    async def _make_room(self, needed: int, pinned: set) -> None:
        cache = self.region.cache
        cache.counters.full_waits += 1
        if self.destaging_bg:
            await cache.wait_space()
            return
        done = await self.destager.destage(limit=max(needed, 1))
        if not done and needed > cache.available(pinned):
            raise CacheFull(f"no cache slot can be freed ({cache.stats()})")

    # ================================================================ reads
    async def read(self, volume: str, offset: int, length: int) -> bytes:
        vols = self.volumes
        vi = vols.index(volume)
        vols.check_io(vi, offset, length)
        return await self.read_checked(vi, offset, length)

    async def read_checked(self, vi: int, offset: int, length: int) -> bytes:
        """A read already checked against the volume's bounds and block size."""
        vols = self.volumes
        if length == 0:
            return b""
        cache = self.region.cache
        tb = vols.track_bytes
        first, last = offset // tb, (offset + length - 1) // tb
        dev = vols.devices[vi]
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
        tb = self.volumes.track_bytes
        first, last = offset // tb, (offset + length - 1) // tb
        if len(cached) != last - first + 1:
            return False
        for t in cached:
            cur, new = self.region.cache.images(vi, t)
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
            self.volumes.index(volume)


class PrimaryVolume(HostVolume):
    """A volume as a host port sees it. The port has checked each request's
    bounds and alignment (hal/host.py), so they are not checked again, and
    the volume's index is remembered (re-looked up only if a recovery
    reordered the volumes after this was made)."""

    def __init__(self, host: HostPath, name: str) -> None:
        vols = host.volumes
        self._vi = vols.index(name)
        dev = vols.devices[self._vi]
        self.host = host
        self.name = name
        self.size_bytes = dev.info.size_bytes
        self.block_size = dev.info.block_size

    def _index(self) -> int:
        names = self.host.volumes.names
        vi = self._vi
        if vi >= len(names) or names[vi] != self.name:
            vi = self._vi = self.host.volumes.index(self.name)
        return vi

    async def read(self, offset: int, length: int) -> bytes:
        return await self.host.read_checked(self._index(), offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool = False):
        # The host path's coroutine itself, not one more frame around it.
        mv = data if type(data) is memoryview else memoryview(data)
        return self.host.write_checked(self._index(), offset, mv if mv.format == "B" else mv.cast("B"))

    async def flush(self) -> None:
        await self.host.flush(self.name)


class PrimaryTarget(HostTarget):
    def __init__(self, host: HostPath) -> None:
        self._volumes = {n: PrimaryVolume(host, n) for n in host.volumes.names}

    def volumes(self) -> dict[str, HostVolume]:
        return self._volumes
