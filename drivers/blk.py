"""``blk:///dev/…`` (transport detected), ``nvme:///dev/nvme0n1`` and
``sata:///dev/sda`` (transport forced): a block device with O_DIRECT.

Opened with O_EXCL, so a mounted or otherwise claimed device is refused with
EBUSY rather than shared. Geometry comes from ioctls (BLKGETSIZE64,
BLKSSZGET, BLKPBSZGET, BLKIOMIN, BLKIOOPT, BLKROGET). The transport is found
by asking: NVME_IOCTL_ID, then SG_IO ATA PASS-THROUGH(16) IDENTIFY DEVICE;
EINVAL/ENOTTY/EOPNOTSUPP mean "not that kind of device" and the rest comes
from sysfs; any other error is reported (logged and kept in info.extra).
With ``nvme://`` or ``sata://`` the named protocol must answer, or the open
fails with a clear message.

flush is fdatasync (the kernel sends the device a cache flush) plus, on SATA
with its write cache on, an explicit FLUSH CACHE EXT; fua writes use
RWF_DSYNC (FUA on devices that have it); discard is BLKDISCARD, zeroout
BLKZEROOUT.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from drivers import identify
from drivers.file import FdDevice, local_path, open_error
from drivers.osio._ioctl import ffi, lib
from drivers.osio.buffers import AlignedBuffer, address_of
from drivers.osio.errors import is_unsupported
from drivers.osio.ioctl import ioctl_int, ioctl_ptr, ioctl_range, ioctl_u64, ioctl_uint
from drivers.osio.pio import O_DIRECT
from hal.block import DeviceError, DeviceInfo
from hal.url import UrlError, parse_url

log = logging.getLogger(__name__)

SG_TIMEOUT_MS = 10_000
NVME_TIMEOUT_MS = 10_000


# -- sysfs ---------------------------------------------------------------------
def sysfs_dir(st: os.stat_result) -> str:
    return os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")


def read_sysfs(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()  # not open(): this module's open is the driver door
    except OSError:
        return default


class Sysfs:
    """The device's sysfs directory (the whole disk's for a partition)."""

    def __init__(self, st: os.stat_result) -> None:
        self.dir = sysfs_dir(st)
        self.disk = os.path.dirname(self.dir) if os.path.exists(f"{self.dir}/partition") else self.dir
        self.name = os.path.basename(self.dir)

    def get(self, rel: str, default: str = "") -> str:
        return read_sysfs(f"{self.disk}/{rel}", default)

    def int(self, rel: str, default: int = 0) -> int:
        try:
            return int(self.get(rel, str(default)))
        except ValueError:
            return default

    def transport(self) -> str:
        name = os.path.basename(self.disk)
        if os.path.isdir(f"{self.disk}/loop"):
            return "loop"
        for prefix in ("nvme", "nbd", "zram", "md", "dm-", "mmcblk", "rbd", "vd", "xvd"):
            if name.startswith(prefix):
                return {"vd": "virtio", "xvd": "xen", "dm-": "dm"}.get(prefix, prefix)
        if os.path.isdir(f"{self.disk}/device/scsi_device"):
            return "scsi"
        return "block"


# -- NVMe admin and SG_IO ATA pass-through --------------------------------------
def nvme_namespace_id(fd: int) -> int:
    return ioctl_int(fd, lib.NVME_IOCTL_ID, 0, "NVME_IOCTL_ID")


def nvme_identify(fd: int, nsid: int, cns: int) -> bytes:
    buf = AlignedBuffer(identify.NVME_IDENTIFY_BYTES)
    try:
        cmd = ffi.new("struct nvme_passthru_cmd *")
        cmd.opcode = identify.NVME_ADMIN_IDENTIFY
        cmd.nsid = nsid
        cmd.addr = address_of(buf.view)
        cmd.data_len = identify.NVME_IDENTIFY_BYTES
        cmd.cdw10 = cns
        cmd.timeout_ms = NVME_TIMEOUT_MS
        status = ioctl_ptr(fd, lib.NVME_IOCTL_ADMIN_CMD, cmd, "NVME_IOCTL_ADMIN_CMD")
        if status:  # a positive return is the NVMe completion status
            raise OSError(errno.EIO, f"NVMe Identify CNS {cns} failed with status {status:#x}")
        return bytes(buf.view)
    finally:
        buf.close()


def sense_key(sense: bytes) -> int:
    if not sense:
        return 0
    code = sense[0] & 0x7F
    if code in (0x72, 0x73):  # descriptor format
        return sense[1] & 0xF if len(sense) > 1 else 0
    return sense[2] & 0xF if len(sense) > 2 else 0  # fixed format


def sg_ata(fd: int, command: int, *, data_in_bytes: int = 0, extend: bool = False) -> bytes:
    """One ATA command through SG_IO ATA PASS-THROUGH(16)."""
    cdb = identify.ata_pass_through_16(command, data_in=bool(data_in_bytes), extend=extend,
                                       sector_count=data_in_bytes // 512)
    buf = AlignedBuffer(max(data_in_bytes, 512))
    try:
        cdb_c = ffi.new("unsigned char[]", cdb)
        sense_c = ffi.new("unsigned char[]", 32)
        hdr = ffi.new("sg_io_hdr_t *")
        hdr.interface_id = ord("S")
        hdr.dxfer_direction = lib.SG_DXFER_FROM_DEV if data_in_bytes else lib.SG_DXFER_NONE
        hdr.cmd_len = len(cdb)
        hdr.mx_sb_len = 32
        hdr.dxfer_len = data_in_bytes
        hdr.dxferp = ffi.from_buffer(buf.view) if data_in_bytes else ffi.NULL
        hdr.cmdp = cdb_c
        hdr.sbp = sense_c
        hdr.timeout = SG_TIMEOUT_MS
        ioctl_ptr(fd, lib.SG_IO, hdr, "SG_IO")
        sense = bytes(ffi.buffer(sense_c, hdr.sb_len_wr))
        if hdr.host_status or (hdr.driver_status & 0xF) not in (0, 8):  # 8: DRIVER_SENSE
            raise OSError(errno.EIO, f"SG_IO ATA {command:#x}: host {hdr.host_status:#x} driver {hdr.driver_status:#x}")
        key = sense_key(sense)
        if key == 0x5:  # ILLEGAL REQUEST: the SCSI target does not translate ATA
            raise OSError(errno.EOPNOTSUPP, f"SG_IO ATA {command:#x}: ATA pass-through not supported")
        if hdr.status not in (0, 2) or key not in (0, 1):  # 1: RECOVERED (ATA status return)
            raise OSError(errno.EIO, f"SG_IO ATA {command:#x}: SCSI status {hdr.status:#x} sense key {key:#x}")
        return bytes(buf.view[:data_in_bytes])
    finally:
        buf.close()


# -- the device -----------------------------------------------------------------
class BlkDevice(FdDevice):
    def __init__(self, info: DeviceInfo, fd: int, *, sata_flush: bool) -> None:
        super().__init__(info, fd)
        self._sata_flush = sata_flush

    def _flush_sync(self) -> None:
        os.fdatasync(self.fd)
        if self._sata_flush:
            sg_ata(self.fd, identify.ATA_FLUSH_CACHE_EXT, extend=True)

    async def _flush(self) -> None:
        if self._sata_flush:
            await self._io("flush", self._flush_sync)
        else:
            await super()._flush()

    async def _discard(self, lba: int, count: int) -> None:
        bs = self.info.block_size
        await self._io("discard", ioctl_range, self.fd, lib.BLKDISCARD, lba * bs, count * bs, "BLKDISCARD")

    async def _zeroout(self, lba: int, count: int) -> None:
        bs = self.info.block_size
        await self._io("zeroout", ioctl_range, self.fd, lib.BLKZEROOUT, lba * bs, count * bs, "BLKZEROOUT")


FORCED = {"nvme": "nvme", "sata": "sata", "blk": None}
ARTICLED = {"nvme": "an NVMe", "sata": "a SATA"}


def _geometry(fd: int) -> dict:
    return {
        "size_bytes": ioctl_u64(fd, lib.BLKGETSIZE64, "BLKGETSIZE64"),
        "block_size": ioctl_uint(fd, lib.BLKSSZGET, "BLKSSZGET"),
        "physical_block_size": ioctl_uint(fd, lib.BLKPBSZGET, "BLKPBSZGET"),
        "io_min_bytes": ioctl_uint(fd, lib.BLKIOMIN, "BLKIOMIN"),
        "io_opt_bytes": ioctl_uint(fd, lib.BLKIOOPT, "BLKIOOPT"),
        "read_only": bool(ioctl_uint(fd, lib.BLKROGET, "BLKROGET")),
    }


def _probe(fd: int, forced: str | None, url: str, extra: dict) -> tuple[str | None, dict]:
    """Ask the device what it is. Returns (transport or None, facts)."""
    facts: dict = {}
    tried = ["nvme", "sata"] if forced is None else [forced]
    for kind in tried:
        try:
            if kind == "nvme":
                nsid = nvme_namespace_id(fd)
                ctrl = nvme_identify(fd, 0, identify.NVME_CNS_CONTROLLER)
                ns = nvme_identify(fd, nsid, identify.NVME_CNS_NAMESPACE)
                ident = identify.nvme_identity(ctrl, ns)
                facts = {
                    "model": ident.model, "serial": ident.serial, "firmware": ident.firmware,
                    "write_cache": ident.volatile_write_cache, "rotational": False,
                }
                extra.update(nvme_nsid=nsid, nvme_vendor_id=f"{ident.vendor_id:#06x}",
                             nvme_lba_formats=ident.formats, nvme_block_size=ident.block_size,
                             nvme_deallocate=ident.deallocate, nvme_write_zeroes=ident.write_zeroes)
            else:
                raw = sg_ata(fd, identify.ATA_IDENTIFY_DEVICE, data_in_bytes=identify.ATA_IDENTIFY_BYTES)
                ident = identify.ata_identity(raw)
                facts = {
                    "model": ident.model, "serial": ident.serial, "firmware": ident.firmware,
                    "write_cache": ident.write_cache_enabled,
                }
                if ident.rotational is not None:
                    facts["rotational"] = ident.rotational
                extra.update(ata_write_cache_supported=ident.write_cache_supported, ata_trim=ident.trim,
                             ata_flush_cache_ext=ident.flush_cache_ext, ata_lba48=ident.lba48,
                             ata_num_blocks=ident.num_blocks)
            return kind, facts
        except OSError as e:
            if is_unsupported(e):
                extra[f"{kind}_probe"] = f"not supported here ({errno.errorcode.get(e.errno, e.errno)})"
                if forced:
                    raise DeviceError(
                        errno.ENODEV, f"not {ARTICLED[forced]} device: {e.strerror}; use blk:// to detect "
                        f"the transport", url) from None
                continue
            if forced:
                raise DeviceError(e.errno or errno.EIO, f"{ARTICLED[forced][2:].lstrip()} identify failed: {e.strerror or e}",
                                  url) from None
            # Reported, not fatal: the I/O path does not depend on identify.
            log.warning("%s: %s probe failed: %s", url, kind, e)
            extra[f"{kind}_probe"] = f"error: {e.strerror or e}"
    return None, facts


def open(url: str, *, read_only: bool = False) -> BlkDevice:  # noqa: A001 - the driver door
    u = parse_url(url)
    example = f"{u.scheme}:///dev/loop0"
    u.check_keys(set())
    path = local_path(u, example)
    forced = FORCED[u.scheme]
    try:
        st = os.stat(path)
    except OSError as e:
        raise open_error(url, path, e, "open") from None
    if not stat.S_ISBLK(st.st_mode):
        hint = f"; for an image file use file://{path}" if stat.S_ISREG(st.st_mode) else ""
        raise UrlError(f"{url}: {path} is not a block device{hint}")

    flags = (os.O_RDONLY if read_only else os.O_RDWR) | O_DIRECT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceError(errno.EBUSY, f"{path} is in use (mounted, or opened exclusively by another "
                              f"program); refusing to share it", url) from None
        raise open_error(url, path, e, "open") from None

    try:
        geo = _geometry(fd)
        sysfs = Sysfs(st)
        extra: dict = {"path": path, "sysfs": sysfs.dir, "io_min_bytes": geo["io_min_bytes"],
                       "io_opt_bytes": geo["io_opt_bytes"]}
        transport, facts = _probe(fd, forced, url, extra)
        if transport is None:
            transport = sysfs.transport()
        if geo["read_only"] and not read_only:
            raise DeviceError(errno.EROFS, f"{path} is read-only (BLKROGET); open it read-only", url)
        if transport == "loop":
            extra["backing_file"] = sysfs.get("loop/backing_file")
            extra["loop_direct_io"] = sysfs.get("loop/dio") == "1"
        wc_sysfs = sysfs.get("queue/write_cache")
        max_kb = sysfs.int("queue/max_sectors_kb", 1024) or 1024
        bs = geo["block_size"]
        if geo["size_bytes"] % bs:
            log.warning("%s: size %d is not a multiple of the block size %d; the tail is unused",
                        path, geo["size_bytes"], bs)
        model = facts.get("model") or sysfs.get("device/model") or (
            f"loop over {extra['backing_file']}" if transport == "loop" else "")
        info = DeviceInfo(
            url=url, transport=transport, block_size=bs, num_blocks=geo["size_bytes"] // bs,
            physical_block_size=geo["physical_block_size"], model=model,
            serial=facts.get("serial") or sysfs.get("device/serial") or sysfs.get("serial"),
            firmware=facts.get("firmware") or sysfs.get("device/firmware_rev") or sysfs.get("device/rev"),
            rotational=facts.get("rotational", sysfs.get("queue/rotational") == "1"),
            write_cache=facts.get("write_cache", wc_sysfs == "write back"),
            discard=sysfs.int("queue/discard_max_bytes") > 0,
            direct_io=True, read_only=read_only or geo["read_only"],
            max_transfer_bytes=max(bs, max_kb * 1024), extra=extra,
        )
    except DeviceError:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        raise open_error(url, path, e, "probe") from None
    sata_flush = transport == "sata" and info.write_cache and extra.get("ata_flush_cache_ext", False)
    return BlkDevice(info, fd, sata_flush=bool(sata_flush))
