"""Fault injectors that wear the face of what they wrap (after nbdkit's filters).

- ``FaultyLink(inner, plan)``: a hal Link that drops, delays, truncates,
  corrupts, duplicates or reorders frames as its ``LinkFaultPlan`` says.
- ``LinkProxy(listen, upstream, plan)``: a TCP proxy between two controller
  processes that passes every frame through a FaultyLink; ``cut()`` drops
  the connections at a moment the test chooses.
- ``FaultyDevice(inner, plan)``: a BlockDevice that fails or delays the I/O a
  ``DeviceFaultPlan`` names.

Plans are deterministic from their seed and count what they did, so a test
can assert on the faults that really happened.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.link import Framing, TcpLink, connect_link, listen_links
from hal.block import BlockDevice, DeviceError
from hal.link import Link, LinkDown

log = logging.getLogger(__name__)


@dataclass
class LinkFaultPlan:
    """What to do to frames going one way (``direction``: send, recv, both).

    ``match`` picks the frames the plan looks at (all by default); counts
    are over matching frames. ``drop_after=N`` breaks the link when the
    N+1-th matching frame would pass. Rates are probabilities per frame.
    """

    seed: int = 0
    direction: str = "send"
    match: Callable[[bytes], bool] | None = None
    drop_after: int | None = None
    corrupt: float = 0.0
    truncate: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_s: float = 0.0
    reorder_hold_s: float = 0.02  # a held frame goes out after this even if nothing follows
    done: Counter = field(default_factory=Counter)
    seen: int = 0

    def __post_init__(self) -> None:
        if self.direction not in ("send", "recv", "both"):
            raise ValueError(f"direction {self.direction!r}: send, recv or both")
        self._rng = random.Random(self.seed)

    def applies(self, way: str, frame: bytes) -> bool:
        if self.direction not in (way, "both"):
            return False
        return self.match is None or self.match(frame)

    def roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def mangle(self, frame: bytes) -> bytes:
        b = bytearray(frame)
        i = self._rng.randrange(len(b))
        b[i] ^= 1 << self._rng.randrange(8)
        return bytes(b)

    def cut_point(self, frame: bytes) -> int:
        return self._rng.randrange(1, max(2, len(frame)))


class FaultyLink(Link):
    def __init__(self, inner: Link, plan: LinkFaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self._held: bytes | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        self._inbox: list[bytes] = []
        self._broken = False

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def _break(self, why: str) -> LinkDown:
        self._broken = True
        self.plan.done[why] += 1
        log.info("fault: %s on link to %s", why, self.peer)
        await self.inner.close()
        return LinkDown(f"fault injected: {why}")

    async def _before(self, way: str, frame: bytes) -> list[bytes]:
        """The frames to pass on instead of ``frame`` (maybe none)."""
        plan = self.plan
        if not plan.applies(way, frame):
            return [frame]
        plan.seen += 1
        if plan.drop_after is not None and plan.seen > plan.drop_after:
            raise await self._break("drop")
        if plan.delay_s:
            plan.done["delay"] += 1
            await asyncio.sleep(plan.delay_s)
        if plan.roll(plan.truncate):
            # Part of the frame, then the connection dies: the peer sees a
            # frame cut short.
            raw = getattr(self.inner, "_writer", None)
            if raw is not None and way == "send":
                raw.write(frame[: plan.cut_point(frame)])
            raise await self._break("truncate")
        if plan.roll(plan.corrupt):
            plan.done["corrupt"] += 1
            frame = plan.mangle(frame)
        out = [frame]
        if plan.roll(plan.duplicate):
            plan.done["duplicate"] += 1
            out = [frame, frame]
        return out

    # -- send side -------------------------------------------------------------
    async def send(self, frame: bytes) -> None:
        if self._broken:
            raise LinkDown("fault injected: link already broken")
        frames = await self._before("send", frame)
        if self.plan.applies("send", frame) and self._held is None and self.plan.roll(self.plan.reorder):
            self.plan.done["reorder"] += 1
            self._held = frames[0]
            frames = frames[1:]
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(self.plan.reorder_hold_s, lambda: asyncio.ensure_future(self._release()))
            for f in frames:
                await self.inner.send(f)
            return
        for f in frames:
            await self.inner.send(f)
        await self._release()

    async def _release(self) -> None:
        held, self._held = self._held, None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if held is not None and not self._broken:
            try:
                await self.inner.send(held)
            except LinkDown:
                pass

    # -- receive side ------------------------------------------------------------
    async def recv(self) -> bytes:
        if self._broken:
            raise LinkDown("fault injected: link already broken")
        while not self._inbox:
            frame = await self.inner.recv()
            frames = await self._before("recv", frame)
            if frames and self.plan.applies("recv", frame) and self.plan.roll(self.plan.reorder):
                # Swap with the next frame (the one after comes first).
                self.plan.done["reorder"] += 1
                following = await self.inner.recv()
                frames = [following, *frames]
            self._inbox.extend(frames)
        return self._inbox.pop(0)

    async def close(self) -> None:
        self._broken = True
        if self._held_timer is not None:
            self._held_timer.cancel()
        await self.inner.close()


class LinkProxy:
    """A TCP proxy for process tests: listen, connect upstream, pump frames
    both ways through FaultyLinks (``to_upstream`` and ``to_client`` plans)."""

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        plan: LinkFaultPlan | None = None,
        *,
        framing: Framing,
        reverse_plan: LinkFaultPlan | None = None,
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.plan = plan or LinkFaultPlan()
        self.reverse_plan = reverse_plan or LinkFaultPlan()
        self.framing = framing
        self._server: asyncio.AbstractServer | None = None
        self._links: set[Link] = set()
        self.connections = 0
        self.blocked = False  # True: accept and close at once (the network is down)

    async def start(self) -> tuple[str, int]:
        self._server = await listen_links(*self.listen, self._pump, framing=self.framing)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        return self.address

    async def _pump(self, client: TcpLink) -> None:
        if self.blocked:
            return
        self.connections += 1
        try:
            server = await connect_link(*self.upstream, framing=self.framing)
        except LinkDown as e:
            log.info("proxy: upstream unreachable: %s", e)
            return
        up = FaultyLink(server, self.plan)
        down = FaultyLink(client, self.reverse_plan)
        self._links |= {up, down}

        async def pipe(src: Link, dst: Link) -> None:
            try:
                while True:
                    await dst.send(await src.recv())
            except LinkDown:
                pass
            finally:
                await src.close()
                await dst.close()

        try:
            await asyncio.gather(pipe(client, up), pipe(server, down))
        finally:
            self._links -= {up, down}

    async def cut(self) -> int:
        """Drop every connection now; returns how many were cut."""
        links = list(self._links)
        for link in links:
            await link.close()
        return len(links) // 2

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class DeviceFaultPlan:
    """Fail or delay device I/O: ``fail_after`` matching operations succeed,
    then each fails with ``errno`` (``fail_count`` times, None: forever);
    ``fail_rate`` fails at random; ``delay_s`` slows every matching op."""

    ops: frozenset[str] = frozenset({"write"})  # read, write, flush, discard, zeroout
    fail_after: int | None = None
    fail_count: int | None = None
    fail_rate: float = 0.0
    delay_s: float = 0.0
    err: int = errno.EIO
    seed: int = 0
    done: Counter = field(default_factory=Counter)
    seen: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def should_fail(self, op: str) -> bool:
        if op not in self.ops:
            return False
        self.seen += 1
        fail = self.fail_after is not None and self.seen > self.fail_after
        if fail and self.fail_count is not None:
            fail = self.done["fail"] < self.fail_count
        if not fail and self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            fail = True
        return fail


class FaultyDevice(BlockDevice):
    """Wraps any BlockDevice; the firmware cannot tell it from the real one."""

    def __init__(self, inner: BlockDevice, plan: DeviceFaultPlan) -> None:
        super().__init__(inner.info)
        self.inner = inner
        self.plan = plan

    async def _before(self, op: str, lba: int, count: int) -> None:
        plan = self.plan
        if op in plan.ops and plan.delay_s:
            plan.done["delay"] += 1
            await asyncio.sleep(plan.delay_s)
        if plan.should_fail(op):
            plan.done["fail"] += 1
            raise DeviceError(plan.err, f"injected fault: {op} at lba {lba} (+{count})", self.info.url)

    async def _read(self, lba: int, count: int) -> bytes:
        await self._before("read", lba, count)
        return await self.inner.read(lba, count)

    async def _write(self, lba: int, data, fua: bool) -> None:
        await self._before("write", lba, len(data) // self.info.block_size)
        await self.inner.write(lba, data, fua=fua)

    async def _flush(self) -> None:
        await self._before("flush", 0, 0)
        await self.inner.flush()

    async def _discard(self, lba: int, count: int) -> None:
        await self._before("discard", lba, count)
        await self.inner.discard(lba, count)

    async def _zeroout(self, lba: int, count: int) -> None:
        await self._before("zeroout", lba, count)
        await self.inner.zeroout(lba, count)

    def _close(self) -> None:
        self.inner.close()


class LinkProxyThread:
    """A LinkProxy on its own event loop in a thread, for synchronous callers
    (process-level tests and the fault campaign)."""

    def __init__(self, upstream: str, plan=None, reverse_plan=None) -> None:
        from harness.controller import LINK_FRAMING

        host, port = upstream.rsplit(":", 1)
        self.proxy = LinkProxy(("127.0.0.1", 0), (host, int(port)), plan, framing=LINK_FRAMING,
                               reverse_plan=reverse_plan)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        host, port = self.call(self.proxy.start())
        self.address = f"{host}:{port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def cut(self) -> int:
        return self.call(self.proxy.cut())

    def close(self) -> None:
        try:
            self.call(self.proxy.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
