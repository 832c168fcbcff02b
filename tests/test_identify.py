"""ATA IDENTIFY DEVICE and NVMe Identify Controller/Namespace: byte fixtures
built here by hand from the specifications' offsets (struct.pack_into, not
the construct declarations), parsed by drivers.identify, and every structure
round-tripped build -> parse -> build."""

from __future__ import annotations

import struct

import pytest

from drivers import identify
from drivers.identify import AtaIdentify, NvmeIdCtrl, NvmeIdNs


# -- ATA ---------------------------------------------------------------------------
def ata_words_from_text(text: str, words: int) -> bytes:
    """ATA string encoding per ACS: character 2k in bits 15:8 of word k,
    character 2k+1 in bits 7:0, the word stored little-endian."""
    text = text.ljust(2 * words)
    out = b""
    for k in range(words):
        out += struct.pack("<H", (ord(text[2 * k]) << 8) | ord(text[2 * k + 1]))
    return out


def ata_fixture() -> bytes:
    raw = bytearray(512)
    struct.pack_into("<H", raw, 0 * 2, 0x0040)
    raw[10 * 2 : 20 * 2] = ata_words_from_text("WD-WCC4N1234567", 10)
    raw[23 * 2 : 27 * 2] = ata_words_from_text("01.01A01", 4)
    raw[27 * 2 : 47 * 2] = ata_words_from_text("WDC WD10EZEX-08WN4A0", 20)
    struct.pack_into("<H", raw, 49 * 2, 1 << 9)
    struct.pack_into("<I", raw, 60 * 2, 0x0FFFFFFF)  # LBA28 saturates on big disks
    struct.pack_into("<H", raw, 82 * 2, 1 << 5)  # write cache supported
    struct.pack_into("<H", raw, 83 * 2, (1 << 10) | (1 << 13))  # LBA48, FLUSH CACHE EXT
    struct.pack_into("<H", raw, 85 * 2, 1 << 5)  # write cache enabled
    struct.pack_into("<Q", raw, 100 * 2, 1953525168)  # 1 TB
    struct.pack_into("<H", raw, 106 * 2, 0x4000 | (1 << 13) | 3)  # 8 logical per physical
    struct.pack_into("<H", raw, 169 * 2, 1)  # TRIM
    struct.pack_into("<H", raw, 217 * 2, 7200)
    return bytes(raw)


def test_ata_string_encoding_is_byte_swapped_by_hand():
    # "WDC " is stored as the bytes 'D' 'W' ' ' 'C'
    assert ata_words_from_text("WDC ", 2) == b"DW C"
    assert ata_fixture()[54:58] == b"DW C"


def test_ata_fixture_parses_to_known_values():
    ident = identify.ata_identity(ata_fixture())
    assert ident.model == "WDC WD10EZEX-08WN4A0"
    assert ident.serial == "WD-WCC4N1234567"
    assert ident.firmware == "01.01A01"
    assert ident.num_blocks == 1953525168
    assert ident.logical_block_size == 512 and ident.physical_block_size == 4096
    assert ident.write_cache_supported and ident.write_cache_enabled
    assert ident.lba48 and ident.flush_cache_ext and ident.trim
    assert ident.rotational is True


def test_ata_ssd_with_4k_logical_sectors_and_no_cache():
    raw = bytearray(ata_fixture())
    struct.pack_into("<H", raw, 85 * 2, 0)  # cache disabled
    struct.pack_into("<H", raw, 106 * 2, 0x4000 | (1 << 12))  # logical size in words 117-118
    struct.pack_into("<I", raw, 117 * 2, 2048)  # 2048 words = 4096 bytes
    struct.pack_into("<H", raw, 217 * 2, 1)  # non-rotating
    struct.pack_into("<H", raw, 83 * 2, 0)  # no LBA48: capacity from words 60-61
    struct.pack_into("<I", raw, 60 * 2, 123456)
    ident = identify.ata_identity(bytes(raw))
    assert ident.logical_block_size == ident.physical_block_size == 4096
    assert not ident.write_cache_enabled and ident.write_cache_supported
    assert ident.rotational is False and ident.num_blocks == 123456


def test_ata_word_106_invalid_means_512():
    raw = bytearray(ata_fixture())
    struct.pack_into("<H", raw, 106 * 2, 0xFFFF)  # bit 15 set: word not valid
    assert identify.ata_identity(bytes(raw)).physical_block_size == 512


def test_ata_round_trip_build_parse_build():
    raw = ata_fixture()
    parsed = AtaIdentify.parse(raw)
    assert AtaIdentify.build(parsed) == raw
    built = AtaIdentify.build({"model": "Samsung SSD 870 EVO 1TB", "serial": "S6PTNZ0R123456X",
                               "firmware": "SVT02B6Q", "lba48_sectors": 42})
    back = AtaIdentify.parse(built)
    assert (back.model, back.serial, back.firmware, back.lba48_sectors) == (
        "Samsung SSD 870 EVO 1TB", "S6PTNZ0R123456X", "SVT02B6Q", 42)
    assert built[54:62] == ata_words_from_text("Samsung ", 4)


def test_ata_checksum():
    raw = identify.with_ata_checksum(ata_fixture())
    assert raw[510] == 0xA5 and sum(raw) % 256 == 0
    assert identify.ata_checksum_ok(raw)
    bad = bytearray(raw)
    bad[100] ^= 1
    assert not identify.ata_checksum_ok(bytes(bad))


def test_ata_rejects_wrong_length_and_long_strings():
    with pytest.raises(ValueError, match="512"):
        identify.ata_identity(bytes(256))
    with pytest.raises(Exception, match="longer than 8"):
        AtaIdentify.build({"firmware": "123456789"})


def test_ata_pass_through_cdb_for_identify_and_flush():
    assert identify.ata_pass_through_16(0xEC, data_in=True, extend=False, sector_count=1) == bytes(
        [0x85, 0x08, 0x0E, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xEC, 0])
    flush = identify.ata_pass_through_16(0xEA, data_in=False, extend=True)
    assert flush[0] == 0x85 and flush[1] == 0x07 and flush[2] == 0 and flush[14] == 0xEA


# -- NVMe --------------------------------------------------------------------------
def nvme_ctrl_fixture(vwc: int = 1) -> bytes:
    raw = bytearray(4096)
    struct.pack_into("<HH", raw, 0, 0x144D, 0x144D)
    raw[4:24] = b"S4EWNX0N123456".ljust(20)
    raw[24:64] = b"Samsung SSD 970 EVO Plus 1TB".ljust(40)
    raw[64:72] = b"2B2QEXM7"
    raw[77] = 9  # mdts
    struct.pack_into("<I", raw, 80, 0x00010300)  # NVMe 1.3
    struct.pack_into("<QQ", raw, 280, 1000204886016, 0)  # tnvmcap
    struct.pack_into("<I", raw, 516, 1)  # nn
    struct.pack_into("<H", raw, 520, (1 << 2) | (1 << 3))  # oncs: DSM, write zeroes
    raw[525] = vwc
    raw[768 : 768 + 28] = b"nqn.2014.08.org.nvmexpress:x"
    return bytes(raw)


def nvme_ns_fixture(flbas: int = 0) -> bytes:
    raw = bytearray(4096)
    struct.pack_into("<QQQ", raw, 0, 1953525168, 1953525168, 1000)
    raw[25] = 1  # two formats (0-based)
    raw[26] = flbas
    struct.pack_into("<HBB", raw, 128, 0, 9, 2)  # lbaf[0]: 512 bytes
    struct.pack_into("<HBB", raw, 132, 8, 12, 0)  # lbaf[1]: 4096 bytes + 8 metadata
    return bytes(raw)


def test_nvme_fixture_parses_to_known_values():
    ident = identify.nvme_identity(nvme_ctrl_fixture(), nvme_ns_fixture())
    assert ident.model == "Samsung SSD 970 EVO Plus 1TB"
    assert ident.serial == "S4EWNX0N123456"
    assert ident.firmware == "2B2QEXM7"
    assert ident.vendor_id == 0x144D
    assert ident.volatile_write_cache and ident.deallocate and ident.write_zeroes
    assert ident.num_blocks == 1953525168 and ident.block_size == 512
    assert [f["block_size"] for f in ident.formats] == [512, 4096]
    assert ident.formats[1]["metadata_bytes"] == 8


def test_nvme_format_in_use_follows_flbas():
    ident = identify.nvme_identity(nvme_ctrl_fixture(vwc=0), nvme_ns_fixture(flbas=1))
    assert ident.block_size == 4096 and ident.metadata_bytes == 8
    assert not ident.volatile_write_cache


def test_nvme_fields_sit_at_the_spec_offsets():
    c = NvmeIdCtrl.parse(nvme_ctrl_fixture())
    assert (c.mdts, c.ver, c.nn, c.vwc, c.tnvmcap) == (9, 0x00010300, 1, 1, 1000204886016)
    assert c.subnqn == "nqn.2014.08.org.nvmexpress:x"
    n = NvmeIdNs.parse(nvme_ns_fixture())
    assert (n.nsze, n.ncap, n.nuse, n.nlbaf) == (1953525168, 1953525168, 1000, 1)
    assert (n.lbaf[0].lbads, n.lbaf[0].rp, n.lbaf[1].ms) == (9, 2, 8)


def test_nvme_round_trip_build_parse_build():
    for decl, raw in ((NvmeIdCtrl, nvme_ctrl_fixture()), (NvmeIdNs, nvme_ns_fixture(1))):
        assert decl.sizeof() == 4096
        assert decl.build(decl.parse(raw)) == raw
    built = NvmeIdCtrl.build({"mn": "QEMU NVMe Ctrl", "sn": "deadbeef", "fr": "8.0.0", "vwc": 1})
    assert built[24:38] == b"QEMU NVMe Ctrl" and built[38:64] == b" " * 26
    assert built[525] == 1 and built[4:12] == b"deadbeef"
    ns = NvmeIdNs.build({"nsze": 2048, "nlbaf": 0, "lbaf": [{"lbads": 12}] + [{}] * 63})
    assert struct.unpack_from("<Q", ns, 0)[0] == 2048 and ns[130] == 12


def test_nvme_rejects_wrong_length():
    with pytest.raises(ValueError, match="4096"):
        identify.nvme_identity(bytes(512), None)
