"""C exported to hosts, read-only: ``SecondaryTarget`` serves C of every
volume (each connection pinned to the CG committed when it opened) and every
volume of each named snapshot as VOLUME@NAME (firmware/pins.py keeps the
pins); ``Secondary.host_target`` hands it out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware.pins import SNAPSHOT_SEP, PinnedVolume
from hal.host import HostTarget, HostVolume

if TYPE_CHECKING:
    from firmware.secondary import Secondary


class SecondaryVolume(HostVolume):
    """C, exported read-only."""

    read_only = True

    def __init__(self, secondary: Secondary, name: str) -> None:
        b = secondary.b[secondary._vi(name)]
        self.secondary = secondary
        self.name = name
        self.size_bytes = b.info.size_bytes
        self.block_size = b.info.block_size

    async def read(self, offset: int, length: int) -> bytes:
        return await self.secondary.read_c(self.name, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        raise PermissionError(f"{self.name}: C is the consistent copy and is exported read-only")

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise PermissionError(f"{self.name}: C is the consistent copy and is exported read-only")

    async def trim(self, offset: int, length: int) -> None:
        raise PermissionError(f"{self.name}: C is the consistent copy and is exported read-only")

    async def flush(self) -> None:
        return None

    def can_multi_conn(self) -> bool:
        return False  # each connection reads its own CG (SecondaryTarget.open)


class SecondaryTarget(HostTarget):
    """C of every volume, and every volume of each named snapshot as
    VOLUME@NAME, read-only. A connection to a volume reads one CG, the one
    committed when it opened the export (its own pin, dropped at its close)."""

    def __init__(self, secondary: Secondary) -> None:
        self.secondary = secondary
        self._volumes = {n: SecondaryVolume(secondary, n) for n in secondary.names}

    def volumes(self) -> dict[str, HostVolume]:
        out: dict[str, HostVolume] = dict(self._volumes)
        for snap in self.secondary.snapshots.names():
            for name in self.secondary.names:
                out[f"{name}{SNAPSHOT_SEP}{snap}"] = self.open(f"{name}{SNAPSHOT_SEP}{snap}")
        return out

    def open(self, name: str) -> HostVolume | None:
        s = self.secondary
        volume, sep, snap = name.partition(SNAPSHOT_SEP)
        if volume not in self._volumes:
            return None
        vi = s._vi(volume)
        b = s.b[vi]
        if sep:
            pin = s.snapshots.get(snap)
            if pin is None:
                return None
            return PinnedVolume(s.fc.pins, pin, vi, name, b.info.size_bytes, b.info.block_size, own=False)
        pin = s.fc.pins.take(f"a connection to {volume}", {vi: range(s.fc.grain_count(vi))})
        return PinnedVolume(s.fc.pins, pin, vi, name, b.info.size_bytes, b.info.block_size, own=True)
