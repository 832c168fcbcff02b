"""The write cache's overwrite journal (power-cut safety).

Overwriting sectors an image already holds is not atomic in NVRAM (a power
cut tears unpersisted stores per 8-byte word), and those sectors hold
acknowledged data. So ``apply`` (firmware/cache.py) first saves their old
contents to a free slot and seals an undo journal entry there (state
JOURNAL); ``load`` puts them back when the image's entry was not rewritten
after the journal, so each sector is old or new, never a mix. A clean image
needs no journal: its entry first drops those sectors (A holds them), then
the write lands.
"""

from __future__ import annotations

from bitarray import bitarray

from firmware.cache_directory import CacheDirectory, CacheEntry, valid_runs
from firmware.layout import SECTOR_BYTES, STATE_CUR, STATE_JOURNAL, pack_entry


class CacheJournal(CacheDirectory):
    """Saving held sectors before an overwrite, and undoing it on load.
    Uses WriteCache's ``counters`` and ``_evict`` (to borrow a slot)."""

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
            self._evict(victim)
            return victim.slot
        return None

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
