"""Blocking file-descriptor I/O for the drivers: positional reads and writes
that never come back short, opening with O_DIRECT (and finding out whether
the filesystem really allows it), fallocate, and the exclusive lock on an
image.

os.pread/os.pwrite may transfer less than asked, O_DIRECT may be refused at
open (tmpfs) or only at the first I/O, and fallocate is not in the os module
at all; each driver would otherwise handle these on its own. Everything here
blocks: call it from the thread pool (``pool``) or through ``DeviceIo``.
"""

from __future__ import annotations

import errno
import fcntl
import os

from drivers.osio._ioctl import ffi, lib
from drivers.osio.buffers import buffers

O_DIRECT: int = getattr(os, "O_DIRECT", lib.O_DIRECT)


# -- positional I/O ----------------------------------------------------------
def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; a short read (end of file) raises EIO."""
    total = view.nbytes
    done = os.preadv(fd, [view], offset)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read: {done} of {total} bytes at offset {offset}")
        done += n


def pwrite_from(fd: int, view, offset: int, flags: int = 0) -> None:
    """Write all of ``view`` at ``offset`` (``flags``: os.RWF_DSYNC etc.)."""
    if type(view) is not memoryview or view.format != "B":
        view = memoryview(view).cast("B")
    total = view.nbytes
    done = os.pwritev(fd, [view], offset, flags) if flags else os.pwrite(fd, view, offset)
    if done == 0 and total:
        raise OSError(errno.EIO, f"short write: 0 of {total} bytes at offset {offset}")
    while done < total:
        if flags:
            n = os.pwritev(fd, [view[done:]], offset + done, flags)
        else:
            n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short write: {done} of {total} bytes at offset {offset}")
        done += n


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


def lock_exclusive(fd: int, path: str) -> None:
    """Refuse a second writer of the same image (EBUSY), like O_EXCL does for
    block devices; the lock goes away with the process, even on SIGKILL."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, f"{path} is in use (locked by another opener)") from None


# -- fallocate (not in the os module; through cffi) ----------------------------
FALLOC_PUNCH_HOLE = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
FALLOC_ZERO_RANGE = lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if lib.fallocate(fd, mode, offset, length) < 0:
        err = ffi.errno
        raise OSError(err, f"fallocate: {os.strerror(err)}")


# -- holes (SEEK_DATA / SEEK_HOLE) ----------------------------------------------
def holes_and_data(fd: int, offset: int, length: int, max_runs: int = 1024) -> list[tuple[int, bool]]:
    """``(length, is_hole)`` runs of ``[offset, offset + length)`` as the
    filesystem reports them with SEEK_DATA/SEEK_HOLE; at most ``max_runs``
    (the caller asks again for the rest). A filesystem without them says
    "all data", which is always true enough: a hole reads as zeros either way."""
    end = offset + length
    runs: list[tuple[int, bool]] = []
    pos = offset
    try:
        while pos < end and len(runs) < max_runs:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data from pos to the end of the file
                    raise
                data = end
            if data > pos:
                n = min(data, end) - pos
                runs.append((n, True))
                pos += n
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            runs.append((hole - pos, False))
            pos = hole
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        return [(length, False)]
    return runs
