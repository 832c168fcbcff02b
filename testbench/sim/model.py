"""The reference model (cocotb's term): host writes as issued and
acknowledged, what A must hold, and what each CG's C must hold.

Every sector of every write differs (``sector_data``), so an image decodes
back to the write each sector shows. A CG's content is taken at its CR
switch (the primary's ``change cg phase:draining`` event): the last
acknowledged write of each sector, or any write that was not acknowledged
and was issued before the switch and after that write (in flight at the
switch, or failed: it may have landed). Writes issued after the switch never
belong to the CG.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from firmware.events import Event

SECTOR = 512
ZERO = bytes(SECTOR)


@lru_cache(maxsize=1 << 16)  # every check decodes every sector again: the same few thousand, over and over
def sector_data(wid: int, vi: int, sector: int) -> bytes:
    """What write ``wid`` puts in one sector (every sector of every write differs)."""
    head = f"w{wid:06d}v{vi}s{sector:05d}|".encode()
    return (head * (SECTOR // len(head) + 1))[:SECTOR]


def decode_sector(data: bytes, vi: int, sector: int) -> int | None:
    """The write id a sector shows (0: never written), None when it is no
    whole write's sector (torn or foreign)."""
    if data == ZERO:
        return 0
    try:
        wid = int(data[1:7])
    except ValueError:
        return None
    return wid if data == sector_data(wid, vi, sector) else None


def _shown(wid: int | None) -> str:
    return "a torn or foreign sector" if wid is None else f"write {wid}"


@dataclass
class CgContent:
    content: dict  # (vi, sector) -> last acked write id at the switch
    next_wid: int  # the first write id issued after the switch
    acks: int  # how many acks came before the switch (a write acked later was in flight at it)


class Model:
    """Host writes as issued and acknowledged, A's content as the host
    knows it, and that content at each CG's CR switch."""

    def __init__(self, names: list[str], sectors: int) -> None:
        self.names = names
        self.sectors = sectors
        self.content: dict[tuple[int, int], int] = {}  # (vi, sector) -> last acked write id
        self.issued: dict[tuple[int, int], list[int]] = {}  # every write id issued to a sector
        self.acked_at: dict[int, int] = {}  # write id -> its place in the order of acks
        self.cgs: dict[int, CgContent] = {}  # CG seq -> content at its CR switch
        self.next_wid = 1
        self.acked = 0
        self.unacked: list[int] = []

    def on_event(self, event: Event) -> None:
        if event.obj == "cg" and event.action == "change" and event.fields.get("phase") == "draining" \
                and "acks" not in event.fields:  # a session member's run repeats the phase; the switch was before
            self.cgs[event.fields["seq"]] = CgContent(dict(self.content), self.next_wid, self.acked)

    def issue(self, vi: int, sector: int, count: int, wid: int | None = None) -> tuple[int, bytes]:
        """Record a write as issued; returns its id and data."""
        if wid is None:
            wid = self.next_wid
        self.next_wid = max(self.next_wid, wid + 1)
        for s in range(sector, sector + count):
            self.issued.setdefault((vi, s), []).append(wid)
        return wid, b"".join(sector_data(wid, vi, s) for s in range(sector, sector + count))

    def ack(self, wid: int, vi: int, sector: int, count: int) -> None:
        for s in range(sector, sector + count):
            if self.content.get((vi, s), 0) < wid:  # an older write acked late does not undo a newer one
                self.content[(vi, s)] = wid
        self.acked += 1
        self.acked_at[wid] = self.acked

    async def write(self, primary, vi: int, sector: int, count: int) -> None:
        wid, data = self.issue(vi, sector, count)
        try:
            await primary.write(self.names[vi], sector * SECTOR, data)
        except BaseException:
            self.unacked.append(wid)
            raise
        self.ack(wid, vi, sector, count)

    # -- what an image may show ---------------------------------------------------------
    def may_show(self, vi: int, s: int, want: int, cg: CgContent | None = None) -> set[int]:
        """``want`` or a write issued after it that was not acknowledged (at
        CG ``cg``'s switch: issued before it, acknowledged after it or never)."""
        never = self.acked + 1  # never acknowledged: after every switch
        if cg is None:
            later = {w for w in self.issued.get((vi, s), []) if w > want and w not in self.acked_at}
        else:
            later = {w for w in self.issued.get((vi, s), []) if want < w < cg.next_wid
                     and self.acked_at.get(w, never) > cg.acks}
        return {want} | later

    def lost_from(self, image: list[bytes]) -> list[str]:
        """On A's image (one bytes per volume): sectors that show neither
        their last acked write nor a write issued after it."""
        bad = []
        for vi, data in enumerate(image):
            for s in range(self.sectors):
                shown = decode_sector(data[s * SECTOR : (s + 1) * SECTOR], vi, s)
                want = self.content.get((vi, s), 0)
                later = [w for w in self.issued.get((vi, s), []) if w > want]
                if shown != want and shown not in later:
                    bad.append(f"{self.names[vi]} sector {s}: shows {_shown(shown)}, acked write {want}")
        return bad

    def differs(self, image: list[bytes], content: dict | CgContent) -> list[str]:
        """Sectors where an image of C is not the CG: exactly ``content`` (a
        dict), or a CgContent with the writes in flight at its switch."""
        bad = []
        for vi, data in enumerate(image):
            for s in range(self.sectors):
                shown = decode_sector(data[s * SECTOR : (s + 1) * SECTOR], vi, s)
                if isinstance(content, CgContent):
                    want = content.content.get((vi, s), 0)
                    ok = shown == want or shown in self.may_show(vi, s, want, content)
                else:
                    want = content.get((vi, s), 0)
                    ok = shown == want
                if not ok:
                    bad.append(f"{self.names[vi]} sector {s}: shows {_shown(shown)}, the CG holds write {want}")
        return bad

    def stale_tracks(self, image: list[bytes], track_sectors: int) -> set[tuple[int, int]]:
        """Tracks where ``image`` (B: what the next commit makes C) shows
        neither the acked write of a sector nor a write issued after it."""
        out = set()
        for vi, data in enumerate(image):
            for s in range(self.sectors):
                shown = decode_sector(data[s * SECTOR : (s + 1) * SECTOR], vi, s)
                want = self.content.get((vi, s), 0)
                if shown != want and shown not in self.may_show(vi, s, want):
                    out.add((vi, s // track_sectors))
        return out
