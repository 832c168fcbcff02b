"""NvramRegion: byte-addressable persistent memory for the write cache.

A write is durable against a crash of the process once it is in ``view``
(the region is an mmap'd file); ``persist`` additionally makes a range
durable against power loss where the backing supports it (msync).
"""

from __future__ import annotations

import abc


class NvramRegion(abc.ABC):
    url: str
    size_bytes: int

    @property
    @abc.abstractmethod
    def view(self) -> memoryview:
        """A writable byte view of the whole region."""

    @abc.abstractmethod
    def persist(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) durable against power loss."""

    @abc.abstractmethod
    def close(self) -> None: ...
