"""Payload stamps: every block the replayer writes says which write put it there.

Each block (the volume's block size, 512 bytes or more) starts with a header
declared once below, followed by a filler derived from (write id, lba) so
two writes never leave the same bytes. The CRC32C covers the whole block
with the checksum field taken as zero, so a torn or corrupted block is told
apart from an unstamped one:

- ``decode`` returns ``None`` for an unstamped block (all zeros, or no magic),
- raises ``StampError`` for a block with the magic but a wrong checksum or layout,
- and returns a ``Stamp`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import crc32c
from construct import Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from testbench.errors import TestbenchError

MAGIC = b"MFWS"
VERSION = 1

StampHeader = Struct(
    "magic" / Const(MAGIC),
    "version" / Int8ub,
    "reserved" / Const(b"\x00"),
    "volume_id" / Int16ub,
    "lba" / Int64ub,  # where this block belongs, in volume blocks
    "write_id" / Int64ub,  # unique per write, increasing in issue order
    "nblocks" / Int32ub,  # blocks in that write
    "index" / Int32ub,  # this block's place in the write (lba - first lba)
    "checksum" / Int32ub,  # CRC32C of the whole block with this field zero
)
HEADER_BYTES = StampHeader.sizeof()  # 36
_CHECKSUM_AT = HEADER_BYTES - 4
_BUILD = StampHeader.compile()  # compiled: the same declaration, ~5x faster
_Filler = Struct("write_id" / Int64ub, "lba" / Int64ub)
_ZERO4 = bytes(4)


class StampError(TestbenchError):
    """A block that carries the stamp magic but is not a valid stamp (torn or corrupt)."""


@dataclass(frozen=True, slots=True)
class Stamp:
    volume_id: int
    lba: int
    write_id: int
    nblocks: int
    index: int


def _block(write_id: int, volume_id: int, lba: int, nblocks: int, index: int, block_size: int) -> bytes:
    head = _BUILD.build(dict(version=VERSION, volume_id=volume_id, lba=lba, write_id=write_id,
                             nblocks=nblocks, index=index, checksum=0))
    pattern = _Filler.build(dict(write_id=write_id, lba=lba))
    fill_len = block_size - HEADER_BYTES
    filler = (pattern * (fill_len // len(pattern) + 1))[:fill_len]
    crc = crc32c.crc32c(head[:_CHECKSUM_AT] + _ZERO4 + filler)
    return head[:_CHECKSUM_AT] + crc.to_bytes(4, "big") + filler


def encode(write_id: int, volume_id: int, lba: int, nblocks: int, block_size: int = 512) -> bytes:
    """The payload of a write of ``nblocks`` blocks starting at ``lba``."""
    if block_size < 64 or block_size % 64:
        raise ValueError(f"block_size {block_size} too small for a stamp")
    if nblocks < 1:
        raise ValueError("a stamped write has at least one block")
    return b"".join(_block(write_id, volume_id, lba + i, nblocks, i, block_size) for i in range(nblocks))


def decode(block: bytes | memoryview) -> Stamp | None:
    """What one block says about itself (see the module docstring)."""
    block = bytes(block)
    if block[:4] != MAGIC:
        return None
    if len(block) < HEADER_BYTES + 16:
        raise StampError(f"stamped block of {len(block)} bytes is too short")
    want = int.from_bytes(block[_CHECKSUM_AT:HEADER_BYTES], "big")
    got = crc32c.crc32c(block[:_CHECKSUM_AT] + _ZERO4 + block[HEADER_BYTES:])
    if want != got:
        raise StampError(f"stamp checksum {want:#010x} != {got:#010x} (torn or corrupt block)")
    h = _BUILD.parse(block[:HEADER_BYTES])
    if h.version != VERSION or h.index >= h.nblocks:
        raise StampError(f"stamp version {h.version} / index {h.index} of {h.nblocks} not valid")
    return Stamp(h.volume_id, h.lba, h.write_id, h.nblocks, h.index)


def is_zero(block: bytes | memoryview) -> bool:
    return not any(block)
