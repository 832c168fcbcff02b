"""Test doubles for the firmware tests: an in-memory NvramRegion and a rig
that wires a Primary to a Secondary in one process on mem:// devices."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from drivers.mem import open as open_mem
from firmware.crashpoints import CrashPoints
from firmware.events import EventBus
from firmware.local_remote import LocalRemote
from firmware.params import SessionParams
from firmware.primary import Primary
from firmware.secondary import Secondary
from hal.block import BlockDevice
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


# ---------------------------------------------------------------------------
# Concurrency: devices and a remote that yield to the event loop a random
# (seeded) number of times around every call, so a writer, the destager, the
# drain workers, send-first sends and the CG loop interleave across their
# awaits the way they do on real devices and a real link, deterministically.
# ---------------------------------------------------------------------------


class JitterDevice(BlockDevice):
    def __init__(self, inner: BlockDevice, rng, max_yields: int = 3) -> None:
        super().__init__(inner.info)
        self.inner = inner
        self.rng = rng
        self.max_yields = max_yields

    async def _yield(self) -> None:
        for _ in range(self.rng.randint(0, self.max_yields)):
            await asyncio.sleep(0)

    async def _read(self, lba: int, count: int) -> bytes:
        await self._yield()
        data = await self.inner.read(lba, count)
        await self._yield()
        return data

    async def _write(self, lba: int, data, fua: bool) -> None:
        await self._yield()
        await self.inner.write(lba, data, fua=fua)
        await self._yield()

    async def _flush(self) -> None:
        await self._yield()
        await self.inner.flush()


class JitterRemote(LocalRemote):
    def __init__(self, secondary: Secondary, rng, max_yields: int = 4) -> None:
        super().__init__(secondary)
        self.rng = rng
        self.max_yields = max_yields

    async def _yield(self) -> None:
        for _ in range(self.rng.randint(0, self.max_yields)):
            await asyncio.sleep(0)

    async def send_track(self, volume, track, cg_seq, data, runs=None):  # takes segment runs, like the link
        await self._yield()
        await super().send_track(volume, track, cg_seq, data, runs)
        await self._yield()

    async def sync(self, cg_seq):
        await self._yield()
        await super().sync(cg_seq)
        await self._yield()

    async def drain_done(self, cg_seq):
        await self._yield()
        await super().drain_done(cg_seq)

    async def prepare(self, cg_seq):
        await self._yield()
        await super().prepare(cg_seq)
        await self._yield()

    async def commit(self, cg_seq):
        await self._yield()
        await super().commit(cg_seq)
        await self._yield()


def jitter_rig(rig: Rig, rng) -> None:
    """Put every device and the link of a (not yet started) rig behind jitter."""
    p, s = rig.primary, rig.secondary
    p.devices[:] = [JitterDevice(d, rng) for d in p.devices]  # the list the destager shares
    s.b = [JitterDevice(d, rng) for d in s.b]
    s.c = [JitterDevice(d, rng) for d in s.c]
    s.fc.b, s.fc.c = s.b, s.c
    rig.remote = p.remote = JitterRemote(s, rng)
