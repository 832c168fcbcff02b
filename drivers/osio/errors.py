"""Errno classification: which failures mean "this device or filesystem does
not do that" rather than "it tried and failed".

Every driver that tries something optional (O_DIRECT, RWF_NOWAIT, discard,
fallocate modes, NVMe or SCSI passthrough) must make the same call on the
same errnos: fall back (to sysfs, to buffered I/O, to writing zeros) on these
and report anything else. One set, here, keeps them from drifting apart.
"""

from __future__ import annotations

import errno

UNSUPPORTED_ERRNOS = frozenset({errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def is_unsupported(err: int | BaseException | None) -> bool:
    """True for an errno (or an OSError carrying one) that means "not supported here"."""
    if isinstance(err, BaseException):
        err = getattr(err, "errno", None)
    return err in UNSUPPORTED_ERRNOS
