"""Sending old images: how a track of the CG being formed reaches the
secondary (DESIGN.md section 1, steps 3 and the collision policies).

The old image of a track is what it holds for the CG being formed: its
cache image without any new image, over A's data. ``send_old`` sends one
such track and, once the secondary has it, discards the old image (claim 7)
and marks the track *sent*. ``drain`` sends every OOS track with a bounded
number in flight; a send-first host write (claim 3) calls ``send_old`` for
its own tracks.

The durability barrier: the secondary writes B through its volatile cache,
so "the secondary has it" is not yet "a power cut keeps it". A sent track
keeps its OOS bit until ``sync`` has made B durable for the batch; only
then are the bits cleared (claim 9: a cleared bit is never sent again). A
CG that fails before its sync leaves the bits set, and the next CG resends.
A sent track is owed nothing more in this CG: writes to it record in CR.

Segments: the OOS granule is the track, but a track is sent as the 4 KiB
segments its image's mask names (written since B was last durable for it,
firmware/cache.py; with no image, the mask its evicted image left), each
run read from the image over A, when the remote takes runs
(``send_track(..., runs=...)``); the whole track when the mask is full or
unknown (none kept, another mask epoch, an empty mask) or the remote does
not take runs. The mask drops what was sent only at ``sync``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

from firmware import crashpoints as cp
from firmware.crashpoints import CrashPoints
from firmware.errors import CgFailed
from firmware.layout import SECTOR_BYTES, SEGMENT_BYTES
from firmware.region import PrimaryRegion
from firmware.remote import RemotePort
from firmware.volumes import Volumes

MID_DRAIN = cp.declare("primary.mid_drain", "a drain track was read, not yet sent")
BEFORE_OOS_CLEAR = cp.declare("primary.before_oos_clear", "drained tracks are durable in B, their OOS bits not yet cleared")

LINK_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError)
SYNC_BATCH = 256  # tracks sent between two syncs of B (16 MiB of 64 KiB tracks)


def segment_runs(mask: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) byte runs of the set bits of a segment mask, within
    a track of ``length`` bytes."""
    runs = []
    seg = 0
    while mask:
        zeros = (mask & -mask).bit_length() - 1
        mask >>= zeros
        seg += zeros
        ones = (mask ^ (mask + 1)).bit_length() - 1
        start, end = seg * SEGMENT_BYTES, min((seg + ones) * SEGMENT_BYTES, length)
        if start < end:
            runs.append((start, end - start))
        mask >>= ones
        seg += ones
    return runs


class Drainer:
    """``in_cg(seq)`` says whether CG ``seq`` is still being formed with
    recording on (the only time an OOS track has an old image to send);
    ``on_link_error`` is told when a send lost the link."""

    def __init__(self, volumes: Volumes, region: PrimaryRegion, remote: RemotePort, crashpoints: CrashPoints,
                 in_cg: Callable[[int], bool], on_link_error: Callable[[], None]) -> None:
        self.volumes = volumes
        self.region = region
        self.remote = remote
        self.crashpoints = crashpoints
        self.in_cg = in_cg
        self.on_link_error = on_link_error
        self.inflight: dict[tuple[int, int], asyncio.Future] = {}
        # Sent in the CG being formed, OOS bit set until sync: track -> the
        # remote's link epoch the secondary acknowledged it on.
        self.sent: dict[tuple[int, int], int] = {}
        self._syncing: asyncio.Future | None = None  # the sync running
        self._sync_started = 0  # syncs begun, in total (they run one at a time, in order)
        self._synced = (0, 0)  # the number and CG of the latest that succeeded
        self.drain_bytes = 0  # bytes sent, in total
        self.cg_tracks = 0  # tracks sent for the CG being formed
        self.partial_tracks = 0  # tracks sent as segment runs, in total
        self._takes_runs: dict[type, bool] = {}

    @property
    def sends_runs(self) -> bool:
        """Whether the remote (which a test may swap) takes segment runs."""
        kind = type(self.remote)
        takes = self._takes_runs.get(kind)
        if takes is None:
            try:
                takes = "runs" in inspect.signature(self.remote.send_track).parameters
            except (TypeError, ValueError):
                takes = False
            self._takes_runs[kind] = takes
        return takes

    async def compose_runs(self, vi: int, t: int, *, whole: bool = False) -> tuple[bytes, list[tuple[int, int]] | None]:
        """What to send of the track for the CG being formed, from the old
        image over A: the segments its mask names and their runs, or the
        whole track and None."""
        cache = self.region.cache
        length = self.volumes.track_len(vi, t)
        dev = self.volumes.devices[vi]
        bs = dev.info.block_size
        nsect = (length + SECTOR_BYTES - 1) // SECTOR_BYTES
        while True:
            cur, _ = cache.images(vi, t)
            mask = cache.track_mask(vi, t) if not whole else 0
            runs = segment_runs(mask, length) if mask and mask != cache.seg_full else None
            if runs is not None:
                out = bytearray(sum(n for _, n in runs))
                view = memoryview(out)
                pos = 0
                stale = False
                for start, n in runs:
                    s0, s1 = start // SECTOR_BYTES, (start + n + SECTOR_BYTES - 1) // SECTOR_BYTES
                    if cur is None or cur.valid.count(1, s0, s1) != s1 - s0:  # partly in A
                        view[pos : pos + n] = await dev.read((t * self.volumes.track_bytes + start) // bs,
                                                             (n + bs - 1) // bs)
                        if cache.images(vi, t)[0] is not cur:
                            stale = True
                            break
                    cache.overlay(vi, t, view, pos, start, start + n, include_new=False)
                    pos += n
                if stale:
                    continue
                return bytes(out), runs
            if cache.fully_valid(cur, nsect):
                out = bytearray(length)
            else:
                out = bytearray(await dev.read(t * self.volumes.track_bytes // bs, (length + bs - 1) // bs))
                if cache.images(vi, t)[0] is not cur:
                    continue
            cache.overlay(vi, t, out, 0, 0, length, include_new=False)
            return bytes(out), None

    def owes(self, vi: int, t: int) -> bool:
        """Track t of volume vi has an old image still to send in this CG."""
        return self.region.oos[vi].test(t) and (vi, t) not in self.sent

    def _still_owed(self, vi: int, t: int, seq: int) -> bool:
        return self.in_cg(seq) and self.owes(vi, t)

    def unsent(self) -> int:
        """OOS tracks not yet sent in this CG (all OOS tracks outside a CG)."""
        return self.region.oos_tracks() - len(self.sent)

    def cg_ended(self) -> None:
        """The CG ended: what was sent and not synced stays in OOS, to be resent."""
        self.sent.clear()

    async def sync(self, seq: int) -> None:
        """Make B durable for every track sent so far, then clear their OOS
        bits (unless the CG ended meanwhile: then they stay, and are resent).
        Concurrent callers share syncs: one runs at a time, and a caller is
        done with the first of CG ``seq`` that began after it called (it
        covers every track acknowledged before). Callers that waited for
        the running one share the next, instead of running one each in turn
        (with sends going on, each found a batch of its own: a convoy)."""
        need = self._sync_started + 1
        while True:
            done, done_seq = self._synced
            if done >= need and done_seq == seq:
                return
            if self._syncing is None:
                break
            await asyncio.shield(self._syncing)  # its failure is every waiter's
        batch = dict(self.sent)
        if not batch or not self.in_cg(seq):
            return
        self._sync_started += 1
        number = self._sync_started
        syncing = self._syncing = asyncio.get_running_loop().create_future()
        try:
            epoch = self.remote.epoch
            # A track acknowledged on an earlier link may have been in the
            # volatile cache of a secondary that restarted since (the link
            # reconnected underneath): a sync now would flush nothing of it.
            stale = sum(1 for e in batch.values() if e != epoch)
            if stale:
                raise CgFailed(f"CG {seq}: {stale} track(s) went to the secondary before its link was "
                               "re-established; they are sent again")
            await self.remote.sync(seq)
            if self.remote.epoch != epoch:
                raise CgFailed(f"CG {seq}: the link was re-established during the sync; the batch is sent again")
            self.crashpoints.hit(BEFORE_OOS_CLEAR)
            if self.in_cg(seq):
                oos = self.region.oos
                cache = self.region.cache
                for vi, t in batch:
                    oos[vi].clear(t)
                    cache.synced(vi, t)  # after the bit: a mask is never less than the bit needs
                for key in batch:
                    self.sent.pop(key, None)
            self._synced = (number, seq)
            syncing.set_result(None)
        except BaseException as e:
            syncing.set_exception(e if isinstance(e, Exception) else CgFailed("sync interrupted"))
            syncing.exception()  # retrieved: waiters re-raise it, nobody else must
            if isinstance(e, LINK_ERRORS):
                self.on_link_error()
            raise
        finally:
            self._syncing = None

    async def send_old(self, vi: int, t: int, seq: int) -> None:
        """Send the old image of one OOS track of CG ``seq``. Concurrent
        callers for the same track share one send.

        Only a track whose OOS bit is still set in the CG being formed has an
        old image: once a send cleared the bit, a write lands on the track's
        (now only) image and records in CR, so sending the track again would
        put a write of the next CG into B under this one. A caller that
        decided to send before awaiting (a drain worker, a send-first write
        with several tracks) is re-checked here, after any shared send."""
        key = (vi, t)
        while (fut := self.inflight.get(key)) is not None:
            await asyncio.shield(fut)
        if not self._still_owed(vi, t, seq):
            return
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            data, runs = await self.compose_runs(vi, t, whole=not self.sends_runs)
            self.crashpoints.hit(MID_DRAIN)
            if runs is None:
                await self.remote.send_track(self.volumes.names[vi], t, seq, data)
            else:
                await self.remote.send_track(self.volumes.names[vi], t, seq, data, runs=runs)
                self.partial_tracks += 1
            if self._still_owed(vi, t, seq):
                cache = self.region.cache
                if not cache.promote(vi, t):
                    cache.sent(vi, t)
                self.sent[key] = self.remote.epoch  # the link the secondary acknowledged it on
                self.drain_bytes += len(data)
                self.cg_tracks += 1
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else CgFailed("drain interrupted"))
            fut.exception()  # retrieved: waiters re-raise it, nobody else must
            if isinstance(e, LINK_ERRORS):
                self.on_link_error()
            raise
        finally:
            self.inflight.pop(key, None)

    async def drain(self, seq: int, workers: int, limit: int | None = None) -> None:
        """Send OOS tracks of CG ``seq`` (at most ``limit``; all when None)
        with ``workers`` sends in flight, while the CG is being formed, then
        sync them (a sync also follows every ``SYNC_BATCH`` sends). The
        first failed send fails the drain and is raised as itself."""
        oos = self.region.oos
        cursor = [0, 0]
        budget = [limit]

        def next_track() -> tuple[int, int] | None:
            while cursor[0] < len(oos):
                vi, t = cursor
                found = oos[vi].next_set(t)
                if found < 0:
                    cursor[0], cursor[1] = vi + 1, 0
                    continue
                cursor[1] = found + 1
                if (vi, found) not in self.sent:
                    return vi, found
            return None

        async def worker() -> None:
            while self.in_cg(seq):
                if budget[0] is not None:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                item = next_track()
                if item is None:
                    return
                await self.send_old(item[0], item[1], seq)
                if len(self.sent) >= SYNC_BATCH and self._syncing is None:
                    await self.sync(seq)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(workers):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        await self.sync(seq)
