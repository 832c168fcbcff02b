"""What the simulator runs: controller pairs in one process, on mem://
devices and in-memory NVRAM behind drivers/powerloss.py's volatile filters
(one power domain per controller), with seeded latency, link loss and
device errors in front of them.

``PowerPair`` is one primary and its secondary (the power-cut enumeration,
testbench/powercut.py, uses it bare; the simulator passes ``sim`` to put
``SimDevice``/``SimRemote`` in front). The inner objects of a domain are
what survives a cut; ``restart(role)`` powers a cut domain back on and opens
a new controller on them.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import random

from drivers.mem import open as open_mem
from drivers.powerloss import PowerDomain, PowerLost, VolatileDevice, VolatileNvram
from firmware.errors import NvramError
from firmware.events import EventBus
from firmware.member import MemberPort, MemberState, RecoveryState
from firmware.params import SessionParams
from firmware.primary import Primary
from firmware.remote import RemoteError, RemotePort, RemoteState, VolumeGeometry
from firmware.secondary import Secondary
from hal.block import BlockDevice, DeviceError
from hal.clock import VirtualClock
from hal.nvram import NvramRegion

TRACK_BYTES = 4096
TRACKS = 8  # per volume
VOLUMES = ("vol0", "vol1")
VOLUME_BYTES = TRACK_BYTES * TRACKS
PRIMARY_NVRAM = 160 << 10  # room for ~24 cache slots of 4 KiB
SECONDARY_NVRAM = 64 << 10


class MemRegion(NvramRegion):
    """An NVRAM region as a bytearray: what a VolatileNvram persists into."""

    def __init__(self, size_bytes: int, name: str = "mem") -> None:
        self.url = f"memnvram://{name}?size={size_bytes}"
        self.size_bytes = size_bytes
        self.buf = bytearray(size_bytes)
        self._view = memoryview(self.buf)

    @property
    def view(self) -> memoryview:
        return self._view

    def persist(self, offset: int, length: int) -> None:
        return None

    def close(self) -> None:
        return None


# ================================================================ seeded timing and faults
# The checks read without latency or faults; only they (and the tasks they
# start): a context variable, so the world's own tasks run on as they were.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("mirrorfw_sim_quiet", default=False)


class Sim:
    """The seeded choices of one run that are not the scenario's events:
    how long each device call and link hop takes (virtual seconds, or a few
    bare yields), and the faults in force now (link down, loss, EIO
    budgets). One ``random.Random`` draws them in call order, so a run is
    deterministic from its seed."""

    def __init__(self, seed: int, clock: VirtualClock, *, dev_latency: float = 0.0005,
                 link_latency: float = 0.002) -> None:
        self.rng = random.Random(f"mirrorfw-sim-timing:{seed}")
        self.clock = clock
        self.dev_latency = dev_latency
        self.link_latency = link_latency
        self.link_down_until: dict[int, float] = {}  # controller -> virtual time
        self.loss: dict[int, tuple[float, float]] = {}  # controller -> (probability, until)
        self.eio: dict[tuple[int, str], int] = {}  # (controller, device key) -> errors left
        self.ctl_down_until: dict[int, float] = {}  # a subordinate's control link to the master

    @property
    def quiet(self) -> bool:
        return _QUIET.get()

    @quiet.setter
    def quiet(self, value: bool) -> None:
        _QUIET.set(value)

    async def delay(self, mean: float) -> None:
        if self.quiet:
            return
        r = self.rng.random()
        if r < 0.3:
            for _ in range(self.rng.randint(0, 3)):
                await asyncio.sleep(0)
        else:
            await self.clock.sleep(self.rng.expovariate(1.0 / mean))

    def link_ok(self, ctl: int) -> bool:
        if self.quiet:
            return True
        now = self.clock.now()
        if self.link_down_until.get(ctl, -1.0) > now:
            return False
        p, until = self.loss.get(ctl, (0.0, -1.0))
        return not (until > now and self.rng.random() < p)

    def take_eio(self, ctl: int, key: str) -> bool:
        if self.quiet:
            return False
        left = self.eio.get((ctl, key), 0)
        if left <= 0:
            return False
        self.eio[(ctl, key)] = left - 1
        return True

    def heal(self) -> None:
        self.link_down_until.clear()
        self.loss.clear()
        self.eio.clear()
        self.ctl_down_until.clear()


async def delivered(coro):
    """Run a call that reached the other box to its end there, whatever
    becomes of the caller: its box losing power (its tasks are cancelled) or
    its CG failing (the sends in flight are cancelled) must not throw a
    CancelledError into the other box's code, which no real link can do."""
    return await asyncio.shield(asyncio.ensure_future(coro))


class SimDevice(BlockDevice):
    """A device with seeded virtual latency and injected EIO (``key``: a0,
    b1, c0 ... of controller ``ctl``), in front of a volatile device."""

    def __init__(self, inner: BlockDevice, sim: Sim, ctl: int, key: str) -> None:
        super().__init__(inner.info)
        self.inner, self.sim, self.ctl, self.key = inner, sim, ctl, key

    def _fail(self, op: str) -> None:
        if self.sim.take_eio(self.ctl, self.key):
            raise DeviceError(errno.EIO, f"{op}: injected EIO (sim)", self.info.url)

    async def _read(self, lba: int, count: int) -> bytes:
        await self.sim.delay(self.sim.dev_latency)
        self._fail("read")
        return await self.inner.read(lba, count)

    async def _write(self, lba: int, data, fua: bool) -> None:
        await self.sim.delay(self.sim.dev_latency)
        self._fail("write")
        await self.inner.write(lba, data, fua=fua)
        await self.sim.delay(self.sim.dev_latency)

    async def _flush(self) -> None:
        await self.sim.delay(self.sim.dev_latency)
        self._fail("flush")
        await self.inner.flush()


# ================================================================ the pair
class PowerRemote(RemotePort):
    """LocalRemote across two power domains, as the link remote behaves
    (firmware/link_primary.py): the secondary losing power in a call is, to
    the primary, a dropped link (ConnectionError); a primary without power
    sends nothing. A restarted secondary is reached by a transparent
    reconnect: its handshake says hello again (session, volumes, generation
    of the last ``connect``) and the calls go on, unless it answers ``new``
    where it was not before: then they raise RemoteError until ``connect``.
    With ``pair.sim``: a seeded hop each way, and a link that is down or
    lossy drops the request or the answer (ConnectionError)."""

    def __init__(self, pair: PowerPair, pdom: PowerDomain | None = None) -> None:
        self.pair = pair
        self.pdom = pdom  # the domain of the primary this remote belongs to (None: the pair's current one)
        self.bound: Secondary | None = None  # the secondary the link's last handshake reached
        self.hello_args: tuple | None = None
        self.known_new = False
        self.stale = ""
        self.epoch = 0  # a new hello drops the link: calls in flight on the old one fail
        self.handshake: asyncio.Future | None = None  # a hello in flight

    @property
    def link_up(self) -> bool:
        sim = self.pair.sim
        return sim is None or sim.link_down_until.get(self.pair.ctl, -1.0) <= sim.clock.now()

    def _primary_dead(self) -> bool:
        return (self.pdom or self.pair.pdom).dead

    async def _hop(self, what: str) -> None:
        sim = self.pair.sim
        await sim.delay(sim.link_latency)
        if self._primary_dead():
            raise PowerLost("the primary has no power")
        if not sim.link_ok(self.pair.ctl):
            raise ConnectionError(f"link of c{self.pair.ctl}: {what} lost (sim)")

    async def _call(self, name: str, *args):
        if name == "hello":
            # A new hello drops the link (the calls in flight fail), and the
            # calls made meanwhile wait for its handshake (LinkRemote._usable).
            self.epoch += 1
            done = asyncio.get_running_loop().create_future()
            self.handshake = done
            try:
                return await self._call_once(name, *args)
            finally:
                done.set_result(None)
                if self.handshake is done:
                    self.handshake = None
        while self.handshake is not None:
            await asyncio.shield(self.handshake)
        return await self._call_once(name, *args)

    async def _call_once(self, name: str, *args):
        pair = self.pair
        epoch = self.epoch
        if self._primary_dead():
            raise PowerLost("the primary has no power")
        if pair.sim is not None:
            await self._hop(f"{name} request")
        # The secondary of this call: a restart meanwhile makes a new one,
        # and the old one's power loss is still this call's dropped link.
        secondary, sdom = pair.secondary, pair.sdom
        if sdom.dead or secondary is None:
            raise ConnectionError("the secondary has no power")
        if name == "hello":
            self.stale = ""
        elif secondary is not self.bound:
            await self._reconnect(secondary, sdom)
            epoch = self.epoch  # this call goes on, on the new link
        try:
            out = await pair.at_secondary(name, args, getattr(secondary, name)(*args))
        except PowerLost:
            if sdom.dead and not self._primary_dead():
                raise ConnectionError("the secondary lost power") from None
            raise
        if pair.sim is not None:
            await self._hop(f"{name} answer")
        if epoch != self.epoch:
            raise ConnectionError(f"{name}: the link was dropped for a new hello")
        if name == "hello":
            self.bound, self.known_new = secondary, out.new
        return out

    async def _reconnect(self, secondary: Secondary, sdom: PowerDomain) -> None:
        """The link's background reconnect to a restarted secondary: its
        handshake's hello, then the calls go on (LinkRemote._reconnect_loop)."""
        if self.stale:
            raise RemoteError(self.stale)
        if self.hello_args is None:
            raise ConnectionError("not connected: call connect() first")
        try:
            state = await secondary.hello(*self.hello_args)
        except PowerLost:
            if sdom.dead and not self._primary_dead():
                raise ConnectionError("the secondary lost power") from None
            raise
        if state.new and not self.known_new:
            self.stale = f"the secondary changed while the link was down (new={state.new}); connect again"
            raise RemoteError(self.stale)
        self.bound = secondary
        self.epoch += 1  # a new link, as LinkRemote counts it: calls on the old one fail

    async def connect(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        self.hello_args = (session_id, volumes, generation)
        return await self._call("hello", session_id, volumes, generation)

    async def send_track(self, volume: str, track: int, cg_seq: int, data: bytes) -> None:
        await self._call("receive_track", volume, track, cg_seq, bytes(data))

    async def sync(self, cg_seq: int) -> None:
        await self._call("sync", cg_seq)

    async def drain_done(self, cg_seq: int) -> None:
        await self._call("drain_done", cg_seq)

    async def prepare(self, cg_seq: int) -> None:
        await self._call("prepare", cg_seq)

    async def commit(self, cg_seq: int) -> None:
        await self._call("commit", cg_seq)

    async def abort(self, cg_seq: int) -> None:
        await self._call("abort", cg_seq)


class PowerPair:
    """A primary and a secondary in one process on mem:// devices and
    in-memory NVRAM, each controller in its own power domain. The inner
    objects are what survives a cut; ``restart(role)`` powers a cut domain
    back on and opens a new controller on them."""

    def __init__(self, *, volumes: tuple[str, ...] = VOLUMES, volume_bytes: int = VOLUME_BYTES,
                 track_bytes: int = TRACK_BYTES, primary_nvram: int = PRIMARY_NVRAM,
                 secondary_nvram: int = SECONDARY_NVRAM, pdom: PowerDomain | None = None,
                 sdom: PowerDomain | None = None, policy: str = "dual-image", clock: VirtualClock | None = None,
                 sim: Sim | None = None, ctl: int = 0, session_id: str = "default", session_member: bool = False,
                 params: dict | None = None, start: dict | None = None) -> None:
        self.clock = clock or VirtualClock()
        self.names = list(volumes)
        self.params = SessionParams(track_bytes=track_bytes, collision_policy=policy, **(params or {}))
        self.track_bytes = track_bytes
        self.sim = sim
        self.ctl = ctl
        self.session_id = session_id
        self.session_member = session_member
        self.start_kw = start or {"form_cgs": False, "destage": False}
        self.pdom = pdom or PowerDomain(1, mode="drop")
        self.sdom = sdom or PowerDomain(2, mode="drop")
        # Registration order is fixed (A per volume, then B, C per volume;
        # one NVRAM each), so power_on() hands back the same order.
        for _ in volumes:
            VolatileDevice(open_mem(f"mem://?size={volume_bytes}"), self.pdom)
        for _ in volumes:
            VolatileDevice(open_mem(f"mem://?size={volume_bytes}"), self.sdom)
            VolatileDevice(open_mem(f"mem://?size={volume_bytes}"), self.sdom)
        VolatileNvram(MemRegion(primary_nvram, "primary"), self.pdom)
        VolatileNvram(MemRegion(secondary_nvram, "secondary"), self.sdom)
        self.primary: Primary | None = None
        self.secondary: Secondary | None = None
        self.remote = PowerRemote(self)
        self.pevents = EventBus()
        self.sevents = EventBus()
        self.reformatted: list[str] = []  # roles whose NVRAM had to be formatted again
        # The secondary's requests still running (a sender's going does not end them),
        # ordered as firmware/link_secondary.py orders them: by track, and before a CG step.
        self.receiving: dict[tuple[str, int], asyncio.Task] = {}
        self.received: set[asyncio.Task] = set()

    def _wrap(self, dev: BlockDevice, key: str) -> BlockDevice:
        return dev if self.sim is None else SimDevice(dev, self.sim, self.ctl, key)

    # -- opening ----------------------------------------------------------------------
    async def open_secondary(self, *, format: bool = False) -> Secondary:  # noqa: A002 - contract name
        devs = self.sdom.devices
        bc = {n: (self._wrap(devs[2 * i], f"b{i}"), self._wrap(devs[2 * i + 1], f"c{i}"))
              for i, n in enumerate(self.names)}
        self.receiving, self.received = {}, set()  # a secondary's power loss ended them
        self.secondary = Secondary(bc, self.sdom.regions[0], self.clock, events=self.sevents,
                                   grain_bytes=self.track_bytes, session_id=self.session_id,
                                   session_member=self.session_member)
        try:
            await self.secondary.open(format=format)
        except NvramError:
            if format:
                raise
            self.reformatted.append("secondary")
            await self.secondary.open(format=True)
        return self.secondary

    async def open_primary(self, *, format: bool = False) -> Primary:  # noqa: A002 - contract name
        a = {n: self._wrap(d, f"a{i}") for i, (n, d) in enumerate(zip(self.names, self.pdom.devices, strict=True))}
        remote = self.remote if self.sim is None else PowerRemote(self, self.pdom)  # a dead primary's tasks stay dead
        self.primary = Primary(a, self.pdom.regions[0], self.clock, self.params, remote, events=self.pevents,
                               session_id=self.session_id)
        try:
            await self.primary.open(format=format)
        except NvramError:
            if format:
                raise
            self.reformatted.append("primary")
            await self.primary.open(format=True)
        await self.primary.start(**self.start_kw)
        return self.primary

    async def establish(self) -> None:
        """Format both, and the initial full copy: C established."""
        await self.open_secondary(format=True)
        kw, self.start_kw = self.start_kw, {"form_cgs": False, "destage": False}
        try:
            await self.open_primary(format=True)
        finally:
            self.start_kw = kw
        if not await self.primary.form_cg():
            raise RuntimeError("the initial copy did not commit")

    async def at_secondary(self, name: str, args: tuple, coro):
        """Run a request at the secondary as the link's serving side does: a
        track waits for the same track's earlier one still running there, a
        CG step (drain_done, prepare, commit, abort) for every track received
        before it; and each runs to its end whatever becomes of its sender."""
        if name in ("drain_done", "prepare", "commit", "abort"):
            while self.received:
                await asyncio.gather(*self.received, return_exceptions=True)
        if name != "receive_track":
            return await delivered(coro)
        key = (args[0], args[1])
        before = self.receiving.get(key)

        async def in_order():
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            return await coro
        task = asyncio.ensure_future(in_order())
        self.receiving[key] = task
        self.received.add(task)

        def done(t: asyncio.Task) -> None:
            self.received.discard(t)
            if self.receiving.get(key) is t:
                del self.receiving[key]
        task.add_done_callback(done)
        return await asyncio.shield(task)

    # -- power ----------------------------------------------------------------------------
    def domain(self, role: str) -> PowerDomain:
        return self.pdom if role == "primary" else self.sdom

    async def restart(self, role: str) -> None:
        """Power a cut domain back on and open its controller on what survived
        (recovery, not a format)."""
        if role == "primary":
            self.pdom = self.pdom.power_on()
            await self.open_primary()
        else:
            self.sdom = self.sdom.power_on()
            await self.open_secondary()
            if self.primary is not None:
                self.primary.cycle.link_lost()  # a new link: the primary says hello before the next CG

    async def cut(self, role: str) -> None:
        """Cut power to one controller now and bring it back."""
        self.domain(role).cut()
        await self.restart(role)

    # -- what the checks read (no latency, no faults) -------------------------------------------
    async def read_b(self) -> list[bytes]:
        devs = self.sdom.devices
        return [await devs[2 * i].read(0, devs[2 * i].info.num_blocks) for i in range(len(self.names))]


# ================================================================ a session's links
class SimMemberPort(MemberPort):
    """The master's control link to subordinate ``ctl``: a seeded hop each
    way; down (or the member's power off) is a ConnectionError. ``world``
    gives the member's current LocalMember (a restart makes a new one)."""

    def __init__(self, world, ctl: int, name: str) -> None:
        self.world, self.ctl, self.name = world, ctl, name

    async def _go(self, what: str, *args):
        sim: Sim = self.world.sim
        for leg in ("request", "answer"):
            await sim.delay(sim.link_latency)
            if self.world.pairs[self.ctl].pdom.dead or self.world.members.get(self.ctl) is None:
                raise ConnectionError(f"{self.name}: no power ({what} {leg})")
            if not sim.quiet and sim.ctl_down_until.get(self.ctl, -1.0) > sim.clock.now():
                raise ConnectionError(f"{self.name}: control link down ({what} {leg}, sim)")
            if leg == "request":
                try:
                    call = asyncio.ensure_future(getattr(self.world.members[self.ctl], what)(*args))
                    # Runs on at the member if the master goes; the master stops
                    # waiting if the member's box goes (its link drops then), as the
                    # member's call may wait for ever on tasks that died with it.
                    await asyncio.wait({call, self.world.death_of(self.ctl)}, return_when=asyncio.FIRST_COMPLETED)
                    if not call.done():
                        raise ConnectionError(f"{self.name}: lost power ({what})")
                    out = call.result()
                except PowerLost:
                    # The member's box died in the call: to the master, whose own
                    # box runs on, that is a dropped control link (as SimFlashPort).
                    if self.world.pairs[self.ctl].pdom.dead:
                        raise ConnectionError(f"{self.name}: lost power ({what})") from None
                    raise
        return out

    async def hello(self, session_id: str) -> MemberState:
        return await self._go("hello", session_id)

    async def start(self, seq: int) -> None:
        await self._go("start", seq)

    async def run(self, seq: int) -> None:
        await self._go("run", seq)

    async def drain(self, seq: int) -> None:
        await self._go("drain", seq)

    async def prepare(self, seq: int) -> None:
        await self._go("prepare", seq)

    async def commit(self, seq: int) -> None:
        await self._go("commit", seq)

    async def fail(self, seq: int, reason: str) -> None:
        await self._go("fail", seq, reason)

    async def status(self) -> MemberState:
        return await self._go("status")


class SimFlashPort:
    """Session recovery's way to member ``ctl``'s secondary (its current
    object; ConnectionError while it has no power)."""

    def __init__(self, world, ctl: int) -> None:
        self.world, self.ctl = world, ctl

    async def _go(self, what: str, *args):
        sim: Sim = self.world.sim
        await sim.delay(sim.link_latency)
        pair = self.world.pairs[self.ctl]
        if pair.sdom.dead or pair.secondary is None:
            raise ConnectionError(f"c{self.ctl}: the secondary has no power")
        try:
            return await delivered(getattr(pair.secondary, what)(*args))
        except PowerLost:
            raise ConnectionError(f"c{self.ctl}: the secondary lost power") from None

    async def recovery_state(self) -> RecoveryState:
        return await self._go("recovery_state")

    async def commit_flash(self, seq: int) -> None:
        await self._go("commit_flash", seq)

    async def revert_flash(self, seq: int) -> None:
        await self._go("revert_flash", seq)

    async def fast_reverse_restore(self) -> int:
        return await self._go("fast_reverse_restore")
