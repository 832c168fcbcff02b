"""``nvram:///path/file?size=256MiB[&persist=none|msync]``: the NVRAM region
as an mmap'd file.

A store into ``view`` is in the kernel's page cache the moment it is made, so
it survives SIGKILL of the process: that is the default (``persist=none``)
and what a battery-backed NVRAM gives a controller. ``persist=msync`` makes
``persist`` msync the range, for power-loss emulation; it costs a page
write-back per call, which on a virtual disk is ~1000x the store itself. The file is created (fully allocated, so a full disk cannot turn a
later store into SIGBUS), grown to a larger ``size``, never shrunk. One
process at a time: an exclusive flock refuses a second opener with EBUSY.
A DAX or pmem path works the same.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat

from drivers.file import local_path, open_error, url_size
from drivers.osio.pio import lock_exclusive
from hal.block import DeviceError
from hal.nvram import NvramRegion
from hal.url import UrlError, parse_url

log = logging.getLogger(__name__)


class MmapNvram(NvramRegion):
    def __init__(self, url: str, path: str, fd: int, lock_fd: int, size_bytes: int, *,
                 msync: bool = False) -> None:
        self.url = url
        self.msync = msync
        self._lock_fd = lock_fd
        self.path = path
        self.size_bytes = size_bytes
        self._fd = fd
        self._map = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view: memoryview | None = memoryview(self._map)

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise DeviceError(errno.EBADF, "NVRAM region is closed", self.url)
        return self._view

    def persist(self, offset: int, length: int) -> None:
        self._check_persist(self._view, offset, length)
        if length == 0 or not self.msync:
            return
        # msync wants a page-aligned start; widen the range to whole pages.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        end = min(self.size_bytes, offset + length)
        self._map.flush(start, end - start)

    def close(self) -> None:
        if self._view is None:
            return
        view, self._view = self._view, None
        try:
            self._map.flush()
            view.release()
            self._map.close()
        except BufferError:
            # Someone still holds a slice of the view (the firmware's bitmaps live
            # in it until the process ends); the mapping stays until they drop it.
            # It was flushed above and is MAP_SHARED, so nothing stored is lost:
            # a clean stop says so at info, not as a warning.
            log.info("%s: region closed while views of it are still held (flushed; the mapping "
                     "goes when they do)", self.url)
        os.close(self._fd)
        os.close(self._lock_fd)

    def __repr__(self) -> str:
        return f"<MmapNvram {self.url} {self.size_bytes} bytes>"


def open(url: str) -> MmapNvram:  # noqa: A001 - the driver door
    example = "nvram:///var/lib/mirrorfw/p.nvram?size=64MiB"
    u = parse_url(url)
    if u.scheme != "nvram":
        raise UrlError(f"{url}: not an nvram:// URL (e.g. {example})")
    u.check_keys({"size", "persist"})
    persist = u.query.get("persist", "none")
    if persist not in ("none", "msync"):
        raise UrlError(f"{url}: persist={persist!r}: must be none (survives a process crash) "
                       f"or msync (also emulates power loss)")
    path = local_path(u, example)
    want = url_size(u)
    page = mmap.ALLOCATIONGRANULARITY
    if want is not None and (want <= 0 or want % page):
        raise UrlError(f"{url}: size {want} must be a positive multiple of {page} bytes")
    exists = os.path.lexists(path)
    if not exists and want is None:
        raise UrlError(f"{url}: {path} does not exist; give ?size=... to create it (e.g. {example})")
    try:
        if exists and stat.S_ISDIR(os.stat(path).st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise open_error(url, path, e, "open" if exists else "create") from None
    try:
        # The lock lives on its own descriptor: mmap keeps a dup of ``fd``, and
        # a mapping someone still holds a view of must not keep the lock.
        lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(fd)
        raise open_error(url, path, e, "open") from None
    try:
        lock_exclusive(lock_fd, path)
        size = os.fstat(fd).st_size
        if want is not None and want < size:
            raise DeviceError(errno.EINVAL, f"{path} is {size} bytes but size={want}: refusing to shrink "
                              f"the NVRAM region (omit size to use the file's size)", url)
        if want is not None and want > size:
            os.posix_fallocate(fd, 0, want)
            size = want
        if size == 0 or size % page:
            raise DeviceError(errno.EINVAL, f"{path} is {size} bytes: not a positive multiple of {page}", url)
        return MmapNvram(url, path, fd, lock_fd, size, msync=persist == "msync")
    except DeviceError:
        os.close(fd)
        os.close(lock_fd)
        raise
    except OSError as e:
        os.close(fd)
        os.close(lock_fd)
        raise open_error(url, path, e, "open") from None
