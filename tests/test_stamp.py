"""Stamps: round trip, a hand-made fixture from the declaration, and rejection of torn blocks."""

from __future__ import annotations

import struct

import crc32c
import pytest

from testbench import stamp


def test_round_trip_every_block_of_a_write():
    data = stamp.encode(write_id=77, volume_id=3, lba=1000, nblocks=4, block_size=512)
    assert len(data) == 4 * 512
    for i in range(4):
        s = stamp.decode(data[i * 512:(i + 1) * 512])
        assert s == stamp.Stamp(volume_id=3, lba=1000 + i, write_id=77, nblocks=4, index=i)


@pytest.mark.parametrize("bs", [512, 4096])
def test_round_trip_block_sizes_and_large_ids(bs):
    data = stamp.encode(2**63 + 5, 65535, 2**40, 1, bs)
    assert stamp.decode(data) == stamp.Stamp(65535, 2**40, 2**63 + 5, 1, 0)


def test_hand_made_fixture_matches_the_declaration():
    # Built by hand from the documented layout, not by the module's own builder.
    head = b"MFWS" + bytes([1, 0]) + struct.pack(">HQQII", 2, 9, 42, 1, 0)
    filler = (struct.pack(">QQ", 42, 9) * 40)[: 512 - 36]
    crc = crc32c.crc32c(head + bytes(4) + filler)
    block = head + struct.pack(">I", crc) + filler
    assert stamp.decode(block) == stamp.Stamp(2, 9, 42, 1, 0)
    assert stamp.encode(42, 2, 9, 1) == block


def test_zero_and_foreign_blocks_are_unstamped():
    assert stamp.decode(bytes(512)) is None
    assert stamp.decode(b"hello" * 100 + bytes(12)) is None


def test_torn_block_is_an_error_not_a_stamp():
    a = stamp.encode(1, 0, 5, 1)
    b = stamp.encode(2, 0, 5, 1)
    torn = a[:256] + b[256:]
    with pytest.raises(stamp.StampError, match="checksum"):
        stamp.decode(torn)


def test_writes_never_share_payload():
    assert stamp.encode(1, 0, 0, 1)[36:] != stamp.encode(2, 0, 0, 1)[36:]
