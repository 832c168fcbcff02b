"""TrackBitmap: one bit per track (the bitmap granule), over bitarray.

A bitmap may own its bits or live in a memoryview into the NVRAM region, so
OOS, CR and FlashCopy bitmaps survive a crash of the process. Searching is
done by bitarray in C (``find``), never bit by bit in Python: a 16 TiB volume
with 64 KiB tracks has 256 Mi bits. The set-bit count is kept incrementally
because counting 32 MiB of bits costs ~20 ms.
"""

from __future__ import annotations

from collections.abc import Callable

from bitarray import bitarray


class TrackBitmap:
    def __init__(self, tracks: int, buffer: memoryview | None = None,
                 persist: Callable[[int, int], None] | None = None, *, count: int | None = None) -> None:
        """``buffer`` (optional) must hold at least ceil(tracks/8) bytes; bits
        past ``tracks`` must be zero. ``persist(byte_offset, length)`` is
        called after each change, with offsets relative to the buffer."""
        if tracks < 0:
            raise ValueError("tracks must be >= 0")
        self.tracks = tracks
        if buffer is None:
            self._bits = bitarray(tracks, endian="little")
            self._bits.setall(0)
        else:
            if buffer.nbytes * 8 < tracks:
                raise ValueError(f"buffer of {buffer.nbytes} bytes is too small for {tracks} bits")
            self._bits = bitarray(buffer=buffer, endian="little")
        self._persist = persist
        self._count = self._bits.count(1, 0, tracks) if count is None else count

    # -- single bits ---------------------------------------------------------
    def test(self, track: int) -> bool:
        return bool(self._bits[track])

    __contains__ = test

    def set(self, track: int) -> bool:
        """Set one bit; True if it was clear."""
        if not 0 <= track < self.tracks:
            raise IndexError(f"track {track} outside 0..{self.tracks}")
        if self._bits[track]:
            return False
        self._bits[track] = 1
        self._count += 1
        if self._persist is not None:
            self._persist(track >> 3, 1)
        return True

    def clear(self, track: int) -> bool:
        """Clear one bit; True if it was set."""
        if not 0 <= track < self.tracks:
            raise IndexError(f"track {track} outside 0..{self.tracks}")
        if not self._bits[track]:
            return False
        self._bits[track] = 0
        self._count -= 1
        if self._persist is not None:
            self._persist(track >> 3, 1)
        return True

    # -- ranges and whole-bitmap operations ------------------------------------
    def set_range(self, start: int, end: int) -> int:
        """Set bits [start, end); returns how many were newly set."""
        start, end = max(0, start), min(end, self.tracks)
        if start >= end:
            return 0
        before = self._bits.count(1, start, end)
        self._bits[start:end] = 1
        self._count += (end - start) - before
        self._persist_bits(start, end)
        return (end - start) - before

    def clear_all(self) -> None:
        if self._count:
            self._bits.setall(0)
            self._count = 0
            self._persist_bits(0, self.tracks)

    def or_merge(self, other: TrackBitmap) -> None:
        """self |= other (both the same size)."""
        if other.tracks != self.tracks:
            raise ValueError("or_merge of bitmaps of different sizes")
        if not other._count:
            return
        if len(self._bits) == len(other._bits):
            self._bits |= other._bits
        else:  # different backing lengths (padding): merge over the common track range
            n = self.tracks
            self._bits[:n] |= other._bits[:n]
        self._count = self._bits.count(1, 0, self.tracks)
        self._persist_bits(0, self.tracks)

    def count(self) -> int:
        return self._count

    def recount(self) -> int:
        """Count from the bits themselves (slow on big bitmaps; tests and recovery)."""
        self._count = self._bits.count(1, 0, self.tracks)
        return self._count

    def next_set(self, start: int = 0, end: int | None = None) -> int:
        """Index of the first set bit in [start, end), or -1."""
        end = self.tracks if end is None else min(end, self.tracks)
        if start >= end or not self._count:
            return -1
        return self._bits.find(1, max(0, start), end)

    def runs(self, start: int = 0, end: int | None = None, limit: int = 64) -> list[list[int]]:
        """Up to ``limit`` runs [first, past_last) of set bits within [start, end)."""
        end = self.tracks if end is None else min(end, self.tracks)
        out: list[list[int]] = []
        pos = max(0, start)
        while len(out) < limit and pos < end:
            first = self.next_set(pos, end)
            if first < 0:
                break
            past = self._bits.find(0, first, end)
            past = end if past < 0 else past
            out.append([first, past])
            pos = past
        return out

    def count_range(self, start: int, end: int) -> int:
        return self._bits.count(1, max(0, start), min(end, self.tracks))

    def copy_bits(self, start: int = 0, end: int | None = None) -> bitarray:
        """A copy of bits [start, end), detached from this bitmap (and from NVRAM)."""
        end = self.tracks if end is None else min(end, self.tracks)
        return self._bits[max(0, start) : end]

    def set_tracks(self) -> list[int]:
        """Every set track (tests and small bitmaps)."""
        return list(self._bits.search(1, 0, self.tracks)) if self._count else []

    def _persist_bits(self, start: int, end: int) -> None:
        if self._persist is not None:
            self._persist(start >> 3, ((end + 7) >> 3) - (start >> 3))

    def __repr__(self) -> str:
        return f"<TrackBitmap {self._count}/{self.tracks} set>"
