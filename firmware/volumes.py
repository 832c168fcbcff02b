"""The primary's volumes: names, devices and their track geometry.

One place answers "which volume is this name", "is this I/O inside it" and
"how long is track t" for the host path and the CG cycle alike. The order
is the NVRAM region's (directory entries and selector bits use it).
"""

from __future__ import annotations

from firmware.errors import VolumeError
from firmware.remote import VolumeGeometry
from hal.block import BlockDevice


class Volumes:
    def __init__(self, devices: dict[str, BlockDevice], track_bytes: int) -> None:
        if not devices:
            raise VolumeError("a primary needs at least one volume")
        self.track_bytes = track_bytes
        self.reorder(list(devices), devices)

    def reorder(self, names: list[str], devices: dict[str, BlockDevice] | None = None) -> None:
        """Adopt ``names`` as the order (the region's, at recovery)."""
        by_name = devices if devices is not None else dict(zip(self.names, self.devices, strict=True))
        self.names = list(names)
        self.devices = [by_name[n] for n in self.names]
        self.sizes = [d.info.size_bytes for d in self.devices]
        self._index = {n: i for i, n in enumerate(self.names)}

    def sizes_by_name(self) -> dict[str, int]:
        return dict(zip(self.names, self.sizes, strict=True))

    def index(self, volume: str) -> int:
        try:
            return self._index[volume]
        except KeyError:
            raise VolumeError(f"unknown volume {volume!r}; known: {', '.join(self.names)}") from None

    def check_io(self, vi: int, offset: int, length: int) -> None:
        dev = self.devices[vi]
        bs = dev.info.block_size
        if offset < 0 or length < 0 or offset + length > self.sizes[vi]:
            raise VolumeError(f"{self.names[vi]}: bytes {offset}..{offset + length} outside 0..{self.sizes[vi]}")
        if offset % bs or length % bs:
            raise VolumeError(f"{self.names[vi]}: offset {offset} and length {length} must be multiples "
                              f"of the block size {bs}")

    def track_len(self, vi: int, track: int) -> int:
        return min(self.track_bytes, self.sizes[vi] - track * self.track_bytes)

    def geometry(self) -> list[VolumeGeometry]:
        return [VolumeGeometry(n, s, self.track_bytes) for n, s in zip(self.names, self.sizes, strict=True)]
