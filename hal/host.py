"""HostTarget: what a host port (NBD) serves.

A target is a set of named volumes. ``write`` returns when the write may be
acknowledged to the host (the quiesce gate may hold it); reads are never
held. Offsets and lengths are in bytes and already bounds-checked by the
host port against ``size_bytes`` and ``block_size``.

Each volume declares what its export can do, after nbdkit's plugin table
(``can_write``, ``can_flush``, ``can_fua``, ``can_trim``, ``can_zero``,
``can_multi_conn``, ``can_extents``). The host port reads them once per
export, advertises exactly those, and refuses the rest before a request
reaches the volume; it never probes a volume for attributes. The
write-related ones only count when ``can_write`` is true.

``extents(offset, length)`` says which parts of a range are holes (NBD's
``base:allocation``, so ``nbdinfo --map`` works): a list of
``(length_bytes, flags)`` runs from ``offset`` with ``EXTENT_HOLE`` and
``EXTENT_ZERO`` flags (the same values as NBD_STATE_HOLE/NBD_STATE_ZERO).
A volume that does not know its holes leaves ``can_extents`` False and the
default answer, "all data", which is always correct.

A host port asks ``open(name)`` for the volume of each connection and closes
it when the connection ends; ``volumes()`` is what it lists and describes.
"""

from __future__ import annotations

import abc

EXTENT_HOLE = 1  # not allocated (reads return zeros unless EXTENT_ZERO is absent)
EXTENT_ZERO = 2  # reads return zeros


class HostVolume(abc.ABC):
    name: str
    size_bytes: int
    block_size: int = 512  # minimum I/O granule the volume accepts
    preferred_block_size: int = 0  # 0: the host port picks max(4096, block_size)
    read_only: bool = False

    # -- capabilities (defaults fit a plain writable volume) --------------------------
    def can_write(self) -> bool:
        """Writes, trims and zeroes are accepted (False: a read-only export, EPERM)."""
        return not self.read_only

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> bool:
        """``write(fua=True)`` makes the data durable before it returns."""
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        """``write_zeroes`` is accepted (the default writes a buffer of zeros)."""
        return True

    def can_multi_conn(self) -> bool:
        """A flush on one connection covers writes acknowledged on every other."""
        return True

    def can_extents(self) -> bool:
        """``extents`` knows the volume's holes (False: every byte is reported as data)."""
        return False

    # -- I/O ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None:
        return None  # trim is advisory: keeping the data is a correct answer

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write(offset, bytes(length), fua=fua)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length_bytes, flags)`` runs covering at least the start of
        ``[offset, offset + length)``, in order, none empty; fewer bytes than
        asked is allowed (the caller asks again for the rest)."""
        return [(length, 0)]

    def close(self) -> None:
        """The connection that got this volume from ``HostTarget.open`` is gone
        (its last request answered). Shared volumes ignore it."""
        return None


class HostTarget(abc.ABC):
    @abc.abstractmethod
    def volumes(self) -> dict[str, HostVolume]:
        """Volumes by export name (what a host port lists and describes)."""

    def open(self, name: str) -> HostVolume | None:
        """The volume one host connection uses from when it selects export
        ``name`` until it ends, then ``close()``d; None if there is no such
        export. By default every connection shares the volume of ``volumes()``;
        a target can give each its own view (the secondary pins C at the CG
        current when the connection opens)."""
        return self.volumes().get(name)
