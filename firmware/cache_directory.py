"""The write cache's directory: each slot's entry in NVRAM, read back by
``load`` and written by the ``_write_*`` methods (firmware/cache.py's
WriteCache inherits them; firmware/layout.py declares the bytes).

Persistence order: slot data first, then the directory entry that makes it
valid (two copies per slot, generation + CRC32C). An entry is always written
over the slot's older copy, so a torn entry write leaves the slot's previous
entry, never an older one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from bitarray import bitarray

from firmware.errors import NvramError
from firmware.layout import (
    STATE_CUR,
    STATE_FREE,
    STATE_JOURNAL,
    STATE_NEW,
    RegionPlan,
    pack_entry,
    unpack_entry,
)
from hal.nvram import NvramRegion

Key = tuple[int, int]  # (volume index, track)


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


class CacheDirectory:
    """WriteCache's directory: format, load and every directory entry
    write. ``load`` undoes journals with ``_undo`` (CacheJournal) and a
    freed slot wakes WriteCache's writers waiting for one."""

    nvram: NvramRegion
    view: memoryview
    plan: RegionPlan
    n_slots: int
    track_bytes: int
    sectors: int
    valid_bytes: int
    seg_bytes: int
    entry_bytes: int
    _index: dict[Key, list[CacheEntry | None]]
    _free: list[int]
    _slot_copy: list[int]
    _clean: OrderedDict[Key, CacheEntry]
    _dirty: OrderedDict[Key, None]
    with_new: set[Key]
    destaging: set[Key]
    _gen: int
    _space_waiters: list

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

    def slot_view(self, entry: CacheEntry) -> memoryview:
        at = self.plan.slots_offset + entry.slot * self.track_bytes
        return self.view[at : at + self.track_bytes]

    def _slot_bytes(self, slot: int) -> memoryview:
        at = self.plan.slots_offset + slot * self.track_bytes
        return self.view[at : at + self.track_bytes]

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
