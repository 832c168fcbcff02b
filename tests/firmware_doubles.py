"""Test doubles for the firmware tests: an in-memory NvramRegion and a rig
that wires a Primary to a Secondary in one process on mem:// devices."""

from __future__ import annotations

from dataclasses import dataclass

from drivers.mem import open as open_mem
from firmware.crashpoints import CrashPoints
from firmware.events import EventBus
from firmware.params import SessionParams
from firmware.primary import Primary
from firmware.secondary import LocalRemote, Secondary
from hal.clock import VirtualClock
from hal.nvram import NvramRegion


class MemNvram(NvramRegion):
    """NVRAM as a bytearray: "crash" by dropping the controller object and
    opening a new one on the same region."""

    def __init__(self, size_bytes: int) -> None:
        self.url = f"memnvram://{size_bytes}"
        self.size_bytes = size_bytes
        self.buf = bytearray(size_bytes)
        self._view = memoryview(self.buf)
        self.persists = 0

    @property
    def view(self) -> memoryview:
        return self._view

    def persist(self, offset: int, length: int) -> None:
        self.persists += 1

    def close(self) -> None:
        return None


class Crash(BaseException):
    """Raised by an armed crash point: the controller is abandoned mid-step."""


def raising_crashpoints() -> CrashPoints:
    def on_hit(name: str) -> None:
        raise Crash(name)
    return CrashPoints(on_hit)


@dataclass
class Rig:
    clock: VirtualClock
    a: dict
    bc: dict
    pnv: MemNvram
    snv: MemNvram
    params: SessionParams
    primary: Primary
    secondary: Secondary
    remote: LocalRemote

    async def reopen_primary(self) -> Primary:
        """A new Primary on the same NVRAM bytes and devices (the old one abandoned)."""
        p = Primary(self.a, self.pnv, self.clock, self.params, self.remote, events=EventBus(),
                    crashpoints=raising_crashpoints())
        await p.open()
        self.primary = p
        return p


async def make_rig(*, volumes=("vol0",), size: str = "4MiB", track_bytes: int = 65536,
                   nvram_bytes: int = 4 << 20, policy: str = "dual-image", start: bool = True,
                   form_cgs: bool = False, destage: bool = False, **param_kw) -> Rig:
    clock = VirtualClock()
    params = SessionParams(track_bytes=track_bytes, collision_policy=policy, **param_kw)
    a = {n: open_mem(f"mem://?size={size}") for n in volumes}
    bc = {n: (open_mem(f"mem://?size={size}"), open_mem(f"mem://?size={size}")) for n in volumes}
    snv = MemNvram(1 << 20)
    secondary = Secondary(bc, snv, clock, grain_bytes=track_bytes)
    await secondary.open()
    remote = LocalRemote(secondary)
    pnv = MemNvram(nvram_bytes)
    primary = Primary(a, pnv, clock, params, remote, crashpoints=raising_crashpoints())
    await primary.open()
    if start:
        await primary.start(form_cgs=form_cgs, destage=destage)
    return Rig(clock, a, bc, pnv, snv, params, primary, secondary, remote)


async def settle(rounds: int = 30) -> None:
    """Let every ready task run (mem:// I/O completes without real waiting)."""
    import asyncio
    for _ in range(rounds):
        await asyncio.sleep(0)


class SpyRemote(LocalRemote):
    """LocalRemote that calls ``before_send(volume, track, data)`` before each
    track reaches the secondary and logs every call."""

    def __init__(self, secondary: Secondary) -> None:
        super().__init__(secondary)
        self.log: list[tuple] = []
        self.before_send = None
        self.fail_sends = False

    async def send_track(self, volume, track, cg_seq, data):
        self.log.append(("send", volume, track, cg_seq, bytes(data[:8])))
        if self.before_send is not None:
            r = self.before_send(volume, track, data)
            if hasattr(r, "__await__"):
                await r
        if self.fail_sends:
            raise ConnectionError("link down (test)")
        await super().send_track(volume, track, cg_seq, data)

    async def prepare(self, cg_seq):
        self.log.append(("prepare", cg_seq))
        await super().prepare(cg_seq)

    async def commit(self, cg_seq):
        self.log.append(("commit", cg_seq))
        await super().commit(cg_seq)


def spy_rig_remote(rig: Rig) -> SpyRemote:
    spy = SpyRemote(rig.secondary)
    rig.primary.remote = spy
    rig.remote = spy
    return spy
