"""WriteCache: track images in the NVRAM region (firmware/destage.py writes
them to volume A).

A slot holds one track image with a per-sector (512 B) valid map, so partial
writes fill sectors. A track has at most two images: ``cur`` (the only image,
or while change recording is on, the *old* image that belongs to the CG
being formed) and ``new`` (written after CR creation to a track whose OOS bit
is still set, dual-image policy). Reads return the newest: new over cur over
volume A. Only ``cur`` images are ever destaged, so A never receives a new
image before the old one has been sent; ``promote`` (after the old image was
sent) merges the old image into the holes of the new one and discards it.

The directory entries that make slots valid, their persistence order,
``format`` and ``load`` are in firmware/cache_directory.py; the journal that
makes an overwrite of acknowledged sectors power-cut safe is in
firmware/cache_journal.py. WriteCache inherits both.

Each image also keeps a *segment mask* (``segs``, a bit per 4 KiB segment):
what of its track was written since the track was last made durable in B,
so the drain sends those segments only. Its crash rules are in
firmware/layout.py; here: ``apply`` adds the written segments, ``promote``
and ``merge_new_into_cur`` keep the union (with the old image's record when
it was evicted), and only ``synced`` (B durable for a send) drops bits: the mask becomes what was written after that send.
Evicting the image of a track that owes B something first keeps its mask
in the track's NVRAM record (firmware/track_masks.py); an image allocated
for a track that already owes starts from that record, or full when there
is none.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from bitarray import bitarray

from firmware.cache_directory import CacheEntry, Key, valid_runs
from firmware.cache_journal import CacheJournal
from firmware.errors import CacheFull
from firmware.layout import SECTOR_BYTES, SEGMENT_BYTES, STATE_CUR, STATE_NEW, RegionPlan
from firmware.track_masks import TrackMasks
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)

EVICT_SCAN = 64  # clean images looked at for one whose track owes nothing, before the LRU one goes


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    destaged: int = 0
    evictions: int = 0
    destage_errors: int = 0
    last_error: str = ""
    journaled: int = 0  # overwrites of held sectors with their old contents saved first
    unjournaled: int = 0  # ... with no slot to save them in (no free slot, nothing evictable)
    full_waits: int = 0  # host writes that waited for a slot: every slot dirty or new (NVRAM truly full)


class WriteCache(CacheJournal):
    def __init__(self, nvram: NvramRegion, plan: RegionPlan) -> None:
        self.nvram = nvram
        self.view = nvram.view
        self.plan = plan
        self.n_slots = plan.n_slots
        self.track_bytes = plan.track_bytes
        self.sectors = plan.track_bytes // SECTOR_BYTES
        self.valid_bytes = plan.valid_bytes
        self.seg_bytes = plan.segment_bytes
        self.seg_full = (1 << ((plan.track_bytes + SEGMENT_BYTES - 1) // SEGMENT_BYTES)) - 1
        self.mask_epoch = 0  # the CG record's (firmware/region.py sets it)
        self.owes: Callable[[Key], bool] | None = None  # whether a track's OOS or CR bit is set (region sets it)
        self.track_masks = TrackMasks(nvram, plan)
        self.entry_bytes = plan.entry_bytes
        self._index: dict[Key, list[CacheEntry | None]] = {}  # key -> [cur, new]
        self._free: list[int] = []
        self._slot_copy: list[int] = [-1] * self.n_slots  # directory copy of each slot written last
        self._clean: OrderedDict[Key, CacheEntry] = OrderedDict()  # evictable, LRU first
        self._dirty: OrderedDict[Key, None] = OrderedDict()  # destage queue
        self.with_new: set[Key] = set()
        self.destaging: set[Key] = set()
        self.counters = CacheCounters()
        self._gen = 1
        self._space_waiters: list[asyncio.Future] = []
        self._dirty_waiters: list[asyncio.Future] = []

    # -- lookups ----------------------------------------------------------------------
    def images(self, volume: int, track: int) -> tuple[CacheEntry | None, CacheEntry | None]:
        pair = self._index.get((volume, track))
        return (pair[0], pair[1]) if pair else (None, None)

    def has(self, volume: int, track: int) -> bool:
        return (volume, track) in self._index

    def available(self, pinned: set[Key] | None = None) -> int:
        """Slots an allocation can get: free ones plus evictable clean images
        (minus those of ``pinned`` tracks, which the caller is about to use)."""
        n = len(self._free) + len(self._clean)
        if pinned:
            n -= sum(1 for k in pinned if k in self._clean)
        return n

    def dirty_count(self) -> int:
        return len(self._dirty)

    def used(self) -> int:
        return self.n_slots - len(self._free)

    # -- allocation ---------------------------------------------------------------------
    def allocate(self, volume: int, track: int, state: int, pinned: set[Key] | None = None, *,
                 owed: bool = True) -> CacheEntry:
        """A new empty image (not yet in the directory: the first ``apply`` writes
        it). Never evicts the images of ``pinned`` tracks. ``owed``: the track
        already owes B something this image does not know (its OOS or CR bit
        was set before), so its segment mask starts full."""
        victim = None
        if not self._free and self._clean:
            owes = self.owes
            scanned = 0
            for key, entry in self._clean.items():  # LRU first
                if not pinned or key not in pinned:
                    if victim is None:
                        victim = entry
                    # Rather one whose track owes B nothing: evicting an owing
                    # track's image costs a mask record write, and its drain a read of A.
                    if owes is None or not owes(key):
                        victim = entry
                        break
                    scanned += 1
                    if scanned >= EVICT_SCAN:
                        break
        if self._free:
            slot = self._free.pop()
        elif victim is not None:
            self._evict(victim)
            slot = victim.slot
        else:
            raise CacheFull(f"all {self.n_slots} cache slots hold dirty or new images")
        valid = bitarray(self.sectors, endian="little")
        valid.setall(0)
        entry = CacheEntry(slot, volume, track, state, valid, dirty=True, copy=self._slot_copy[slot],
                           segs=self._kept_mask(volume, track) if owed else 0, epoch=self.mask_epoch)
        pair = self._index.setdefault((volume, track), [None, None])
        role = 0 if state == STATE_CUR else 1
        assert pair[role] is None, "allocate over an existing image"
        pair[role] = entry
        if state == STATE_NEW:
            self.with_new.add((volume, track))
        return entry

    # -- data ----------------------------------------------------------------------------
    def apply(self, entry: CacheEntry, byte_in_track: int, data: memoryview) -> None:
        """Copy ``data`` into the image at ``byte_in_track`` (sector aligned), then
        write its directory entry. The write is durable when this returns."""
        n = data.nbytes
        s = byte_in_track // SECTOR_BYTES
        e = s + (n + SECTOR_BYTES - 1) // SECTOR_BYTES
        if entry.valid.count(1, s, e):  # acknowledged data is overwritten in place
            if entry.dirty:
                self._journal(entry, s, e)
            else:
                # Clean: A holds these sectors, flushed. Let reads (and a
                # recovery) fall through to A while they are rewritten.
                entry.valid[s:e] = 0
                self._write_entry(entry)
        at = self.plan.slots_offset + entry.slot * self.track_bytes + byte_in_track
        self.view[at : at + n] = data
        self.nvram.persist(at, n)
        entry.valid[s:e] = 1
        first = byte_in_track // SEGMENT_BYTES
        segs = ((1 << ((byte_in_track + n - 1) // SEGMENT_BYTES - first + 1)) - 1) << first if n else 0
        if entry.epoch != self.mask_epoch:
            entry.segs, entry.epoch = self.seg_full, self.mask_epoch
        entry.segs |= segs
        if entry.tracking:
            entry.after |= segs
        self._touch(entry)  # a newer generation than the journal: the overwrite stands

    def _touch(self, entry: CacheEntry) -> None:
        entry.dirty = True
        entry.seq += 1
        self._write_entry(entry)
        if entry.state == STATE_CUR:
            self._clean.pop(entry.key, None)
            if entry.key not in self._dirty:
                self._dirty[entry.key] = None
                self._wake(self._dirty_waiters)

    def overlay(self, volume: int, track: int, out: bytearray | memoryview, out_offset: int,
                start: int, end: int, *, include_new: bool = True) -> bool:
        """Copy cached sectors of bytes [start, end) of the track over ``out``
        (where byte ``start`` of the track lands at ``out_offset``). True if
        the track had any image."""
        cur, new = self.images(volume, track)
        if cur is None and (new is None or not include_new):
            return False
        s0, s1 = start // SECTOR_BYTES, (end + SECTOR_BYTES - 1) // SECTOR_BYTES
        for e in (cur, new if include_new else None):
            if e is None:
                continue
            slot = self.slot_view(e)
            for a, b in valid_runs(e.valid, s0, s1):
                lo, hi = max(a * SECTOR_BYTES, start), min(b * SECTOR_BYTES, end)
                out[out_offset + lo - start : out_offset + hi - start] = slot[lo:hi]
        if cur is not None and cur.key in self._clean:
            self._clean.move_to_end(cur.key)
        return True

    def fully_valid(self, entry: CacheEntry | None, nsectors: int) -> bool:
        return entry is not None and entry.valid.count(1, 0, nsectors) == nsectors

    # -- the two image transitions ----------------------------------------------------------
    def promote(self, volume: int, track: int) -> bool:
        """Claim 7: the old image was sent. Fill the new image's holes from the old
        one, discard the old one; the new image becomes the track's only image.
        Returns True if there was a new image."""
        pair = self._index.get((volume, track))
        if pair is None or pair[1] is None:
            return False
        cur, new = pair
        after = self.segment_mask(new)  # the new image was written after the CG's cut, all of it
        new.segs, new.epoch = after | self._old_mask(cur, volume, track), self.mask_epoch
        new.after, new.tracking = after, True
        if cur is not None:
            src, dst = self.slot_view(cur), self.slot_view(new)
            holes = cur.valid & ~new.valid
            for a, b in valid_runs(holes, 0, self.sectors):
                dst[a * SECTOR_BYTES : b * SECTOR_BYTES] = src[a * SECTOR_BYTES : b * SECTOR_BYTES]
            at = self.plan.slots_offset + new.slot * self.track_bytes
            self.nvram.persist(at, self.track_bytes)
            new.valid |= cur.valid
        new.state = STATE_CUR
        pair[1] = None
        self.with_new.discard((volume, track))
        if cur is not None:
            # The promoted image (higher generation) is written first: a crash
            # between the two writes leaves two "cur" images and load() keeps it.
            pair[0] = new
            self._touch(new)
            self._write_free(cur)
            self._clean.pop(cur.key, None)
            self._free.append(cur.slot)
        else:
            pair[0] = new
            self._touch(new)
        return True

    def merge_new_into_cur(self, volume: int, track: int) -> None:
        """A CG failed: the new image's sectors overwrite the old image (idempotent)."""
        pair = self._index.get((volume, track))
        if pair is None or pair[1] is None:
            return
        cur, new = pair
        self.with_new.discard((volume, track))
        if cur is not None:
            cur.segs, cur.epoch = self.segment_mask(cur) | self.segment_mask(new), self.mask_epoch
            cur.tracking = False
        new.tracking = False
        if cur is None:  # the old image was evicted: what it owed is in the track's record
            new.segs, new.epoch = self.segment_mask(new) | self._kept_mask(volume, track), self.mask_epoch
            new.state = STATE_CUR
            pair[0], pair[1] = new, None
            self._touch(new)
            return
        src, dst = self.slot_view(new), self.slot_view(cur)
        for a, b in valid_runs(new.valid, 0, self.sectors):
            dst[a * SECTOR_BYTES : b * SECTOR_BYTES] = src[a * SECTOR_BYTES : b * SECTOR_BYTES]
        self.nvram.persist(self.plan.slots_offset + cur.slot * self.track_bytes, self.track_bytes)
        cur.valid |= new.valid
        self._touch(cur)  # newer generation than ``new``: a replay after a crash is harmless
        pair[1] = None
        self._write_free(new)
        self._free.append(new.slot)

    # -- segment masks -------------------------------------------------------------------
    def segment_mask(self, entry: CacheEntry | None) -> int:
        """The segments of ``entry``'s track written since B was last durable
        for it; all of them for no image or a mask of another epoch."""
        if entry is None or entry.epoch != self.mask_epoch:
            return self.seg_full
        return entry.segs

    def track_mask(self, volume: int, track: int) -> int:
        """What the drain sends of the track: its cur image's mask, else the
        mask its evicted image left; all segments when neither is known."""
        return self._old_mask(self._index.get((volume, track), (None, None))[0], volume, track)

    def _old_mask(self, cur: CacheEntry | None, volume: int, track: int) -> int:
        """The mask of the track's old image, or of its record once evicted."""
        return self.segment_mask(cur) if cur is not None else self._kept_mask(volume, track)

    def _kept_mask(self, volume: int, track: int) -> int:
        """The track's NVRAM mask record; all segments when it has none of
        this epoch, or an empty one (the drain sends an empty mask whole)."""
        return self.track_masks.get(volume, track, self.mask_epoch) or self.seg_full

    def _evict(self, victim: CacheEntry) -> None:
        """Free a clean image's slot; if its track owes B something, keep
        its mask in the track's record first (firmware/layout.py: the
        record is persisted before the entry that frees the slot)."""
        del self._clean[victim.key]
        self._drop(victim)
        if self.owes is not None and self.owes(victim.key):
            self.track_masks.put(victim.volume, victim.track, self.segment_mask(victim), self.mask_epoch)
        self._write_free(victim)
        self.counters.evictions += 1

    def sent(self, volume: int, track: int) -> None:
        """The track's only image was sent (nothing to promote): from now on
        it counts the segments written after the send."""
        cur = self._index.get((volume, track), (None, None))[0]
        if cur is not None:
            cur.after, cur.tracking = 0, True

    def synced(self, volume: int, track: int) -> None:
        """B is durable for the track's send: its mask keeps only what was
        written after the send. An image allocated after the send (not
        tracking) keeps its full mask."""
        cur = self._index.get((volume, track), (None, None))[0]
        if cur is None or not cur.tracking:
            return
        cur.tracking = False
        if cur.segs != cur.after or cur.epoch != self.mask_epoch:
            cur.segs, cur.epoch = cur.after, self.mask_epoch
            self._write_entry(cur)
        cur.after = 0

    # -- destage bookkeeping --------------------------------------------------------------
    def next_dirty(self) -> CacheEntry | None:
        for key in self._dirty:
            if key not in self.destaging:
                return self._index[key][0]
        return None

    def destage_snapshot(self, entry: CacheEntry, track_len: int) -> tuple[int, list[tuple[int, bytes]]]:
        slot = self.slot_view(entry)
        nsect = (track_len + SECTOR_BYTES - 1) // SECTOR_BYTES
        runs = [(a * SECTOR_BYTES, bytes(slot[a * SECTOR_BYTES : b * SECTOR_BYTES]))
                for a, b in valid_runs(entry.valid, 0, nsect)]
        return entry.seq, runs

    def destage_done(self, entry: CacheEntry, seq: int) -> None:
        self.counters.destaged += 1
        pair = self._index.get(entry.key)
        if pair is None or pair[0] is not entry or entry.seq != seq:
            return  # rewritten, promoted or freed meanwhile: still dirty (or gone)
        entry.dirty = False
        self._write_entry(entry)
        self._dirty.pop(entry.key, None)
        self._clean[entry.key] = entry
        self._wake(self._space_waiters)

    # -- waiting -----------------------------------------------------------------------------
    async def wait_space(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._space_waiters.append(fut)
        await fut

    async def wait_dirty(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._dirty_waiters.append(fut)
        await fut

    def _wake(self, waiters: list[asyncio.Future]) -> None:
        while waiters:
            fut = waiters.pop()
            if not fut.done():
                fut.set_result(None)

    def stats(self) -> dict:
        dual = sum(1 for k in self.with_new if self._index[k][0] is not None)
        used = self.used()
        return {"slots": self.n_slots, "used": used, "dual": dual, "dirty": len(self._dirty),
                "new": len(self.with_new), "hits": self.counters.hits, "misses": self.counters.misses,
                "destaged": self.counters.destaged, "evictions": self.counters.evictions,
                "full_waits": self.counters.full_waits,
                "track_masks": self.track_masks.present,  # false: evicted owing tracks are sent whole
                "occupancy": used / self.n_slots if self.n_slots else 0.0}

    def _drop(self, entry: CacheEntry) -> None:
        pair = self._index.get(entry.key)
        if pair is not None:
            if pair[0] is entry:
                pair[0] = None
            if pair[1] is entry:
                pair[1] = None
                self.with_new.discard(entry.key)
            if pair[0] is None and pair[1] is None:
                del self._index[entry.key]
        self._clean.pop(entry.key, None)
        if self._index.get(entry.key, [None])[0] is None:
            self._dirty.pop(entry.key, None)
