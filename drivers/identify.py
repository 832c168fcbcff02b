"""The identify data structures, declared once with construct: ATA IDENTIFY
DEVICE (512 bytes, ACS-3), NVMe Identify Controller and Identify Namespace
(4096 bytes each, NVMe base spec / linux include/linux/nvme.h). Parsing and
building use the same declarations; ``ata_identity`` / ``nvme_identity``
turn a parsed structure into the few facts the HAL reports.

Offsets are noted beside each field (bytes; ATA also in words) so a reader
can check them against the specification.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import (
    Adapter,
    Array,
    Bytes,
    BytesInteger,
    Default,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PaddedString,
    Padding,
    Struct,
)

ATA_IDENTIFY_BYTES = 512
NVME_IDENTIFY_BYTES = 4096


class SpacePaddedString(Adapter):
    """ASCII text padded with spaces (NVMe sn/mn/fr, SCSI INQUIRY)."""

    def __init__(self, length: int) -> None:
        super().__init__(Bytes(length))
        self.length = length

    def _decode(self, obj: bytes, context, path) -> str:
        return obj.decode("ascii", "replace").rstrip(" \x00")

    def _encode(self, obj: str, context, path) -> bytes:
        raw = obj.encode("ascii")
        if len(raw) > self.length:
            raise ValueError(f"{obj!r} is longer than {self.length} bytes")
        return raw.ljust(self.length, b" ")


def swap_byte_pairs(raw: bytes) -> bytes:
    out = bytearray(raw)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


class AtaString(SpacePaddedString):
    """ATA strings: two characters per 16-bit little-endian word, the first
    character in the high byte, so on the wire each byte pair is swapped."""

    def __init__(self, words: int) -> None:
        super().__init__(2 * words)

    def _decode(self, obj: bytes, context, path) -> str:
        return super()._decode(swap_byte_pairs(obj), context, path)

    def _encode(self, obj: str, context, path) -> bytes:
        return swap_byte_pairs(super()._encode(obj, context, path))


def _w(n: int):
    return Default(Int16ul, 0)


# -- ATA IDENTIFY DEVICE (ACS-3 section 7.12.7) -------------------------------
AtaIdentify = Struct(
    "general_config" / Default(Int16ul, 0x0040),     # word 0 (byte 0)
    Padding(18),                                      # words 1-9
    "serial" / Default(AtaString(10), ""),            # words 10-19 (byte 20)
    Padding(6),                                       # words 20-22
    "firmware" / Default(AtaString(4), ""),           # words 23-26 (byte 46)
    "model" / Default(AtaString(20), ""),             # words 27-46 (byte 54)
    Padding(4),                                       # words 47-48
    "capabilities" / Default(Int16ul, 0x0200),        # word 49 (byte 98): bit 9 LBA
    Padding(20),                                      # words 50-59
    "lba28_sectors" / Default(Int32ul, 0),            # words 60-61 (byte 120)
    Padding(40),                                      # words 62-81
    "cmd_set_supported_82" / _w(82),                  # word 82 (byte 164): bit 5 write cache
    "cmd_set_supported_83" / _w(83),                  # word 83 (byte 166): bit 10 LBA48, bit 13 FLUSH CACHE EXT
    "cmd_set_supported_84" / _w(84),                  # word 84
    "cmd_set_enabled_85" / _w(85),                    # word 85 (byte 170): bit 5 write cache enabled
    "cmd_set_enabled_86" / _w(86),                    # word 86 (byte 172)
    "cmd_set_default_87" / _w(87),                    # word 87
    Padding(24),                                      # words 88-99
    "lba48_sectors" / Default(Int64ul, 0),            # words 100-103 (byte 200)
    Padding(4),                                       # words 104-105
    "sector_size_info" / _w(106),                     # word 106 (byte 212)
    Padding(20),                                      # words 107-116
    "logical_sector_words" / Default(Int32ul, 0),     # words 117-118 (byte 234)
    Padding(100),                                     # words 119-168
    "data_set_management" / _w(169),                  # word 169 (byte 338): bit 0 TRIM
    Padding(94),                                      # words 170-216
    "rotation_rate" / _w(217),                        # word 217 (byte 434): 1 = non-rotating
    Padding(74),                                      # words 218-254
    "integrity" / _w(255),                            # word 255 (byte 510): A5h + checksum
)


@dataclass
class AtaIdentity:
    model: str
    serial: str
    firmware: str
    num_blocks: int
    logical_block_size: int
    physical_block_size: int
    write_cache_supported: bool
    write_cache_enabled: bool
    lba48: bool
    flush_cache_ext: bool
    trim: bool
    rotational: bool | None  # None: the device does not say


def ata_identity(raw: bytes) -> AtaIdentity:
    if len(raw) != ATA_IDENTIFY_BYTES:
        raise ValueError(f"ATA IDENTIFY data is {len(raw)} bytes, expected {ATA_IDENTIFY_BYTES}")
    d = AtaIdentify.parse(raw)
    logical = physical = 512
    w106 = d.sector_size_info
    if w106 & 0xC000 == 0x4000:  # bit 14 set, bit 15 clear: the word is valid
        if w106 & (1 << 12) and d.logical_sector_words:
            logical = 2 * d.logical_sector_words
        physical = logical << (w106 & 0xF) if w106 & (1 << 13) else logical
    lba48 = bool(d.cmd_set_supported_83 & (1 << 10))
    rate = d.rotation_rate
    return AtaIdentity(
        model=d.model, serial=d.serial, firmware=d.firmware,
        num_blocks=d.lba48_sectors if lba48 and d.lba48_sectors else d.lba28_sectors,
        logical_block_size=logical, physical_block_size=physical,
        write_cache_supported=bool(d.cmd_set_supported_82 & (1 << 5)),
        write_cache_enabled=bool(d.cmd_set_enabled_85 & (1 << 5)),
        lba48=lba48,
        flush_cache_ext=bool(d.cmd_set_supported_83 & (1 << 13)),
        trim=bool(d.data_set_management & 1),
        rotational=None if rate in (0, 0xFFFF) else rate != 1,
    )


def ata_checksum_ok(raw: bytes) -> bool:
    """Word 255: signature A5h in the low byte; all 512 bytes sum to 0 mod 256."""
    if raw[510] != 0xA5:
        return True  # the checksum is optional; absent means "not checked"
    return sum(raw) % 256 == 0


def with_ata_checksum(raw: bytes) -> bytes:
    body = bytearray(raw[:510]) + b"\xa5"
    return bytes(body) + bytes([(-sum(body)) % 256])


# -- NVMe Identify Controller (CNS 01h) ---------------------------------------
NvmeIdCtrl = Struct(
    "vid" / Default(Int16ul, 0),                      # 0
    "ssvid" / Default(Int16ul, 0),                    # 2
    "sn" / Default(SpacePaddedString(20), ""),        # 4
    "mn" / Default(SpacePaddedString(40), ""),        # 24
    "fr" / Default(SpacePaddedString(8), ""),         # 64
    "rab" / Default(Int8ul, 0),                       # 72
    "ieee" / Default(Bytes(3), bytes(3)),             # 73
    "cmic" / Default(Int8ul, 0),                      # 76
    "mdts" / Default(Int8ul, 0),                      # 77: max transfer, 2^n min pages
    "cntlid" / Default(Int16ul, 0),                   # 78
    "ver" / Default(Int32ul, 0),                      # 80
    Padding(172),                                     # 84..255
    "oacs" / Default(Int16ul, 0),                     # 256
    Padding(22),                                      # 258..279
    "tnvmcap" / Default(BytesInteger(16, swapped=True), 0),  # 280: total NVM capacity, bytes
    Padding(216),                                     # 296..511
    "sqes" / Default(Int8ul, 0x66),                   # 512
    "cqes" / Default(Int8ul, 0x44),                   # 513
    "maxcmd" / Default(Int16ul, 0),                   # 514
    "nn" / Default(Int32ul, 1),                       # 516: number of namespaces
    "oncs" / Default(Int16ul, 0),                     # 520: bit 2 DSM (deallocate), bit 3 write zeroes
    "fuses" / Default(Int16ul, 0),                    # 522
    "fna" / Default(Int8ul, 0),                       # 524
    "vwc" / Default(Int8ul, 0),                       # 525: bit 0 volatile write cache present
    "awun" / Default(Int16ul, 0),                     # 526
    "awupf" / Default(Int16ul, 0),                    # 528
    Padding(238),                                     # 530..767
    "subnqn" / Default(PaddedString(256, "utf8"), ""),  # 768: NUL-padded, unlike sn/mn/fr
    Padding(3072),                                    # 1024..4095 (ioccsz.., psd[32], vs)
)

NvmeLbaFormat = Struct(
    "ms" / Default(Int16ul, 0),    # metadata bytes per block
    "lbads" / Default(Int8ul, 0),  # log2 of the data size; 0 = format not in use
    "rp" / Default(Int8ul, 0),     # relative performance
)

# -- NVMe Identify Namespace (CNS 00h) ----------------------------------------
NvmeIdNs = Struct(
    "nsze" / Default(Int64ul, 0),                     # 0: size in blocks
    "ncap" / Default(Int64ul, 0),                     # 8
    "nuse" / Default(Int64ul, 0),                     # 16
    "nsfeat" / Default(Int8ul, 0),                    # 24
    "nlbaf" / Default(Int8ul, 0),                     # 25: number of formats, 0-based
    "flbas" / Default(Int8ul, 0),                     # 26: bits 3:0 (+ 6:5) format in use
    "mc" / Default(Int8ul, 0),                        # 27
    "dpc" / Default(Int8ul, 0),                       # 28
    "dps" / Default(Int8ul, 0),                       # 29
    "nmic" / Default(Int8ul, 0),                      # 30
    "rescap" / Default(Int8ul, 0),                    # 31
    "fpi" / Default(Int8ul, 0),                       # 32
    "dlfeat" / Default(Int8ul, 0),                    # 33
    Padding(70),                                      # 34..103
    "nguid" / Default(Bytes(16), bytes(16)),          # 104
    "eui64" / Default(Bytes(8), bytes(8)),            # 120
    "lbaf" / Default(Array(64, NvmeLbaFormat), [{}] * 64),  # 128..383 (16 before NVMe 2.0)
    Padding(3712),                                    # 384..4095
)


@dataclass
class NvmeIdentity:
    model: str
    serial: str
    firmware: str
    vendor_id: int
    num_blocks: int
    block_size: int
    metadata_bytes: int
    formats: list[dict]
    volatile_write_cache: bool
    deallocate: bool
    write_zeroes: bool


def nvme_format_index(flbas: int) -> int:
    return (flbas & 0xF) | (((flbas >> 5) & 0x3) << 4)


def nvme_identity(ctrl_raw: bytes, ns_raw: bytes | None) -> NvmeIdentity:
    for name, raw in (("controller", ctrl_raw), ("namespace", ns_raw)):
        if raw is not None and len(raw) != NVME_IDENTIFY_BYTES:
            raise ValueError(f"NVMe identify {name} data is {len(raw)} bytes, expected {NVME_IDENTIFY_BYTES}")
    c = NvmeIdCtrl.parse(ctrl_raw)
    num_blocks = block_size = ms = 0
    formats: list[dict] = []
    if ns_raw is not None:
        n = NvmeIdNs.parse(ns_raw)
        formats = [
            {"index": i, "block_size": 1 << f.lbads, "metadata_bytes": f.ms, "relative_performance": f.rp}
            for i, f in enumerate(n.lbaf[: n.nlbaf + 1]) if f.lbads
        ]
        cur = n.lbaf[nvme_format_index(n.flbas)]
        block_size = 1 << cur.lbads if cur.lbads else 0
        ms = cur.ms
        num_blocks = n.nsze
    return NvmeIdentity(
        model=c.mn, serial=c.sn, firmware=c.fr, vendor_id=c.vid, num_blocks=num_blocks,
        block_size=block_size, metadata_bytes=ms, formats=formats,
        volatile_write_cache=bool(c.vwc & 1), deallocate=bool(c.oncs & (1 << 2)),
        write_zeroes=bool(c.oncs & (1 << 3)),
    )


# -- the commands that fetch them ----------------------------------------------
ATA_IDENTIFY_DEVICE = 0xEC
ATA_FLUSH_CACHE_EXT = 0xEA
NVME_ADMIN_IDENTIFY = 0x06
NVME_CNS_NAMESPACE = 0x00
NVME_CNS_CONTROLLER = 0x01


def ata_pass_through_16(command: int, *, data_in: bool, extend: bool, sector_count: int = 0) -> bytes:
    """SAT ATA PASS-THROUGH(16) CDB (85h). Protocol 4 = PIO data-in,
    3 = non-data; byte 2: T_DIR from device, BYT_BLOK, T_LENGTH in the
    sector count field when data moves."""
    protocol = 4 if data_in else 3
    flags = 0x0E if data_in else 0x00
    cdb = bytearray(16)
    cdb[0] = 0x85
    cdb[1] = (protocol << 1) | (1 if extend else 0)
    cdb[2] = flags
    cdb[6] = sector_count & 0xFF
    cdb[5] = (sector_count >> 8) & 0xFF
    cdb[13] = 0x40 if extend else 0x00  # device: LBA mode
    cdb[14] = command
    return bytes(cdb)
