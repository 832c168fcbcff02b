"""TrackMasks: the NVRAM area that keeps the segment mask of a track whose
cache image was evicted while the track owed B something, so the drain
still sends only its changed segments (layout VERSION 4; the record format
and the crash rules are in firmware/layout.py, the eviction that writes a
record is WriteCache's, firmware/cache.py).
"""

from __future__ import annotations

from firmware.layout import MASK_TAG_BYTES, RegionPlan, mask_tag
from hal.nvram import NvramRegion


class TrackMasks:
    """One record per track of every volume; none at all on a region
    without the area (VERSION 3): ``get`` is then always None."""

    def __init__(self, nvram: NvramRegion, plan: RegionPlan) -> None:
        self.nvram = nvram
        self.view = nvram.view
        self.offset = plan.masks_offset
        self.nbytes = plan.masks_bytes
        self.record = plan.mask_record_bytes
        self.seg_bytes = plan.segment_bytes
        self.base: list[int] = []  # first record of each volume
        n = 0
        for v in plan.volumes:
            self.base.append(n)
            n += v.tracks

    @property
    def present(self) -> bool:
        return bool(self.offset)

    def _at(self, volume: int, track: int) -> int:
        return self.offset + (self.base[volume] + track) * self.record

    def get(self, volume: int, track: int, mask_epoch: int) -> int | None:
        """The mask kept for the track under ``mask_epoch``; None when the
        record is of another epoch or was never written (or no area)."""
        if not self.offset:
            return None
        at = self._at(volume, track)
        view = self.view
        if int.from_bytes(view[at : at + MASK_TAG_BYTES], "little") != mask_tag(mask_epoch):
            return None
        return int.from_bytes(view[at + MASK_TAG_BYTES : at + MASK_TAG_BYTES + self.seg_bytes], "little")

    def put(self, volume: int, track: int, mask: int, mask_epoch: int) -> None:
        """Write the track's record (one store, persisted before this returns)."""
        if not self.offset:
            return
        raw = (mask_tag(mask_epoch).to_bytes(MASK_TAG_BYTES, "little") + mask.to_bytes(self.seg_bytes, "little"))
        at = self._at(volume, track)
        self.view[at : at + len(raw)] = raw
        self.nvram.persist(at, len(raw))

    def zero(self) -> None:
        """Every record void (format, and before the 16-bit tag comes round)."""
        if not self.offset:
            return
        self.view[self.offset : self.offset + self.nbytes] = bytes(self.nbytes)
        self.nvram.persist(self.offset, self.nbytes)
