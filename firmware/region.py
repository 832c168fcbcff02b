"""NVRAM regions: where each role's persistent state is laid out, formatted
and recovered (DESIGN.md section 3, "NVRAM layout").

Both roles share the frame of a region (firmware/layout.py declares the
bytes): a double-buffered header, a double-buffered record, and two bitmap
areas per volume. The primary's areas are OOS and CR, with a selector bit per
volume saying which is which; the secondary's are FlashCopy's "copied" bits,
active and spare. ``format_region``, ``read_region`` and ``bitmap_pairs``
are that shared frame; ``PrimaryRegion`` is the primary's state on top of it:
the CG record, the write cache, OOS and CR, and the two things a failed CG
does to them (fold back) and a committed one (swap).
"""

from __future__ import annotations

import logging

from firmware.bitmap import TrackBitmap
from firmware.cache import WriteCache
from firmware.double_record import DoubleRecord
from firmware.errors import NvramError
from firmware.layout import (
    PAGE,
    PRIMARY_MAGIC,
    PRIMARY_VERSIONS,
    SECONDARY_VERSIONS,
    VERSION,
    CgRecord,
    Header,
    RegionPlan,
    mask_tag,
    plan_region,
    read_header,
)
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)

def format_region(nvram: NvramRegion, magic: bytes, volumes: list[tuple[str, int]], granule: int,
                  session_id: str, *, with_cache: bool) -> tuple[RegionPlan, DoubleRecord]:
    """Lay out and zero a fresh region: header (generation 1), empty bitmap
    areas. The caller writes its record next. Returns the plan and the
    header's store."""
    view = nvram.view
    plan = plan_region(magic, view.nbytes, volumes, granule, session_id, with_cache=with_cache)
    view[: 4 * PAGE] = bytes(4 * PAGE)
    for v in plan.volumes:
        n = 2 * v.bitmap_bytes
        view[v.bitmap_offset : v.bitmap_offset + n] = bytes(n)
    if plan.masks_offset:  # records left by an earlier format would carry a valid tag
        view[plan.masks_offset : plan.masks_offset + plan.masks_bytes] = bytes(plan.masks_bytes)
    nvram.persist(0, plan.dir_offset)
    header_store = DoubleRecord(view, nvram.persist, RegionPlan.HEADER_OFFSET, Header)
    header_store.write(plan.header_fields(generation=1, clean=0))
    return plan, header_store


def read_region(nvram: NvramRegion, magic: bytes, role: str) -> tuple[RegionPlan, DoubleRecord, dict]:
    """Read a region's header and check it is ``role``'s at this version.
    Returns the plan, the header's store and the header."""
    view = nvram.view
    store, header = read_header(view, nvram.persist)
    if header is None:
        raise NvramError(f"{getattr(nvram, 'url', 'NVRAM')}: no readable header (not formatted, or "
                         f"damaged); open with format=True to initialize")
    versions = PRIMARY_VERSIONS if magic == PRIMARY_MAGIC else SECONDARY_VERSIONS
    if header["magic"] == magic and header["version"] < VERSION and header["version"] not in versions:
        raise NvramError(f"NVRAM holds a {role} region of layout version {header['version']}, written by an older "
                         f"mirrorfw; this one reads versions {versions[0]} to {VERSION} (cache entries carry "
                         f"segment masks since 3). "
                         f"Stop with the old version after its CG committed, or format again (format=True: "
                         f"the cache is discarded and a full copy follows)")
    if header["magic"] != magic or header["version"] not in versions:
        raise NvramError(f"NVRAM holds {header['magic']!r} version {header['version']}, "
                         f"not a {role} region version {VERSION}")
    plan = RegionPlan.from_header(header)
    if plan.total_bytes > view.nbytes:
        raise NvramError(f"NVRAM region is {view.nbytes} bytes, its header needs {plan.total_bytes}")
    return plan, store, header


def bitmap_pairs(nvram: NvramRegion, plan: RegionPlan, *, fresh: bool,
                 on_bulk_set=None) -> list[tuple[TrackBitmap, TrackBitmap]]:
    """Each volume's two bitmap areas, backed by the region (every bit change
    is persisted where it lies). ``fresh``: the areas were just zeroed.
    ``on_bulk_set``: MaskedBitmaps calling it (the primary's OOS and CR)."""
    view = nvram.view
    pairs = []
    for v in plan.volumes:
        pair = []
        for area in (0, 1):
            base = v.bitmap_offset + area * v.bitmap_bytes
            args = (v.tracks, view[base : base + v.bitmap_bytes], _persister(nvram, base))
            if on_bulk_set is None:
                pair.append(TrackBitmap(*args, count=0 if fresh else None))
            else:
                pair.append(MaskedBitmap(*args, count=0 if fresh else None, on_bulk_set=on_bulk_set))
        pairs.append((pair[0], pair[1]))
    return pairs


def _persister(nvram: NvramRegion, base: int):
    def persist(offset: int, length: int) -> None:
        nvram.persist(base + offset, length)
    return persist


FRESH_RECORD = {"seq": 0, "phase": 0, "recording": 0, "oos_select": 0, "start_wall": 0.0, "committed_seq": 0,
                "cut_wall": 0.0, "commit_wall": 0.0, "successful": 0, "failed": 0, "consecutive": 0,
                "generation": 0, "mask_epoch": 1}


class MaskedBitmap(TrackBitmap):
    """An OOS or CR area of the primary. Setting a range of bits at once
    (a full copy) voids every segment mask first (firmware/layout.py): those
    tracks must be sent whole, whatever their images' masks say. A single
    ``set`` is the host path's, which keeps the masks itself."""

    def __init__(self, *args, on_bulk_set, **kw) -> None:
        super().__init__(*args, **kw)
        self._on_bulk_set = on_bulk_set

    def set_range(self, start: int, end: int) -> int:
        if min(end, self.tracks) > max(0, start):
            self._on_bulk_set()
        return super().set_range(start, end)


class PrimaryRegion:
    """The primary's NVRAM: CG record, write cache, OOS and CR per volume.

    ``record`` is the CG record as last written (``save`` rewrites it with one
    sealed write); ``oos[vi]``/``cr[vi]`` are the areas the record's selector
    names for volume ``vi`` (in ``names`` order, the region's order)."""

    def __init__(self, nvram: NvramRegion) -> None:
        self.nvram = nvram
        self.plan: RegionPlan | None = None
        self.cache: WriteCache | None = None
        self.names: list[str] = []
        self.oos: list[TrackBitmap] = []
        self.cr: list[TrackBitmap] = []
        self.record: dict = {}
        self._record_store: DoubleRecord | None = None
        self._header_store: DoubleRecord | None = None
        self._header: dict = {}

    # -- format and recover --------------------------------------------------------
    def format(self, volumes: list[tuple[str, int]], track_bytes: int, session_id: str, generation: int) -> None:
        """Lay the region out anew for ``volumes``; the cache and bitmaps are
        discarded. The format generation is ``generation``, or the one the
        region held plus one if that is larger (a clock that did not move)."""
        generation = max(generation, self._previous_generation() + 1)
        self.plan, self._header_store = format_region(self.nvram, PRIMARY_MAGIC, volumes, track_bytes,
                                                      session_id, with_cache=True)
        self._header = self.plan.header_fields(generation=1, clean=0)
        self.names = [name for name, _ in volumes]
        self._record_store = DoubleRecord(self.nvram.view, self.nvram.persist, RegionPlan.RECORD_OFFSET, CgRecord)
        self.record = dict(FRESH_RECORD, generation=generation)
        self._record_store.write(self.record)
        self.cache = WriteCache(self.nvram, self.plan)
        self.cache.format()
        self.cache.mask_epoch = self.record["mask_epoch"]
        self._attach(fresh=True)
        log.info("formatted NVRAM %s: %d slots of %d bytes", getattr(self.nvram, "url", "?"),
                 self.plan.n_slots, track_bytes)

    def _previous_generation(self) -> int:
        try:
            read_region(self.nvram, PRIMARY_MAGIC, "primary")
            rec = DoubleRecord(self.nvram.view, self.nvram.persist, RegionPlan.RECORD_OFFSET, CgRecord).read()
        except NvramError:
            return 0
        return rec["generation"] if rec is not None else 0

    def recover(self, volumes: dict[str, int]) -> dict:
        """Open a region written before (after a clean stop or a crash):
        check it is for ``volumes`` {name: size_bytes}, load the cache, and
        fail a CG caught in flight (fold back). Returns what was found."""
        plan, self._header_store, header = read_region(self.nvram, PRIMARY_MAGIC, "primary")
        theirs = {v.name: v.size_bytes for v in plan.volumes}
        if volumes != theirs:
            raise NvramError(f"NVRAM was formatted for volumes {theirs}, but the primary has {volumes}; "
                             "format it again (this discards the cache and forces a full copy)")
        self.plan = plan
        self.names = [v.name for v in plan.volumes]
        self._header = dict(header)
        self._header["volumes"] = [{k: v for k, v in dict(vol).items() if k != "_io"} for vol in header["volumes"]]
        self._record_store = DoubleRecord(self.nvram.view, self.nvram.persist, RegionPlan.RECORD_OFFSET, CgRecord)
        rec = self._record_store.read()
        if rec is None:
            raise NvramError("NVRAM CG record is unreadable (both copies damaged)")
        self.record = rec
        self.cache = WriteCache(self.nvram, plan)
        self.cache.mask_epoch = rec["mask_epoch"]
        report = self.cache.load([v.tracks for v in plan.volumes])
        self._attach(fresh=False)
        in_flight = bool(rec["recording"] or rec["phase"] != 0)
        stray = bool(self.cache.with_new) or any(c.count() for c in self.cr)
        if in_flight or stray:
            self.fold_back()
            changes = {"phase": 0, "recording": 0}
            if in_flight:
                changes.update(failed=rec["failed"] + 1, consecutive=rec["consecutive"] + 1)
            self.save(**changes)
        self._header.update(generation=header["generation"] + 1, clean=0)
        self._header_store.write(self._header)
        recovered = {"formatted": False, "clean": bool(header["clean"]), "cg_in_flight": in_flight,
                     "failed_seq": rec["seq"] if in_flight else None, **report,
                     "oos_tracks": sum(b.count() for b in self.oos)}
        log.info("recovered NVRAM: %s", recovered)
        return recovered

    def _attach(self, fresh: bool) -> None:
        sel = self.record["oos_select"]
        self.oos, self.cr = [], []
        for vi, pair in enumerate(bitmap_pairs(self.nvram, self.plan, fresh=fresh, on_bulk_set=self.void_masks)):
            bit = (sel >> vi) & 1
            self.oos.append(pair[bit])
            self.cr.append(pair[1 - bit])
        self.cache.owes = self._owes

    def _owes(self, key: tuple[int, int]) -> bool:
        vi, t = key
        return self.oos[vi].test(t) or self.cr[vi].test(t)

    def mark_clean(self, clean: bool) -> None:
        self._header.update(clean=int(clean))
        self._header_store.write(self._header)

    def void_masks(self) -> None:
        """Every segment mask counts as the whole track from now on (before
        bits are set in bulk; the new epoch is durable first)."""
        epoch = self.record["mask_epoch"] % 0xFFFFFFFF + 1  # a u32, never 0
        if mask_tag(epoch) == 1:  # the track records' 16-bit tag comes round: none may match it
            self.cache.track_masks.zero()
        self.save(mask_epoch=epoch)
        self.cache.mask_epoch = epoch

    # -- the record ------------------------------------------------------------------
    def save(self, **changes) -> None:
        """Rewrite the CG record with ``changes`` (one sealed write)."""
        self.record.update(changes)
        self._record_store.write(self.record)

    # -- what a CG's end does to the bitmaps ---------------------------------------------
    def fold_back(self) -> None:
        """A CG failed (or was caught in flight by a crash): new images fold
        into old ones, CR is OR-merged into OOS and emptied. Idempotent."""
        for key in list(self.cache.with_new):
            self.cache.merge_new_into_cur(*key)
        for oos, cr in zip(self.oos, self.cr, strict=True):
            oos.or_merge(cr)
            cr.clear_all()

    def swap(self) -> int:
        """A CG committed: CR becomes OOS on every volume (OOS is empty after
        a drain, so this is a pointer flip). Returns the new selector, which
        the caller records in the same write as the commit."""
        sel = self.record["oos_select"]
        for vi in range(len(self.oos)):
            oos, cr = self.oos[vi], self.cr[vi]
            if oos.count():  # cannot happen after a drain; never lose bits if it did
                cr.or_merge(oos)
                oos.clear_all()
            self.oos[vi], self.cr[vi] = cr, oos
            sel ^= 1 << vi
        return sel

    # -- counts ------------------------------------------------------------------------
    def oos_tracks(self) -> int:
        return sum(b.count() for b in self.oos)

    def cr_tracks(self) -> int:
        return sum(b.count() for b in self.cr)
