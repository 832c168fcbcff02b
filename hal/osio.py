"""OS primitives the device drivers share: page-aligned buffers for O_DIRECT,
positional I/O that never comes back short, opening with O_DIRECT (and
finding out whether the filesystem allows it), the thread pool that keeps
blocking calls off the event loop, and errno classification.

io_uring is not used: the thread pool is the one path (DESIGN.md section 3
keeps it as the fallback anyway; liburing wheels proved fragile here).
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from hal._ioctl import ffi, lib

PAGE_BYTES = mmap.PAGESIZE
O_DIRECT: int = getattr(os, "O_DIRECT", lib.O_DIRECT)

# Errors that mean "this device / filesystem does not do that", as opposed to
# "it tried and failed": callers fall back (to sysfs, to buffered I/O, to
# writing zeros) on these and report anything else.
UNSUPPORTED_ERRNOS = frozenset({errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def is_unsupported(err: int | BaseException | None) -> bool:
    if isinstance(err, BaseException):
        err = getattr(err, "errno", None)
    return err in UNSUPPORTED_ERRNOS


# -- the executor ------------------------------------------------------------
T = TypeVar("T")

# Enough threads for queue depth 32 on one device plus a few on others; every
# blocking call releases the GIL (os.pread/pwrite, cffi calls).
IO_THREADS = int(os.environ.get("MIRRORFW_IO_THREADS", "48"))
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="mirrorfw-io")
    return _executor


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in the I/O thread pool and await its result."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)


# -- aligned buffers ---------------------------------------------------------
class AlignedBuffer:
    """Page-aligned anonymous memory (mmap), usable for O_DIRECT I/O."""

    __slots__ = ("size_bytes", "_map", "view")

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self._map = mmap.mmap(-1, max(size_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)[:size_bytes]

    def close(self) -> None:
        self.view.release()
        self._map.close()


class BufferPool:
    """Reuses aligned buffers by size: an mmap/munmap pair per I/O costs more
    than a small 4 KiB write itself."""

    def __init__(self, keep_per_size: int = 64) -> None:
        self._free: dict[int, list[AlignedBuffer]] = {}
        self._lock = threading.Lock()
        self._keep = keep_per_size

    def get(self, size_bytes: int) -> AlignedBuffer:
        with self._lock:
            free = self._free.get(size_bytes)
            if free:
                return free.pop()
        return AlignedBuffer(size_bytes)

    def put(self, buf: AlignedBuffer) -> None:
        with self._lock:
            free = self._free.setdefault(buf.size_bytes, [])
            if len(free) < self._keep and buf.size_bytes <= (4 << 20):
                free.append(buf)
                return
        buf.close()


buffers = BufferPool()


def address_of(data) -> int:
    """The memory address of a bytes-like object (for alignment checks)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(data)))


def is_aligned(data, alignment: int = PAGE_BYTES) -> bool:
    return address_of(data) % alignment == 0


# -- positional I/O ----------------------------------------------------------
def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; a short read (end of file) raises EIO."""
    done = 0
    total = view.nbytes
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read: {done} of {total} bytes at offset {offset}")
        done += n


def pwrite_from(fd: int, view, offset: int, flags: int = 0) -> None:
    """Write all of ``view`` at ``offset`` (``flags``: os.RWF_DSYNC etc.)."""
    view = memoryview(view).cast("B")
    done = 0
    total = view.nbytes
    while done < total:
        if flags:
            n = os.pwritev(fd, [view[done:]], offset + done, flags)
        else:
            n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short write: {done} of {total} bytes at offset {offset}")
        done += n


def read_aligned(fd: int, offset: int, length: int) -> bytes:
    """An O_DIRECT-safe read: into a page-aligned buffer, returned as bytes."""
    buf = buffers.get(length)
    try:
        pread_into(fd, buf.view, offset)
        return bytes(buf.view)
    finally:
        buffers.put(buf)


def write_aligned(fd: int, data, offset: int, flags: int = 0) -> None:
    """An O_DIRECT-safe write: data already page-aligned goes as is, anything
    else is copied into an aligned buffer first."""
    view = memoryview(data).cast("B")
    if is_aligned(view):
        pwrite_from(fd, view, offset, flags)
        return
    buf = buffers.get(view.nbytes)
    try:
        buf.view[:] = view
        pwrite_from(fd, buf.view, offset, flags)
    finally:
        buffers.put(buf)


# -- opening -----------------------------------------------------------------
def open_direct(path: str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open with O_DIRECT, or without when the filesystem refuses it at open
    (tmpfs says EINVAL). Returns (fd, direct)."""
    try:
        return os.open(path, flags | O_DIRECT, mode), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.open(path, flags, mode), False


def drop_direct(fd: int) -> None:
    """Clear O_DIRECT on an open descriptor (fcntl F_SETFL)."""
    import fcntl

    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~O_DIRECT)


def probe_direct(fd: int, block_size: int) -> bool:
    """Some filesystems accept O_DIRECT at open and refuse the I/O, or need a
    larger alignment than ``block_size``: read one block to find out."""
    try:
        buf = buffers.get(block_size)
        try:
            os.preadv(fd, [buf.view], 0)
        finally:
            buffers.put(buf)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


# -- ioctl and fallocate through cffi -----------------------------------------
def _raise_errno(what: str) -> None:
    err = ffi.errno
    raise OSError(err, f"{what}: {os.strerror(err)}")


def ioctl_ptr(fd: int, request: int, arg, what: str = "ioctl") -> int:
    rc = lib.mfw_ioctl_ptr(fd, request, arg)
    if rc < 0:
        _raise_errno(what)
    return rc


def ioctl_int(fd: int, request: int, arg: int = 0, what: str = "ioctl") -> int:
    rc = lib.mfw_ioctl_int(fd, request, arg)
    if rc < 0:
        _raise_errno(what)
    return rc


def ioctl_u64(fd: int, request: int, what: str) -> int:
    out = ffi.new("uint64_t *")
    ioctl_ptr(fd, request, out, what)
    return int(out[0])


def ioctl_uint(fd: int, request: int, what: str) -> int:
    out = ffi.new("unsigned int *")
    ioctl_ptr(fd, request, out, what)
    return int(out[0])


def ioctl_range(fd: int, request: int, offset: int, length: int, what: str) -> None:
    rng = ffi.new("uint64_t[2]", [offset, length])
    ioctl_ptr(fd, request, rng, what)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if lib.fallocate(fd, mode, offset, length) < 0:
        _raise_errno("fallocate")


FALLOC_PUNCH_HOLE = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
FALLOC_ZERO_RANGE = lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE


def lock_exclusive(fd: int, path: str) -> None:
    """Refuse a second writer of the same image (EBUSY), like O_EXCL does for
    block devices; the lock goes away with the process, even on SIGKILL."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, f"{path} is in use (locked by another opener)") from None
