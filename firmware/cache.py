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

Persistence order: slot data first, then the directory entry that makes it
valid (two copies per slot, generation + CRC32C; see firmware/layout.py). An
entry is always written over the slot's older copy, so a torn entry write
leaves the slot's previous entry, never an older one.

Overwriting sectors an image already holds is not atomic in NVRAM (a power
cut tears unpersisted stores per 8-byte word), and those sectors hold
acknowledged data. So ``apply`` first saves their old contents to a free
slot and seals an undo journal entry there (state JOURNAL); ``load`` puts
them back when the image's entry was not rewritten after the journal, so
each sector is old or new, never a mix. A clean image needs no journal: its
entry first drops those sectors (A holds them), then the write lands.

Each image also keeps a *segment mask* (``segs``, a bit per 4 KiB segment):
what of its track was written since the track was last made durable in B,
so the drain sends those segments only. Its crash rules are in
firmware/layout.py; here: ``apply`` adds the written segments, ``promote``
and ``merge_new_into_cur`` keep the union, an image allocated for a track
that already owes something starts full, and only ``synced`` (B durable for
a send) drops bits: the mask becomes what was written after that send.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from bitarray import bitarray

from firmware.errors import CacheFull, NvramError
from firmware.layout import (
    SECTOR_BYTES,
    SEGMENT_BYTES,
    STATE_CUR,
    STATE_FREE,
    STATE_JOURNAL,
    STATE_NEW,
    RegionPlan,
    pack_entry,
    unpack_entry,
)
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (volume index, track)
EVICT_SCAN = 64  # clean images looked at for one whose track owes nothing, before the LRU one goes


@dataclass(eq=False)
class CacheEntry:
    slot: int
    volume: int
    track: int
    state: int
    valid: bitarray
    dirty: bool = True
    seq: int = 0  # bumped on every data change: a destage only cleans the version it wrote
    copy: int = -1  # directory copy holding the newest version
    gen: int = 0
    segs: int = 0  # segment mask (bit i: segment i written since the track was last durable in B)
    epoch: int = 0  # the mask epoch ``segs`` was kept under; another one means "all segments"
    after: int = 0  # segments written since the track was sent (while ``tracking``), in memory only
    tracking: bool = False  # sent in the CG being formed, B not yet durable for it

    @property
    def key(self) -> Key:
        return (self.volume, self.track)


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


def valid_runs(valid: bitarray, start: int, end: int):
    """Yield [first, past) runs of set bits of ``valid`` within [start, end)."""
    pos = start
    while pos < end:
        first = valid.find(1, pos, end)
        if first < 0:
            return
        past = valid.find(0, first, end)
        past = end if past < 0 else past
        yield first, past
        pos = past


class WriteCache:
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

    # -- format / recovery ---------------------------------------------------------
    def format(self) -> None:
        start, n = self.plan.dir_offset, self.n_slots * 2 * self.entry_bytes
        self.view[start : start + n] = bytes(n)
        self.nvram.persist(start, n)
        self._reset()
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._slot_copy = [-1] * self.n_slots

    def _reset(self) -> None:
        self._index.clear()
        self._clean.clear()
        self._dirty.clear()
        self.with_new.clear()
        self.destaging.clear()

    def load(self, volume_tracks: list[int]) -> dict:
        """Rebuild the directory from NVRAM. Duplicate images of one role keep the
        highest generation (a crash during ``promote``). Returns a small report."""
        self._reset()
        self._free = []
        found: list[tuple[int, int, dict]] = []  # (slot, copy, entry)
        journals: list[tuple[int, dict]] = []  # (slot, entry)
        self._slot_copy = [-1] * self.n_slots
        max_gen = 0
        for slot in range(self.n_slots):
            best = None
            for copy in (0, 1):
                at = self._entry_offset(slot, copy)
                e = unpack_entry(self.view[at : at + self.entry_bytes], self.valid_bytes, self.seg_bytes)
                if e is not None and (best is None or e["gen"] > best[1]["gen"]):
                    best = (copy, e)
            if best is not None:
                max_gen = max(max_gen, best[1]["gen"])
                self._slot_copy[slot] = best[0]
                if best[1]["state"] == STATE_JOURNAL:
                    journals.append((slot, best[1]))
            if best is None or best[1]["state"] in (STATE_FREE, STATE_JOURNAL):
                self._free.append(slot)
                continue
            e = best[1]
            if e["volume"] >= len(volume_tracks) or e["track"] >= volume_tracks[e["volume"]] \
                    or e["state"] not in (STATE_CUR, STATE_NEW):
                raise NvramError(f"cache directory slot {slot} names volume {e['volume']} track {e['track']}"
                                 f" state {e['state']}, outside this region's geometry")
            found.append((slot, best[0], e))
        self._gen = max_gen + 1
        dropped = 0
        for slot, copy, e in sorted(found, key=lambda f: f[2]["gen"]):
            valid = bitarray(endian="little")
            valid.frombytes(e["valid"])
            del valid[self.sectors :]
            entry = CacheEntry(slot, e["volume"], e["track"], e["state"], valid, bool(e["dirty"]),
                               copy=copy, gen=e["gen"], segs=int.from_bytes(e["segments"], "little"),
                               epoch=e["mask_epoch"])
            pair = self._index.setdefault(entry.key, [None, None])
            role = 0 if entry.state == STATE_CUR else 1
            older = pair[role]
            if older is not None:  # newer generation wins; the older copy was already merged into it
                self._write_free(older)
                self._free.append(older.slot)
                dropped += 1
            pair[role] = entry
        for key, (cur, new) in self._index.items():
            if cur is not None:
                (self._dirty.__setitem__(key, None) if cur.dirty else self._clean.__setitem__(key, cur))
            if new is not None:
                self.with_new.add(key)
        undone = sum(self._undo(slot, e) for slot, e in journals)
        self._free.reverse()
        return {"images": len(found) - dropped, "dropped_duplicates": dropped, "new_images": len(self.with_new),
                "journal_undone": undone}

    def _undo(self, slot: int, journal: dict) -> bool:
        """Recovery: put back the sectors a journal saved, unless the image
        it names was rewritten after it (the overwrite completed, or the
        image is gone). Then the journal is freed, before its slot is reused."""
        pair = self._index.get((journal["volume"], journal["track"]))
        target = pair[1 if journal["dirty"] else 0] if pair else None
        undo = target is not None and target.gen < journal["gen"]
        if undo:
            saved = bitarray(endian="little")
            saved.frombytes(journal["valid"])
            del saved[self.sectors :]
            src, dst = self._slot_bytes(slot), self.slot_view(target)
            for a, b in valid_runs(saved, 0, self.sectors):
                dst[a * SECTOR_BYTES : b * SECTOR_BYTES] = src[a * SECTOR_BYTES : b * SECTOR_BYTES]
            self.nvram.persist(self.plan.slots_offset + target.slot * self.track_bytes, self.track_bytes)
        self._write_free_slot(slot)
        return undo

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
                    # track's image loses its mask (the track then goes whole).
                    if owes is None or not owes(key):
                        victim = entry
                        break
                    scanned += 1
                    if scanned >= EVICT_SCAN:
                        break
        if self._free:
            slot = self._free.pop()
        elif victim is not None:
            del self._clean[victim.key]
            self._drop(victim)
            self._write_free(victim)
            self.counters.evictions += 1
            slot = victim.slot
        else:
            raise CacheFull(f"all {self.n_slots} cache slots hold dirty or new images")
        valid = bitarray(self.sectors, endian="little")
        valid.setall(0)
        entry = CacheEntry(slot, volume, track, state, valid, dirty=True, copy=self._slot_copy[slot],
                           segs=self.seg_full if owed else 0, epoch=self.mask_epoch)
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

    def _journal(self, entry: CacheEntry, s0: int, s1: int) -> None:
        """Save the held sectors of [s0, s1) of ``entry`` to a free slot and
        seal a journal entry naming them; the slot stays free (the journal
        is void once ``entry``'s own entry is rewritten, a moment later)."""
        slot = self._borrow_slot(entry)
        if slot is None:  # every slot holds a dirty image or one this landing may still apply to
            self.counters.unjournaled += 1
            return
        saved = bitarray(self.sectors, endian="little")
        saved.setall(0)
        saved[s0:s1] = entry.valid[s0:s1]
        src, dst = self.slot_view(entry), self._slot_bytes(slot)
        lo, hi = saved.find(1), s1
        while not saved[hi - 1]:
            hi -= 1
        for a, b in valid_runs(saved, lo, hi):
            dst[a * SECTOR_BYTES : b * SECTOR_BYTES] = src[a * SECTOR_BYTES : b * SECTOR_BYTES]
        self.nvram.persist(self.plan.slots_offset + slot * self.track_bytes + lo * SECTOR_BYTES,
                           (hi - lo) * SECTOR_BYTES)
        role = 0 if entry.state == STATE_CUR else 1
        self._write_slot_entry(slot, pack_entry(self._next_gen(), STATE_JOURNAL, role, entry.volume, entry.track,
                                                saved.tobytes(), bytes(self.seg_bytes)))
        self._free.append(slot)
        self.counters.journaled += 1

    def _borrow_slot(self, entry: CacheEntry) -> int | None:
        """A slot to journal in: a free one, else the slot of an evicted
        clean image that is not ``entry``'s track and not a later track of
        its volume (a landing applies to its tracks in order, and those
        images must stay)."""
        if self._free:
            return self._free.pop()
        for key, victim in self._clean.items():  # LRU first
            if key[0] == entry.volume and key[1] >= entry.track:
                continue
            del self._clean[key]
            self._drop(victim)
            self._write_free(victim)
            self.counters.evictions += 1
            return victim.slot
        return None

    def _slot_bytes(self, slot: int) -> memoryview:
        at = self.plan.slots_offset + slot * self.track_bytes
        return self.view[at : at + self.track_bytes]

    def _touch(self, entry: CacheEntry) -> None:
        entry.dirty = True
        entry.seq += 1
        self._write_entry(entry)
        if entry.state == STATE_CUR:
            self._clean.pop(entry.key, None)
            if entry.key not in self._dirty:
                self._dirty[entry.key] = None
                self._wake(self._dirty_waiters)

    def slot_view(self, entry: CacheEntry) -> memoryview:
        at = self.plan.slots_offset + entry.slot * self.track_bytes
        return self.view[at : at + self.track_bytes]

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
        new.segs, new.epoch = after | self.segment_mask(cur), self.mask_epoch
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
        if cur is None:
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
                "occupancy": used / self.n_slots if self.n_slots else 0.0}

    # -- directory writes -------------------------------------------------------------------
    def _entry_offset(self, slot: int, copy: int) -> int:
        return self.plan.dir_offset + (slot * 2 + copy) * self.entry_bytes

    def _next_gen(self) -> int:
        gen = self._gen
        self._gen += 1
        return gen

    def _write_slot_entry(self, slot: int, raw: bytes) -> int:
        """Write one directory entry of ``slot`` over its older copy (so a torn
        write leaves the slot's last entry standing). Returns the copy written."""
        last = self._slot_copy[slot]
        copy = 1 - last if last >= 0 else 0
        at = self._entry_offset(slot, copy)
        self.view[at : at + len(raw)] = raw
        self.nvram.persist(at, len(raw))
        self._slot_copy[slot] = copy
        return copy

    def _write_entry(self, entry: CacheEntry) -> None:
        entry.gen = self._next_gen()
        raw = pack_entry(entry.gen, entry.state, int(entry.dirty), entry.volume, entry.track,
                         entry.valid.tobytes(), entry.segs.to_bytes(self.seg_bytes, "little"), entry.epoch)
        entry.copy = self._write_slot_entry(entry.slot, raw)

    def _write_free(self, entry: CacheEntry) -> None:
        entry.copy = self._write_free_slot(entry.slot)

    def _write_free_slot(self, slot: int) -> int:
        copy = self._write_slot_entry(slot, pack_entry(self._next_gen(), STATE_FREE, 0, 0, 0,
                                                       bytes(self.valid_bytes), bytes(self.seg_bytes)))
        self._wake(self._space_waiters)
        return copy

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
