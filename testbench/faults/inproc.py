"""A primary and a secondary in one process (LocalRemote) on file:// volumes
and nvram:// regions, optionally behind FaultyDevices: for the console fuzzer
and the device-fault part, where the harness must reach inside the devices."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from drivers import open_device, open_nvram
from firmware.crashpoints import CrashPoints
from firmware.events import EventBus
from firmware.local_remote import LocalRemote
from firmware.params import SessionParams
from firmware.primary import Primary
from firmware.secondary import Secondary
from hal.block import BlockDevice
from hal.clock import AsyncioClock


@dataclass
class InProcessPair:
    workdir: Path
    primary: Primary
    secondary: Secondary
    a: dict[str, BlockDevice]
    bc: dict[str, tuple[BlockDevice, BlockDevice]]
    closers: list = field(default_factory=list)

    @classmethod
    async def create(cls, workdir: Path, *, size: str = "8MiB", wrap_a=None, wrap_b=None,
                     params: SessionParams | None = None) -> InProcessPair:
        """``wrap_a(dev)`` / ``wrap_b(dev)`` may put a FaultyDevice around A / B."""
        workdir.mkdir(parents=True, exist_ok=True)
        clock = AsyncioClock()
        closers = []
        a_dev = open_device(f"file://{workdir}/a.img?size={size}")
        b_dev = open_device(f"file://{workdir}/b.img?size={size}")
        c_dev = open_device(f"file://{workdir}/c.img?size={size}")
        closers += [a_dev.close, b_dev.close, c_dev.close]
        a = {"vol0": wrap_a(a_dev) if wrap_a else a_dev}
        bc = {"vol0": (wrap_b(b_dev) if wrap_b else b_dev, c_dev)}
        snv = open_nvram(f"nvram://{workdir}/s.nvram?size=8MiB")
        pnv = open_nvram(f"nvram://{workdir}/p.nvram?size=16MiB")
        closers += [snv.close, pnv.close]
        secondary = Secondary(bc, snv, clock, events=EventBus(), crashpoints=CrashPoints())
        await secondary.open(format=True)
        primary = Primary(a, pnv, clock, params or SessionParams(), LocalRemote(secondary), events=EventBus(),
                          crashpoints=CrashPoints())
        await primary.open(format=True)
        await primary.start()
        return cls(workdir, primary, secondary, a, bc, closers)

    async def close(self, *, remove: bool = True) -> None:
        try:
            await self.primary.stop(clean=True)
        except Exception:  # noqa: BLE001 - a faulted primary may not stop cleanly; close the rest anyway
            pass
        try:
            await self.secondary.close()
        except Exception:  # noqa: BLE001
            pass
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # noqa: BLE001
                pass
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)
