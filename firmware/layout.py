"""NVRAM layout, declared once with construct.

Primary region (all integers little-endian; PAGE = 4096)::

    offset            what
    0                 header copy 0   (Sealed(Header), one page; firmware/double_record.py)
    PAGE              header copy 1
    2*PAGE            CG record copy 0 (Sealed(CgRecord))
    3*PAGE            CG record copy 1
    4*PAGE            per volume v: bitmap area 0, bitmap area 1 (each
                      ``bitmap_bytes``, page aligned). Bit ``v`` of the CG
                      record's ``oos_select`` says which area is OOS; the
                      other is CR. Creating CR allocates nothing; the swap
                      after a commit flips the bit.
    masks_offset      (since VERSION 4) the track mask area: one record of
                      ``mask_record_bytes`` per track of every volume, volume
                      by volume (volume v's track t is record
                      sum(tracks of volumes before v) + t), 64-byte aligned.
                      A record is a u16 *tag* then the track's segment mask
                      (little-endian, padded): the mask an evicted image of
                      the track had. 4 bytes per track up to 16 segments.
    dir_offset        cache directory: ``n_slots`` x 2 copies of DirEntry
                      (``entry_bytes`` each). Entry i describes slot i: its
                      track, a valid bit per sector and (since VERSION 3) a
                      *segment mask*, a bit per 4 KiB segment of the track
                      written since the track was last made durable in B,
                      stamped with the mask epoch it was kept under.
    slots_offset      ``n_slots`` image slots of ``track_bytes`` each.

Secondary region: the same header (magic ``MFWS``; ``track_bytes`` is the
FlashCopy grain, ``n_slots`` 0), FlashCopy record copies where the primary
keeps its CG record, then per volume two "copied" bitmap areas; bit ``v`` of
``active_select`` names the live one.

Crash safety: every record that is rewritten in place (header, CG record,
FlashCopy record, directory entries) exists twice, each copy carries a
generation number and a CRC32C, and an update overwrites the older copy, so
a crash at any byte leaves the previous version readable. Slot data is
written before the directory entry that makes it valid; bitmap bits are set
before the data they announce.

Segment masks (VERSION 3): the drain sends a track's masked segments only,
so the mask must never lose a segment that B may lack. It is written in
the entry after the data it describes (like ``valid``), only ever grows
until the secondary made B durable (then it drops what was sent), starts
all ones when the image is allocated for a track whose OOS or CR bit is
already set (the earlier writes are not known), and counts as all ones
when its ``mask_epoch`` is not the CG record's (a full copy bumps the
record's epoch: every mask is void at once). Older regions (VERSION 2) are
refused: format them again.

Track masks (VERSION 4): evicting the image of a track that owes B
something (OOS or CR bit set) first writes the image's mask to the track's
record, persisted before the directory entry that frees the slot; the drain
and a new image of that track then take the record's mask instead of the
whole track. Only a record whose tag is ``mask_tag`` of the CG record's
epoch counts; any other (zeros at format, an older epoch: a full copy) is
the whole track. Why a record is never too small: every write to a track
lands in an image, an image only goes (1) merged into the track's other
image, which keeps the union, or (2) evicted, which writes the record first
if the track owes; so while a track owes and has no image, its record was
written in this owing period, after every write of it. A cut inside that
record's write leaves the slot's entry (and the image) standing, and the
record is rewritten whole before the image is evicted again, so a torn
record is never read; a cut inside the entry's write finds the record
persisted. The record is not cleared at sync: it matters again only once
the track owes again, and by then an eviction has rewritten it. The tag is 16 bits of the 32-bit epoch: when it
comes round to 1 again the area is zeroed first (``mask_tag``). VERSION 3
regions (no area; evicted tracks go whole) are still read.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import crc32c
from construct import (
    Array,
    Bytes,
    Enum,
    Float64l,
    If,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PaddedString,
    Struct,
    this,
)

from firmware.double_record import DoubleRecord
from firmware.errors import NvramError
from hal.wire import fast_struct

PAGE = 4096
SECTOR_BYTES = 512
VERSION = 4  # 4: the header names a track mask area (evicted images keep their masks)
# 3: directory entries carry segment masks, the CG record their epoch
# 2: the CG record names its format generation, the FlashCopy record the primary's
PRIMARY_VERSIONS = (3, 4)  # a 3 has no track mask area: its evicted tracks go whole
SECONDARY_VERSIONS = (2, 3, 4)  # the secondary's region did not change in 3 or 4
SEGMENT_BYTES = 4096  # the drain's unit within a track (the OOS/CR granule stays the track)
PRIMARY_MAGIC = b"MFWP"
SECONDARY_MAGIC = b"MFWS"
MAX_VOLUMES = 48

VolumeRecord = Struct(
    "name" / PaddedString(32, "utf8"),
    "size_bytes" / Int64ul,
    "tracks" / Int64ul,
    "bitmap_offset" / Int64ul,  # area 0; area 1 follows at bitmap_offset + bitmap_bytes
    "bitmap_bytes" / Int64ul,
)

Header = Struct(
    "magic" / Bytes(4),
    "version" / Int16ul,
    "generation" / Int64ul,  # bumped on every open
    "clean" / Int8ul,  # 1 after a clean stop, 0 while running
    "track_bytes" / Int32ul,
    "sector_bytes" / Int32ul,
    "n_slots" / Int32ul,
    "entry_bytes" / Int32ul,
    "dir_offset" / Int64ul,
    "slots_offset" / Int64ul,
    "total_bytes" / Int64ul,
    "session_id" / PaddedString(64, "utf8"),
    "n_volumes" / Int16ul,
    "volumes" / Array(this.n_volumes, VolumeRecord),
    "masks_offset" / If(this.version >= 4, Int64ul),  # the track mask area; 0: none (a secondary)
)

PHASE_CODES = {"idle": 0, "quiescing": 1, "draining": 2, "committing": 3}

CgRecord = Struct(
    "seq" / Int64ul,  # sequence number of the CG being formed (or last formed)
    "phase" / Int8ul,  # PHASE_CODES
    "recording" / Int8ul,  # 1 while new writes set CR instead of OOS
    "oos_select" / Int64ul,  # bit v: which bitmap area of volume v is OOS
    "start_wall" / Float64l,  # when the current CG began quiescing
    "committed_seq" / Int64ul,
    "cut_wall" / Float64l,  # quiesce point of the last committed CG
    "commit_wall" / Float64l,
    "successful" / Int64ul,
    "failed" / Int64ul,
    "consecutive" / Int32ul,
    "generation" / Int64ul,  # made at format: which NVRAM the secondary's copy descends from
    "mask_epoch" / Int32ul,  # segment masks of another epoch count as whole tracks (a full copy bumps it)
)

FC_IDLE, FC_PREPARED = 0, 1

FlashCopyRecord = Struct(
    "session_id" / PaddedString(64, "utf8"),
    "established" / Int8ul,  # 1 once a CG committed (no full copy needed)
    "phase" / Int8ul,  # FC_IDLE | FC_PREPARED
    "committed_seq" / Int64ul,
    "prepared_seq" / Int64ul,
    "active_select" / Int64ul,  # bit v: which copied-bitmap area of volume v is live
    "commit_wall" / Float64l,
    "primary_generation" / Int64ul,  # the primary format generation the last commit was for
)


class EntryState(enum.IntEnum):
    """What a cache directory entry's slot holds."""

    FREE = 0  # nothing
    CUR = 1  # the old (or only) image of its track
    NEW = 2  # the image written while change recording was on
    # An undo journal, in a free slot: the old contents of the sectors (its
    # ``valid`` bits) of the image of (volume, track) whose role ``dirty``
    # names (0 cur, 1 new), saved before they are overwritten in place. Undone
    # at recovery unless that image's entry was rewritten after it (firmware/cache_journal.py).
    JOURNAL = 3


STATE_FREE, STATE_CUR, STATE_NEW = EntryState.FREE, EntryState.CUR, EntryState.NEW
STATE_JOURNAL = EntryState.JOURNAL
_STATE_OF = {s.value: s for s in EntryState}

# The fixed head of a directory entry copy; ``valid`` and the CRC follow.
EntryHead = Struct(
    "gen" / Int64ul,
    "state" / Enum(Int8ul, EntryState),
    "dirty" / Int8ul,  # 1 until destaged to volume A
    "volume" / Int16ul,
    "mask_epoch" / Int32ul,  # the CG record's mask_epoch when ``segments`` was last set (VERSION 2: reserved, 0)
    "track" / Int64ul,
)
# Hot-path twin of EntryHead, derived from it: construct costs ~10x more per host write.
_ENTRY_HEAD = fast_struct(EntryHead)  # (gen, state, dirty, volume, mask_epoch, track)


def segments_per_track(track_bytes: int) -> int:
    return (track_bytes + SEGMENT_BYTES - 1) // SEGMENT_BYTES


def segment_bytes_for(track_bytes: int) -> int:
    """Bytes of a directory entry's segment mask."""
    return (segments_per_track(track_bytes) + 7) // 8


@functools.lru_cache(maxsize=16)
def dir_entry_struct(valid_bytes: int, segment_bytes: int = 2) -> Struct:
    """One copy of a directory entry; ``valid`` has one bit per sector,
    ``segments`` one per 4 KiB segment (bit i: bytes [i*4096, (i+1)*4096)
    of the track, little-endian bit order like ``valid``)."""
    return Struct(
        *EntryHead.subcons,
        "valid" / Bytes(valid_bytes),
        "segments" / Bytes(segment_bytes),
        "crc" / Int32ul,  # CRC32C of everything before it
    )


def entry_bytes_for(valid_bytes: int, segment_bytes: int = 2) -> int:
    return (_ENTRY_HEAD.size + valid_bytes + segment_bytes + 4 + 7) & ~7


def pack_entry(gen: int, state: EntryState, dirty: int, volume: int, track: int, valid: bytes,
               segments: bytes = b"\0\0", mask_epoch: int = 0) -> bytes:
    """Build a directory entry fast; equal to dir_entry_struct(len(valid), len(segments)).build (tested)."""
    body = _ENTRY_HEAD.pack(gen, state, dirty, volume, mask_epoch, track) + valid + segments
    return body + crc32c.crc32c(body).to_bytes(4, "little")


def unpack_entry(raw: bytes, valid_bytes: int, segment_bytes: int = 2) -> dict | None:
    """Parse one entry copy; None when its CRC does not match (torn or never written).
    ``state`` is an EntryState, or the raw number when it names none (recovery reports it)."""
    v = _ENTRY_HEAD.size + valid_bytes
    n = v + segment_bytes
    if crc32c.crc32c(raw[:n]) != int.from_bytes(raw[n : n + 4], "little"):
        return None
    gen, state, dirty, volume, mask_epoch, track = _ENTRY_HEAD.unpack_from(raw, 0)
    if gen == 0:
        return None
    return {"gen": gen, "state": _STATE_OF.get(state, state), "dirty": dirty, "volume": volume,
            "track": track, "valid": bytes(raw[_ENTRY_HEAD.size : v]), "segments": bytes(raw[v:n]),
            "mask_epoch": mask_epoch}


MASK_TAG_BYTES = 2


def mask_record_bytes(track_bytes: int) -> int:
    """Bytes of one track mask record: the tag and the mask, padded to 4
    (up to 16 segments) or to 8 (aligned: one atomic word up to 48)."""
    n = MASK_TAG_BYTES + segment_bytes_for(track_bytes)
    return 4 if n <= 4 else align(n, 8)


def mask_tag(mask_epoch: int) -> int:
    """The tag of a track mask record kept under ``mask_epoch`` (u32, never
    0): 1..65535, never 0, which a zeroed area holds."""
    return (mask_epoch - 1) % 0xFFFF + 1


def align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


# -- geometry ----------------------------------------------------------------------
@dataclass
class VolumeArea:
    name: str
    size_bytes: int
    tracks: int
    bitmap_offset: int
    bitmap_bytes: int


@dataclass
class RegionPlan:
    magic: bytes
    track_bytes: int
    sector_bytes: int
    volumes: list[VolumeArea]
    n_slots: int
    entry_bytes: int
    dir_offset: int
    slots_offset: int
    total_bytes: int
    session_id: str
    masks_offset: int = 0  # the track mask area (0: none)

    HEADER_OFFSET = 0
    RECORD_OFFSET = 2 * PAGE

    @property
    def valid_bytes(self) -> int:
        return (self.track_bytes // self.sector_bytes + 7) // 8

    @property
    def segment_bytes(self) -> int:
        return segment_bytes_for(self.track_bytes)

    @property
    def mask_record_bytes(self) -> int:
        return mask_record_bytes(self.track_bytes)

    @property
    def masks_bytes(self) -> int:
        """Bytes of the track mask area (0 when there is none)."""
        if not self.masks_offset:
            return 0
        return align(sum(v.tracks for v in self.volumes) * self.mask_record_bytes, 64)

    def header_fields(self, generation: int, clean: int) -> dict:
        return {
            "magic": self.magic, "version": VERSION, "generation": generation, "clean": clean,
            "track_bytes": self.track_bytes, "sector_bytes": self.sector_bytes, "n_slots": self.n_slots,
            "entry_bytes": self.entry_bytes, "dir_offset": self.dir_offset, "slots_offset": self.slots_offset,
            "total_bytes": self.total_bytes, "session_id": self.session_id, "n_volumes": len(self.volumes),
            "volumes": [vars(v).copy() for v in self.volumes], "masks_offset": self.masks_offset,
        }

    @classmethod
    def from_header(cls, h: dict) -> RegionPlan:
        return cls(
            magic=h["magic"], track_bytes=h["track_bytes"], sector_bytes=h["sector_bytes"],
            volumes=[VolumeArea(v["name"], v["size_bytes"], v["tracks"], v["bitmap_offset"], v["bitmap_bytes"])
                     for v in h["volumes"]],
            n_slots=h["n_slots"], entry_bytes=h["entry_bytes"], dir_offset=h["dir_offset"],
            slots_offset=h["slots_offset"], total_bytes=h["total_bytes"], session_id=h["session_id"],
            masks_offset=h.get("masks_offset") or 0,
        )


MASKS_MAX_SHARE = 4  # the track mask area takes at most 1/4 of a region


def plan_region(magic: bytes, region_bytes: int, volumes: list[tuple[str, int]], track_bytes: int,
                session_id: str, *, with_cache: bool, min_slots: int = 16, max_slots: int | None = None) -> RegionPlan:
    """Lay out a region for ``volumes`` [(name, size_bytes)]; NvramError if it does not fit."""
    if not volumes:
        raise NvramError("no volumes to lay out")
    if len(volumes) > MAX_VOLUMES:
        raise NvramError(f"{len(volumes)} volumes; at most {MAX_VOLUMES} per region")
    for name, _ in volumes:
        if not name or len(name.encode()) > 32:
            raise NvramError(f"volume name {name!r} must be 1..32 bytes")
    if len(session_id.encode()) > 64:
        raise NvramError("session id longer than 64 bytes")
    pos = 4 * PAGE
    areas = []
    for name, size in volumes:
        tracks = (size + track_bytes - 1) // track_bytes
        bitmap_bytes = align((tracks + 63) // 64 * 8)
        areas.append(VolumeArea(name, size, tracks, pos, bitmap_bytes))
        pos += 2 * bitmap_bytes
    masks_offset = 0
    masks_bytes = sum(a.tracks for a in areas) * mask_record_bytes(track_bytes)
    # The track mask area (64-byte aligned: a page would cost small regions a
    # slot) grows with capacity, not with dirty data (64 MiB per TiB of 64 KiB
    # tracks): past a quarter of the region it would take the cache's room, so
    # the region keeps none and evicted tracks go whole (as VERSION 3).
    if with_cache and masks_bytes <= region_bytes // MASKS_MAX_SHARE:
        masks_offset = pos
        pos = align(pos + masks_bytes, 64)
    vbytes = (track_bytes // SECTOR_BYTES + 7) // 8
    ebytes = entry_bytes_for(vbytes, segment_bytes_for(track_bytes))
    dir_offset = pos
    n_slots = 0
    if with_cache:
        room = region_bytes - dir_offset
        n_slots = max(0, room // (track_bytes + 2 * ebytes))
        if max_slots is not None:
            n_slots = min(n_slots, max_slots)
        while n_slots and align(dir_offset + n_slots * 2 * ebytes) + n_slots * track_bytes > region_bytes:
            n_slots -= 1
        if n_slots < min_slots:
            need = align(dir_offset + min_slots * 2 * ebytes) + min_slots * track_bytes
            raise NvramError(
                f"NVRAM region of {region_bytes} bytes is too small: bitmaps{' and track masks' if masks_offset else ''} need {dir_offset} "
                f"bytes and "
                f"a cache of {min_slots} slots needs {need} bytes in all")
    slots_offset = align(dir_offset + n_slots * 2 * ebytes)
    total = slots_offset + n_slots * track_bytes
    if total > region_bytes:
        raise NvramError(f"NVRAM region of {region_bytes} bytes is too small; need {total} bytes")
    return RegionPlan(magic, track_bytes, SECTOR_BYTES, areas, n_slots, ebytes, dir_offset, slots_offset,
                      total, session_id, masks_offset)


def read_header(view: memoryview, persist) -> tuple[DoubleRecord, dict | None]:
    rec = DoubleRecord(view, persist, RegionPlan.HEADER_OFFSET, Header)
    if view.nbytes < 4 * PAGE:
        raise NvramError(f"NVRAM region of {view.nbytes} bytes is too small for a header")
    return rec, rec.read()


def region_is_blank(view: memoryview) -> bool:
    return not any(view[: 4 * PAGE])
