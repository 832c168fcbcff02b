"""Plain block devices as host volumes, so the NBD server can serve them
directly (``mirrorfw serve``; replication off)."""

from __future__ import annotations

import errno

from hal.block import BlockDevice, DeviceError
from hal.host import EXTENT_HOLE, EXTENT_ZERO, HostTarget, HostVolume


class DeviceVolume(HostVolume):
    """A BlockDevice seen by a host port: byte offsets in, lbas out.

    Its capabilities are HostVolume's defaults: ``can_write`` follows
    ``read_only`` (asked for, or the device's own), trim is advertised even
    without discard because it is advisory (kept data is a correct answer)."""

    def __init__(self, device: BlockDevice, name: str, *, read_only: bool = False) -> None:
        self.device = device
        self.name = name
        self.block_size = device.info.block_size
        self.size_bytes = device.info.size_bytes
        self.read_only = read_only or device.info.read_only
        self._shift = self.block_size.bit_length() - 1
        if 1 << self._shift != self.block_size:
            raise ValueError(f"{device.info.url}: block size {self.block_size} is not a power of two")

    def can_extents(self) -> bool:
        return self.device.can_extents()

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        runs = await self.device.extents(offset >> self._shift, length >> self._shift)
        return [(blocks << self._shift, EXTENT_HOLE | EXTENT_ZERO if hole else 0) for blocks, hole in runs]

    async def read(self, offset: int, length: int) -> bytes:
        return await self.device.read(offset >> self._shift, length >> self._shift)

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        if self.read_only:
            raise PermissionError(errno.EPERM, f"volume {self.name} is read-only")
        await self.device.write(offset >> self._shift, data, fua=fua)

    async def flush(self) -> None:
        await self.device.flush()

    async def trim(self, offset: int, length: int) -> None:
        if self.read_only:
            raise PermissionError(errno.EPERM, f"volume {self.name} is read-only")
        if not self.device.info.discard:
            return  # trim is advisory: a device without discard keeps its data
        try:
            await self.device.discard(offset >> self._shift, length >> self._shift)
        except DeviceError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.read_only:
            raise PermissionError(errno.EPERM, f"volume {self.name} is read-only")
        await self.device.zeroout(offset >> self._shift, length >> self._shift)
        if fua:
            await self.device.flush()


class DeviceTarget(HostTarget):
    """Named plain devices, each served as one export."""

    def __init__(self, devices: dict[str, BlockDevice], *, read_only: bool = False) -> None:
        self._volumes = {name: DeviceVolume(dev, name, read_only=read_only) for name, dev in devices.items()}

    def volumes(self) -> dict[str, HostVolume]:
        return self._volumes

    def close(self) -> None:
        for vol in self._volumes.values():
            vol.device.close()
