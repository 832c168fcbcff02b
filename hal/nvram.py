"""NvramRegion: byte-addressable persistent memory for the write cache.

A write is durable against a crash of the process once it is in ``view``
(the region is an mmap'd file); ``persist`` additionally makes a range
durable against power loss where the backing supports it (msync).
"""

from __future__ import annotations

import abc
import errno

from hal.block import DeviceError


class NvramRegion(abc.ABC):
    url: str
    size_bytes: int

    def _check_persist(self, view: memoryview | None, offset: int, length: int) -> None:
        """What every ``persist`` checks first: the region is open and the
        range inside it."""
        if view is None:
            raise DeviceError(errno.EBADF, "persist on a closed NVRAM region", self.url)
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise DeviceError(
                errno.EINVAL, f"persist [{offset}, {offset + length}) outside the region ({self.size_bytes} bytes)",
                self.url,
            )

    @property
    @abc.abstractmethod
    def view(self) -> memoryview:
        """A writable byte view of the whole region."""

    @abc.abstractmethod
    def persist(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) durable against power loss."""

    @abc.abstractmethod
    def close(self) -> None: ...
