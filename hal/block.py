"""BlockDevice: the one interface every device driver implements.

Bounds and alignment are checked here, once, so every driver refuses the
same requests with the same errors; drivers implement the underscored
methods and may assume their arguments are valid.
"""

from __future__ import annotations

import abc
import errno
import os
from dataclasses import asdict, dataclass, field


class DeviceError(OSError):
    """A device refused or failed an operation; ``errno`` says why."""

    def __init__(self, err: int, message: str, url: str = "") -> None:
        super().__init__(err, message)
        self.url = url

    def __str__(self) -> str:
        where = f"{self.url}: " if self.url else ""
        name = errno.errorcode.get(self.errno, str(self.errno))
        return f"{where}{self.strerror} [{name}]"


@dataclass
class DeviceInfo:
    """What the HAL knows about a device; printed by ``mirrorfw info``."""

    url: str
    transport: str  # mem, file, loop, nvme, sata, scsi, virtio, nbd, ...
    block_size: int  # logical block size: the unit of lba and alignment
    num_blocks: int
    physical_block_size: int = 0
    model: str = ""
    serial: str = ""
    firmware: str = ""
    rotational: bool = False
    write_cache: bool = False  # volatile write cache present and enabled
    discard: bool = False
    direct_io: bool = False  # data bypasses the page cache (O_DIRECT)
    read_only: bool = False
    max_transfer_bytes: int = 1 << 20
    extra: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.num_blocks

    def as_dict(self) -> dict:
        d = asdict(self)
        d["size_bytes"] = self.size_bytes
        if not d["physical_block_size"]:
            d["physical_block_size"] = self.block_size
        return d


class BlockDevice(abc.ABC):
    """A block device addressed in logical blocks of ``info.block_size``.

    ``read`` returns ``count * block_size`` bytes; ``write`` takes a
    bytes-like object whose length is a multiple of the block size.
    """

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info
        self.closed = False

    # -- the checked public face -------------------------------------------
    def _check(self, op: str, lba: int, count: int, *, writing: bool = False) -> None:
        if self.closed:
            raise DeviceError(errno.EBADF, f"{op} on a closed device", self.info.url)
        if writing and self.info.read_only:
            raise DeviceError(errno.EROFS, f"{op} on a read-only device", self.info.url)
        if lba < 0 or count < 0:
            raise DeviceError(errno.EINVAL, f"{op}: negative lba {lba} or count {count}", self.info.url)
        if lba + count > self.info.num_blocks:
            raise DeviceError(
                errno.ENOSPC if writing else errno.EINVAL,
                f"{op}: blocks {lba}..{lba + count} past the end ({self.info.num_blocks} blocks)",
                self.info.url,
            )

    def _count_of(self, op: str, data) -> int:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n % self.info.block_size:
            raise DeviceError(
                errno.EINVAL,
                f"{op}: length {n} is not a multiple of the block size {self.info.block_size}",
                self.info.url,
            )
        return n // self.info.block_size

    async def read(self, lba: int, count: int) -> bytes:
        if not 0 < count <= self.info.num_blocks - lba or lba < 0 or self.closed:  # the usual case skips _check
            self._check("read", lba, count)
            if count == 0:
                return b""
        return await self._read(lba, count)

    async def write(self, lba: int, data, *, fua: bool = False) -> None:
        # The usual request (a whole number of blocks, in range, device open
        # and writable) is checked inline; anything else takes the full
        # checks, which say what is wrong.
        info = self.info
        n = data.nbytes if type(data) is memoryview else len(data)
        count, rest = divmod(n, info.block_size)
        if rest or not 0 < count <= info.num_blocks - lba or lba < 0 or self.closed or info.read_only:
            count = self._count_of("write", data)
            self._check("write", lba, count, writing=True)
            if not count:
                return
        await self._write(lba, data, fua)

    async def flush(self) -> None:
        self._check("flush", 0, 0)
        await self._flush()

    async def discard(self, lba: int, count: int) -> None:
        """Deallocate; reads of discarded blocks may return anything."""
        self._check("discard", lba, count, writing=True)
        if count:
            await self._discard(lba, count)

    async def zeroout(self, lba: int, count: int) -> None:
        """Make the blocks read back as zeros."""
        self._check("zeroout", lba, count, writing=True)
        if count:
            await self._zeroout(lba, count)

    def can_extents(self) -> bool:
        """``extents`` knows where the holes are (False: everything is data)."""
        return False

    async def extents(self, lba: int, count: int) -> list[tuple[int, bool]]:
        """``(blocks, is_hole)`` runs from ``lba``, in order, none empty, covering
        at least the first block of ``count`` and at most all of them. A hole
        reads back as zeros."""
        self._check("extents", lba, count)
        if count == 0:
            return []
        return await self._extents(lba, count)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    # -- what a driver implements ------------------------------------------
    @abc.abstractmethod
    async def _read(self, lba: int, count: int) -> bytes: ...

    @abc.abstractmethod
    async def _write(self, lba: int, data, fua: bool) -> None: ...

    async def _flush(self) -> None:
        return None

    async def _discard(self, lba: int, count: int) -> None:
        raise DeviceError(errno.EOPNOTSUPP, "discard not supported", self.info.url)

    async def _zeroout(self, lba: int, count: int) -> None:
        # Generic fallback; drivers with a native zeroing command override it.
        bs = self.info.block_size
        step = max(1, self.info.max_transfer_bytes // bs)
        for start in range(lba, lba + count, step):
            n = min(step, lba + count - start)
            await self._write(start, bytes(n * bs), False)

    async def _extents(self, lba: int, count: int) -> list[tuple[int, bool]]:
        return [(count, False)]

    def _close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.url}>"


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def strerror(err: int) -> str:
    return os.strerror(err)
