"""ioctl(2) through the cffi module, raising OSError with the errno.

The block driver's requests and structures (geometry, discard, NVMe admin
commands, SG_IO) come from the system headers through the cffi module
``_ioctl`` (see ``_ioctl_build.py``), so their numbers and layouts are the
kernel's rather than hand-packed formats for fcntl.ioctl. These wrappers
cover the argument shapes that driver needs: an integer, a pointer to a
structure, a u64 or unsigned int read back, and an (offset, length) range.
"""

from __future__ import annotations

import os

from drivers.osio._ioctl import ffi, lib


def _raise_errno(what: str) -> None:
    err = ffi.errno
    raise OSError(err, f"{what}: {os.strerror(err)}")


def ioctl_ptr(fd: int, request: int, arg, what: str = "ioctl") -> int:
    """ioctl with a pointer argument (a cffi object); returns the ioctl's result."""
    rc = lib.mfw_ioctl_ptr(fd, request, arg)
    if rc < 0:
        _raise_errno(what)
    return rc


def ioctl_int(fd: int, request: int, arg: int = 0, what: str = "ioctl") -> int:
    """ioctl with an integer argument; returns the ioctl's result."""
    rc = lib.mfw_ioctl_int(fd, request, arg)
    if rc < 0:
        _raise_errno(what)
    return rc


def ioctl_u64(fd: int, request: int, what: str) -> int:
    """An ioctl that writes one uint64_t back (BLKGETSIZE64)."""
    out = ffi.new("uint64_t *")
    ioctl_ptr(fd, request, out, what)
    return int(out[0])


def ioctl_uint(fd: int, request: int, what: str) -> int:
    """An ioctl that writes one unsigned int back (BLKSSZGET and the like)."""
    out = ffi.new("unsigned int *")
    ioctl_ptr(fd, request, out, what)
    return int(out[0])


def ioctl_range(fd: int, request: int, offset: int, length: int, what: str) -> None:
    """An ioctl that takes a uint64_t[2] byte range (BLKDISCARD, BLKZEROOUT)."""
    rng = ffi.new("uint64_t[2]", [offset, length])
    ioctl_ptr(fd, request, rng, what)
