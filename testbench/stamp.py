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

import struct
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


# The hot path packs with ``struct``; this format is checked against the
# construct declaration at import, so the declaration stays the one truth.
_FAST = struct.Struct(">4sBBHQQIII")
_FILL = struct.Struct(">QQ")
_CRC = struct.Struct(">I")
_probe = dict(version=VERSION, volume_id=0x0102, lba=0x030405, write_id=0x060708, nblocks=9, index=3, checksum=0xA0B0C0D0)
assert _FAST.pack(MAGIC, VERSION, 0, 0x0102, 0x030405, 0x060708, 9, 3, 0xA0B0C0D0) == StampHeader.build(_probe)
assert _FILL.pack(1, 2) == _Filler.build(dict(write_id=1, lba=2))
del _probe


def encode(write_id: int, volume_id: int, lba: int, nblocks: int, block_size: int = 512) -> bytes:
    """The payload of a write of ``nblocks`` blocks starting at ``lba``."""
    if block_size < 64 or block_size % 64:
        raise ValueError(f"block_size {block_size} too small for a stamp")
    if nblocks < 1:
        raise ValueError("a stamped write has at least one block")
    out = bytearray(nblocks * block_size)
    view = memoryview(out)
    fill_len = block_size - HEADER_BYTES
    reps = fill_len // _FILL.size + 1
    for i in range(nblocks):
        base = i * block_size
        _FAST.pack_into(out, base, MAGIC, VERSION, 0, volume_id, lba + i, write_id, nblocks, i, 0)
        out[base + HEADER_BYTES:base + block_size] = (_FILL.pack(write_id, lba + i) * reps)[:fill_len]
        _CRC.pack_into(out, base + _CHECKSUM_AT, crc32c.crc32c(view[base:base + block_size]))  # field still zero
    return bytes(out)


def decode(block: bytes | memoryview) -> Stamp | None:
    """What one block says about itself (see the module docstring)."""
    if bytes(block[:4]) != MAGIC:
        return None
    if len(block) < HEADER_BYTES + 16:
        raise StampError(f"stamped block of {len(block)} bytes is too short")
    magic, version, reserved, volume_id, lba, write_id, nblocks, index, want = _FAST.unpack_from(block, 0)
    scratch = bytearray(block)
    scratch[_CHECKSUM_AT:HEADER_BYTES] = _ZERO4
    got = crc32c.crc32c(scratch)
    if want != got:
        raise StampError(f"stamp checksum {want:#010x} != {got:#010x} (torn or corrupt block)")
    if version != VERSION or reserved != 0 or index >= nblocks:
        raise StampError(f"stamp version {version} / index {index} of {nblocks} not valid")
    return Stamp(volume_id, lba, write_id, nblocks, index)


def is_zero(block: bytes | memoryview) -> bool:
    return not any(block)
