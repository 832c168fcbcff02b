"""Records rewritten in place in NVRAM (the region header, the CG record,
the secondary's FlashCopy record): two sealed copies, written in turn, so a
write torn by a power cut leaves the other copy whole (firmware/layout.py
places them)."""

from __future__ import annotations

import struct

import crc32c
from construct import Bytes, Int32ul, Int64ul, Struct, this

from firmware.errors import NvramError

COPY_BYTES = 4096  # one page per copy (layout.PAGE)

# What a copy of a rewritten-in-place record looks like: the CRC covers gen,
# length and body.
Sealed = Struct(
    "gen" / Int64ul,
    "length" / Int32ul,
    "body" / Bytes(this.length),
    "crc" / Int32ul,
)


class DoubleRecord:
    """A record kept as two sealed copies at ``offset`` and ``offset + copy_bytes``."""

    def __init__(self, view: memoryview, persist, offset: int, body, copy_bytes: int = COPY_BYTES) -> None:
        self.view, self.persist, self.offset, self.body, self.copy_bytes = view, persist, offset, body, copy_bytes
        self.gen = 0
        self._last = -1  # copy index written last

    def read(self) -> dict | None:
        """The newest valid copy's fields (with ``gen``), or None if neither is valid."""
        best = None
        for i in (0, 1):
            raw = bytes(self.view[self.offset + i * self.copy_bytes : self.offset + (i + 1) * self.copy_bytes])
            parsed = parse_sealed(raw)
            if parsed is None:
                continue
            gen, body = parsed
            if best is None or gen > best[0]:
                best = (gen, body, i)
        if best is None:
            return None
        self.gen, self._last = best[0], best[2]
        try:
            value = dict(self.body.parse(best[1]))
        except Exception as e:  # CRC matched but the body does not parse: a different layout
            raise NvramError(f"NVRAM record at {self.offset} does not parse: {e}") from None
        value.pop("_io", None)
        return value

    def write(self, value: dict) -> None:
        body = self.body.build(value)
        self.gen += 1
        raw = build_sealed(self.gen, body)
        if len(raw) > self.copy_bytes:
            raise NvramError(f"record of {len(raw)} bytes does not fit {self.copy_bytes}")
        index = 1 - self._last if self._last >= 0 else 0
        at = self.offset + index * self.copy_bytes
        self.view[at : at + len(raw)] = raw
        self.persist(at, len(raw))
        self._last = index


def build_sealed(gen: int, body: bytes) -> bytes:
    head = Sealed.build({"gen": gen, "length": len(body), "body": body, "crc": 0})[:-4]
    return head + crc32c.crc32c(head).to_bytes(4, "little")


def parse_sealed(raw: bytes) -> tuple[int, bytes] | None:
    if len(raw) < 16:
        return None
    gen, length = struct.unpack_from("<QI", raw, 0)
    if gen == 0 or 12 + length + 4 > len(raw):
        return None
    end = 12 + length
    if crc32c.crc32c(raw[:end]) != int.from_bytes(raw[end : end + 4], "little"):
        return None
    return gen, bytes(raw[12:end])
