"""Pins: reads of C that stay at one committed CG while later CGs commit.

C at CG k resolves grain g to C's physical copy when g's copied bit is set in
the active area, else to B (firmware/flashcopy.py). A pin taken at CG k keeps
its own copy of that resolution (one bit per grain of each volume it covers:
1 reads C, 0 reads B) and the grains it had to keep in memory. A commit flips
only the live bitmaps, never a pin's, so it costs a pin nothing.

Whatever is about to destroy data a pin still reads captures it first
(``Pins.capture``, called by FlashCopy with the grains locked):

- B's overwrite of g, for a pin that reads g from B: when the copy-on-write
  of that same step copies B[g] to C (g's active bit is clear), the pin
  follows the data to C instead of keeping it (decided when the grain is
  unlocked: the copied bit set then means C[g] holds it, clear means the copy
  failed and B was not written); otherwise the pin keeps B[g] in memory;
- a copy-on-write overwriting C's physical g, for a pin that reads g from C:
  the pin keeps C[g] in memory.

A pin taken while a grain is locked decides that grain the same way, at its
unlock. Reads of a pin wait for the grains still to be decided; a read whose
grain changed source or was kept while it read (a capture lands before the
write it protects is issued) reads again, so a read never shows a
half-captured grain and never holds a lock the CG stream waits for.

Memory is bounded: the bytes kept by all pins (a grain kept by several pins
counts once) stay under ``max_bytes``. A capture that would pass it drops
that pin instead: its reads then raise PinLost, naming the pin and the
budget; the CG stream is never held or failed by a reader.

Pins live in memory only: a restart of the secondary drops them all (named
snapshots included).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bitarray import bitarray

from firmware.errors import FirmwareError
from hal.host import HostVolume

if TYPE_CHECKING:
    from firmware.flashcopy import FlashCopy

log = logging.getLogger(__name__)

DEFAULT_MAX_PINNED_BYTES = 256 << 20
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SNAPSHOT_SEP = "@"  # a snapshot of volume vol0 named x is exported as vol0@x
MAX_READ_PASSES = 16  # each pass that has to read again saw a grain move to a stable place


class PinLost(FirmwareError, OSError):
    """A read of a pin that was dropped (its budget, its snapshot deleted, its
    connection closed). An OSError with EIO so a host port answers EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SnapshotError(FirmwareError):
    """A bad, duplicate or unknown snapshot name."""


@dataclass(eq=False)
class Pin:
    """One committed CG of C, over a range of grains of some volumes."""

    id: int
    label: str
    seq: int  # the committed CG it reads
    bits: dict[int, tuple[int, bitarray]]  # volume -> (first grain, 1 = C / 0 = B per grain)
    pending: dict[int, set[int]]  # volume -> grains decided at their unlock
    kept: dict[tuple[int, int], bytes] = field(default_factory=dict)
    kept_bytes: int = 0
    lost: str | None = None  # why reads fail, once dropped

    @property
    def name(self) -> str:
        return f"pin #{self.id} ({self.label}, CG {self.seq})"

    def covers(self, vi: int, g: int) -> bool:
        span = self.bits.get(vi)
        return span is not None and span[0] <= g < span[0] + len(span[1])

    def reads_c(self, vi: int, g: int) -> bool:
        first, bits = self.bits[vi]
        return bool(bits[g - first])


class Pins:
    """Every pin of one FlashCopy, the bytes they keep, and the captures."""

    def __init__(self, fc: FlashCopy, max_bytes: int = DEFAULT_MAX_PINNED_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_pinned_bytes must be >= 0")
        self.fc = fc
        self.max_bytes = max_bytes
        self._pins: list[Pin] = []
        self._ids = itertools.count(1)
        self._held: dict[int, list] = {}  # id(bytes) -> [bytes, pins keeping it]
        self.held_bytes = 0
        self.dropped_over_budget = 0
        self._pending = 0  # grains still to decide, over all pins (settle's fast path)

    def __len__(self) -> int:
        return len(self._pins)

    def __iter__(self):
        return iter(list(self._pins))

    # -- taking and dropping ------------------------------------------------------------
    def take(self, label: str, grains: dict[int, range] | None = None) -> Pin:
        """Pin the committed CG now (no await: nothing changes under it).
        ``grains``: volume -> grain range to cover; default every grain of every volume."""
        fc = self.fc
        if grains is None:
            grains = {vi: range(fc.grain_count(vi)) for vi in range(len(fc.b))}
        bits = {vi: (r.start, fc.copied(vi).copy_bits(r.start, r.stop)) for vi, r in grains.items()}
        pending: dict[int, set[int]] = {vi: set() for vi in grains}
        for vi, g in fc.locked_grains():
            if vi in grains and g in grains[vi]:
                pending[vi].add(g)  # its holder may be past its capture: decided at its unlock
        pin = Pin(next(self._ids), label, fc.record["committed_seq"], bits, pending)
        self._pending += sum(len(s) for s in pending.values())
        self._pins.append(pin)
        return pin

    def drop(self, pin: Pin, why: str = "it was released") -> None:
        """Release what the pin keeps; its later reads raise PinLost(why)."""
        if pin.lost is None:
            pin.lost = f"{pin.name} was dropped: {why}"
        if pin in self._pins:
            self._pins.remove(pin)
        self._pending -= sum(len(s) for s in pin.pending.values())
        pin.pending = {vi: set() for vi in pin.pending}
        for data in pin.kept.values():
            held = self._held[id(data)]
            held[1] -= 1
            if not held[1]:
                del self._held[id(data)]
                self.held_bytes -= len(data)
        pin.kept.clear()
        pin.kept_bytes = 0

    # -- captures (FlashCopy calls these with the grains locked) ---------------------------
    async def capture(self, vi: int, grains: range, *, cow: bool) -> None:
        """B (and, when ``cow``, C's copy of every grain whose active bit is
        clear) is about to be overwritten on ``grains``: keep or redirect what
        each pin still reads there."""
        if not self._pins:
            return
        fc = self.fc
        copied = fc.copied(vi)
        for g in grains:
            copies = cow and not copied.test(g)  # this step copies B[g] over C[g]
            keep_b: list[Pin] = []
            keep_c: list[Pin] = []
            for pin in self._pins:
                if not pin.covers(vi, g) or (vi, g) in pin.kept or g in pin.pending[vi]:
                    continue
                if pin.reads_c(vi, g):
                    if copies:
                        keep_c.append(pin)
                elif copies:
                    pin.pending[vi].add(g)  # follows B[g] into C: decided at the unlock
                    self._pending += 1
                else:
                    keep_b.append(pin)
            for pins, dev in ((keep_b, fc.b[vi]), (keep_c, fc.c[vi])):
                if pins:
                    data = await self._read_grain(dev, vi, g)
                    for pin in pins:
                        self._keep(pin, vi, g, data)

    def settle(self, vi: int, g: int) -> None:
        """Grain (vi, g) was unlocked: decide it for every pin waiting on it."""
        if not self._pending:
            return
        bit = None
        for pin in self._pins:
            waiting = pin.pending.get(vi)
            if waiting and g in waiting:
                if bit is None:
                    bit = self.fc.copied(vi).test(g)
                first, bits = pin.bits[vi]
                bits[g - first] = bit
                waiting.discard(g)
                self._pending -= 1

    async def _read_grain(self, dev, vi: int, g: int) -> bytes:
        fc = self.fc
        bs = dev.info.block_size
        data = await dev.read(g * fc.grain_bytes // bs, fc.grain_len(vi, g) // bs)
        return data if type(data) is bytes else bytes(data)

    def _keep(self, pin: Pin, vi: int, g: int, data: bytes) -> None:
        if pin.lost is not None:
            return
        held = self._held.get(id(data))
        if held is None:
            if self.held_bytes + len(data) > self.max_bytes:
                self.dropped_over_budget += 1
                log.warning("%s dropped: keeping it would pass max_pinned_bytes (%d bytes)",
                            pin.name, self.max_bytes)
                self.drop(pin, f"keeping the grains it reads would pass max_pinned_bytes "
                               f"({self.max_bytes} bytes); open it again to read a newer CG")
                return
            held = self._held[id(data)] = [data, 0]
            self.held_bytes += len(data)
        held[1] += 1
        pin.kept[(vi, g)] = data
        pin.kept_bytes += len(data)

    # -- reads ----------------------------------------------------------------------------
    async def read(self, pin: Pin, vi: int, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of volume ``vi`` as of the pin's CG
        (aligned to the devices' blocks, inside the volume and the pin)."""
        fc = self.fc
        grains = fc.grains(vi, offset, length)
        if not (pin.covers(vi, grains.start) and pin.covers(vi, grains.stop - 1)):
            raise PinLost(f"{pin.name} does not cover bytes {offset}+{length} of volume {vi}")
        gb = fc.grain_bytes
        for _ in range(MAX_READ_PASSES):
            self._check(pin)
            await self._decided(pin, vi, grains)
            out = bytearray(length)
            read_from: list[tuple[int, bool | None]] = []  # (grain, read C?); None: not read this pass
            g = grains.start
            while g < grains.stop:
                if (vi, g) in pin.kept or g in pin.pending[vi]:
                    read_from.append((g, None))  # kept: filled below; pending (since a read below): again
                    g += 1
                    continue
                src = pin.reads_c(vi, g)
                h = g + 1
                while (h < grains.stop and (vi, h) not in pin.kept and h not in pin.pending[vi]
                       and pin.reads_c(vi, h) == src):
                    h += 1
                lo, hi = max(offset, g * gb), min(offset + length, h * gb)
                dev = fc.c[vi] if src else fc.b[vi]
                bs = dev.info.block_size
                out[lo - offset : hi - offset] = await dev.read(lo // bs, (hi - lo) // bs)
                read_from.extend((x, src) for x in range(g, h))
                g = h
            self._check(pin)
            again = False
            for g, src in read_from:
                data = pin.kept.get((vi, g))
                if data is not None:  # kept before (or while) we read: the kept copy is the pin's
                    lo, hi = max(offset, g * gb), min(offset + length, g * gb + len(data))
                    out[lo - offset : hi - offset] = data[lo - g * gb : hi - g * gb]
                elif src is None or g in pin.pending[vi] or pin.reads_c(vi, g) != src:
                    again = True  # it moved while we read: what we read may be newer than the pin
            if not again:
                return bytes(out)
        raise PinLost(f"{pin.name}: volume {vi} bytes {offset}+{length} kept changing "
                      f"under {MAX_READ_PASSES} reads")

    async def _decided(self, pin: Pin, vi: int, grains: range) -> None:
        waiting = pin.pending[vi]
        for g in grains:
            while g in waiting:
                fut = self.fc.lock_future(vi, g)
                if fut is None:  # nobody holds it (a capture outside a lock): decide now
                    self.settle(vi, g)
                    break
                await asyncio.shield(fut)

    @staticmethod
    def _check(pin: Pin) -> None:
        if pin.lost is not None:
            raise PinLost(pin.lost)

    def status(self) -> dict:
        return {"pins": len(self._pins), "pinned_bytes": self.held_bytes, "max_pinned_bytes": self.max_bytes,
                "pins_dropped_over_budget": self.dropped_over_budget}


class Snapshots:
    """Named pins of every volume at one CG, kept while replication runs (in
    memory: a restart of the secondary drops them)."""

    def __init__(self, pins: Pins) -> None:
        self.pins = pins
        self._named: dict[str, Pin] = {}

    def create(self, name: str) -> Pin:
        if not isinstance(name, str) or not SNAPSHOT_NAME.fullmatch(name):
            raise SnapshotError(f"bad snapshot name {name!r}: 1 to 64 of A-Z a-z 0-9 . _ -, "
                                f"starting with a letter or digit")
        if name in self._named:
            pin = self._named[name]
            raise SnapshotError(f"snapshot {name!r} exists (CG {pin.seq}); delete it first")
        pin = self._named[name] = self.pins.take(f"snapshot {name}")
        log.info("snapshot %s: CG %d pinned", name, pin.seq)
        return pin

    def delete(self, name: str) -> Pin:
        pin = self._named.pop(name, None)
        if pin is None:
            raise SnapshotError(f"no snapshot named {name!r}; snapshots: {', '.join(self._named) or 'none'}")
        self.pins.drop(pin, f"snapshot {name} was deleted")
        log.info("snapshot %s (CG %d) deleted", name, pin.seq)
        return pin

    def get(self, name: str) -> Pin | None:
        return self._named.get(name)

    def names(self) -> list[str]:
        return list(self._named)

    def entries(self) -> list[dict]:
        return [{"name": n, "cg": p.seq, "kept_bytes": p.kept_bytes, "lost": p.lost}
                for n, p in self._named.items()]


class PinnedVolume(HostVolume):
    """One volume of C as a pin reads it, exported read-only. ``own``: the
    view took the pin and drops it on close (one NBD connection), and says
    no to multi-conn (another connection has another pin, maybe another CG);
    else it reads a pin someone else keeps (a named snapshot: every
    connection reads the same CG)."""

    read_only = True

    def __init__(self, pins: Pins, pin: Pin, vi: int, name: str, size_bytes: int, block_size: int,
                 *, own: bool) -> None:
        self.pins = pins
        self.pin = pin
        self.vi = vi
        self.name = name
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.own = own

    async def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        return await self.pins.read(self.pin, self.vi, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        raise PermissionError(f"{self.name}: a point-in-time copy of C is exported read-only")

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise PermissionError(f"{self.name}: a point-in-time copy of C is exported read-only")

    async def trim(self, offset: int, length: int) -> None:
        raise PermissionError(f"{self.name}: a point-in-time copy of C is exported read-only")

    async def flush(self) -> None:
        return None

    def can_multi_conn(self) -> bool:
        return not self.own

    def close(self) -> None:
        if self.own:
            self.pins.drop(self.pin, "its connection closed")
