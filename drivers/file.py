"""``file:///path/img?size=1GiB[&block_size=512][&direct=auto|on|off][&mode=0600]``:
a regular file as a block device.

A file it creates gets ``mode`` (octal, default 0600: volumes hold the
host's data, so others may not read them unless asked; the umask still
applies); an existing file keeps its mode.

The file is created sparse on demand (``size`` is required then); an existing
file's size is used when ``size`` is omitted, a larger ``size`` grows it
(sparse) and a smaller one is refused, since shrinking would drop data.
O_DIRECT is used when the filesystem allows it (``info.direct_io`` says
which); otherwise I/O goes through the page cache and ``flush`` makes it
durable. Writers take an exclusive flock, so a second writer of the same image
gets EBUSY instead of silently interleaving.

``FdDevice`` is the part shared with drivers.blk: I/O on a descriptor through
drivers.osio.deviceio.DeviceIo (io_uring where it works, else the thread
pool), with the descriptor closed only after in-flight I/O is done (a
closed-and-reused descriptor number would send a late write to another file).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from drivers.osio.deviceio import DeviceIo
from drivers.osio.errors import is_unsupported
from drivers.osio.pio import (
    FALLOC_PUNCH_HOLE,
    FALLOC_ZERO_RANGE,
    drop_direct,
    fallocate,
    holes_and_data,
    lock_exclusive,
    open_direct,
    probe_direct,
)
from hal.block import BlockDevice, DeviceError, DeviceInfo
from hal.url import DeviceUrl, UrlError, parse_url

log = logging.getLogger(__name__)

_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)


class FdDevice(BlockDevice):
    """A BlockDevice over an open file descriptor; reads, writes and syncs go
    through DeviceIo (io_uring or the pool), anything else to the pool."""

    def __init__(self, info: DeviceInfo, fd: int) -> None:
        super().__init__(info)
        self.fd = fd
        self._dio = DeviceIo(fd, direct=info.direct_io)
        self._dsync_writes = bool(_RWF_DSYNC)

    def _error(self, what: str, e: OSError) -> DeviceError:
        return DeviceError(e.errno or errno.EIO, f"{what}: {e.strerror or e}", self.info.url)

    async def _io(self, what: str, fn, *args):
        """A blocking call on the descriptor in the pool, errors as DeviceError."""
        try:
            return await self._dio.call(fn, *args)
        except DeviceError:
            raise
        except OSError as e:
            raise self._error(what, e) from None

    def _close(self) -> None:
        self._dio.close()  # closes the descriptor after the last in-flight op

    # -- data path ------------------------------------------------------------
    async def _read(self, lba: int, count: int) -> bytes:
        bs = self.info.block_size
        try:
            return await self._dio.read(lba * bs, count * bs)
        except OSError as e:
            raise self._error("read", e) from None

    async def _write(self, lba: int, data, fua: bool) -> None:
        offset = lba * self.info.block_size
        try:
            if fua and self._dsync_writes:
                try:
                    await self._dio.write(data, offset, dsync=True)
                    return
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._dsync_writes = False  # old kernel/fs: write, then fdatasync
            await self._dio.write(data, offset)
            if fua:
                await self._dio.fdatasync()
        except OSError as e:
            raise self._error("write", e) from None

    async def _flush(self) -> None:
        try:
            await self._dio.fdatasync()
        except OSError as e:
            raise self._error("flush", e) from None


class FileDevice(FdDevice):
    def can_extents(self) -> bool:
        return True  # SEEK_DATA/SEEK_HOLE (a filesystem without them reports all data)

    async def _extents(self, lba: int, count: int) -> list[tuple[int, bool]]:
        bs = self.info.block_size
        runs = await self._io("extents", holes_and_data, self.fd, lba * bs, count * bs)
        return _in_blocks(runs, bs) or [(count, False)]

    def _punch_or_zero(self, modes: list[int], lba: int, count: int) -> bool:
        bs = self.info.block_size
        for mode in modes:
            try:
                fallocate(self.fd, mode, lba * bs, count * bs)
                return True
            except OSError as e:
                if not is_unsupported(e):
                    raise
        return False

    async def _discard(self, lba: int, count: int) -> None:
        done = await self._io("discard", self._punch_or_zero, [FALLOC_PUNCH_HOLE], lba, count)
        if not done:
            await super()._zeroout(lba, count)

    async def _zeroout(self, lba: int, count: int) -> None:
        modes = [FALLOC_ZERO_RANGE, FALLOC_PUNCH_HOLE]
        done = await self._io("zeroout", self._punch_or_zero, modes, lba, count)
        if not done:
            await super()._zeroout(lba, count)


def _in_blocks(runs: list[tuple[int, bool]], bs: int) -> list[tuple[int, bool]]:
    """Byte runs as whole blocks: a block partly data is data (the filesystem's
    granule can be smaller than the device's block); adjacent runs of a kind merge."""
    out: list[tuple[int, bool]] = []
    pos = 0  # bytes from the range's start
    done = 0  # blocks emitted
    for n, hole in runs:
        start, pos = pos, pos + n
        if hole:
            first, last = -(-start // bs), pos // bs  # whole blocks inside the hole
        else:
            first, last = start // bs, -(-pos // bs)
        first = max(first, done)
        if last <= first:
            continue
        if first > done:  # the part-block before this run: data
            out.append((first - done, False))
        out.append((last - first, hole))
        done = last
    merged: list[tuple[int, bool]] = []
    for blocks, hole in out:
        if merged and merged[-1][1] == hole:
            merged[-1] = (merged[-1][0] + blocks, hole)
        else:
            merged.append((blocks, hole))
    return merged


def local_path(u: DeviceUrl, example: str) -> str:
    if u.host not in ("", "localhost"):
        raise UrlError(f"{u.url}: {u.scheme}:// names a local path; host {u.host!r} is not allowed (e.g. {example})")
    if not u.path or u.path == "/":
        raise UrlError(f"{u.url}: no path (e.g. {example})")
    return u.path


def url_size(u: DeviceUrl) -> int | None:
    """``?size=`` in bytes, or None; a bad size names the URL."""
    try:
        return u.size()
    except UrlError as e:
        raise UrlError(f"{u.url}: {e}") from None


def open_error(url: str, path: str, e: OSError, doing: str) -> DeviceError:
    err = e.errno or errno.EIO
    hints = {
        errno.ENOENT: "no such file or directory",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EISDIR: "is a directory",
        errno.EBUSY: "in use by another opener",
        errno.EROFS: "read-only filesystem",
        errno.ENOSPC: "no space left on the filesystem",
    }
    return DeviceError(err, f"cannot {doing} {path}: {hints.get(err, e.strerror or str(e))}", url)


DIRECT_CHOICES = ("auto", "on", "off")
DEFAULT_MODE = 0o600


def open(url: str, *, read_only: bool = False) -> FileDevice:  # noqa: A001 - the driver door
    example = "file:///tmp/a.img?size=1GiB"
    u = parse_url(url)
    u.check_keys({"size", "block_size", "direct", "mode"})
    path = local_path(u, example)
    want_size = url_size(u)
    bs = u.int_param("block_size", 512)
    if bs < 512 or bs & (bs - 1):
        raise UrlError(f"{url}: block_size {bs} must be a power of two >= 512")
    direct_choice = u.query.get("direct", "auto")
    if direct_choice not in DIRECT_CHOICES:
        raise UrlError(f"{url}: direct={direct_choice!r}; choose one of {', '.join(DIRECT_CHOICES)}")
    try:
        mode = int(u.query.get("mode", f"{DEFAULT_MODE:o}"), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise UrlError(f"{url}: mode={u.query['mode']!r}: expected octal permissions such as 0600 or 0640")
    if want_size is not None and (want_size <= 0 or want_size % bs):
        raise UrlError(f"{url}: size {want_size} must be a positive multiple of block_size {bs}")

    exists = os.path.lexists(path)
    if not exists and read_only:  # read-only never creates
        raise open_error(url, path, FileNotFoundError(errno.ENOENT, "missing"), "open")
    if not exists and want_size is None:
        raise UrlError(f"{url}: {path} does not exist; give ?size=... to create it (e.g. {example})")
    try:
        st = os.stat(path) if exists else None
    except OSError as e:
        raise open_error(url, path, e, "open") from None
    if st is not None and stat.S_ISBLK(st.st_mode):
        raise UrlError(f"{url}: {path} is a block device; use blk://{path}")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise open_error(url, path, IsADirectoryError(errno.EISDIR, "dir"), "open")

    flags = (os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
    try:
        if direct_choice == "off":
            fd, direct = os.open(path, flags, mode), False
        else:
            fd, direct = open_direct(path, flags, mode)
    except OSError as e:
        raise open_error(url, path, e, "create" if not exists else "open") from None

    try:
        if not read_only:
            lock_exclusive(fd, path)
        size = os.fstat(fd).st_size
        if want_size is not None and want_size != size:
            if want_size < size:
                raise DeviceError(
                    errno.EINVAL,
                    f"{path} is {size} bytes but size={want_size}: refusing to shrink it "
                    f"(omit size to use the file's size, or remove the file)",
                    url,
                )
            if read_only:
                raise DeviceError(errno.EROFS, f"{path} is {size} bytes, size={want_size} would grow it, "
                                  f"and the device is opened read-only", url)
            os.ftruncate(fd, want_size)  # sparse: only written blocks take space
            size = want_size
        if size == 0 or size % bs:
            raise DeviceError(errno.EINVAL, f"{path} is {size} bytes: not a positive multiple of "
                              f"block_size {bs}", url)
        if direct and not probe_direct(fd, bs):
            drop_direct(fd)
            direct = False
        if direct_choice == "on" and not direct:
            raise DeviceError(errno.EINVAL, f"{path}: the filesystem refuses O_DIRECT at block_size {bs} "
                              f"(use direct=auto or off)", url)
    except DeviceError:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        raise open_error(url, path, e, "open") from None

    if not direct:
        log.info("%s: filesystem refuses O_DIRECT; using the page cache (flush makes writes durable)", path)
    info = DeviceInfo(
        url=url, transport="file", block_size=bs, num_blocks=size // bs, physical_block_size=bs,
        model="mirrorfw file image", serial=f"{os.stat(path).st_dev:x}:{os.stat(path).st_ino:x}",
        rotational=False, write_cache=True, discard=True, direct_io=direct, read_only=read_only,
        max_transfer_bytes=4 << 20, extra={"path": path},
    )
    return FileDevice(info, fd)
