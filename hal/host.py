"""HostTarget: what a host port (NBD) serves.

A target is a set of named volumes. ``write`` returns when the write may be
acknowledged to the host (the quiesce gate may hold it); reads are never
held. Offsets and lengths are in bytes and already bounds-checked by the
host port against ``size_bytes`` and ``block_size``.
"""

from __future__ import annotations

import abc


class HostVolume(abc.ABC):
    name: str
    size_bytes: int
    block_size: int = 512  # minimum I/O granule the volume accepts
    read_only: bool = False

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None:
        return None

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write(offset, bytes(length), fua=fua)


class HostTarget(abc.ABC):
    @abc.abstractmethod
    def volumes(self) -> dict[str, HostVolume]:
        """Volumes by export name."""
