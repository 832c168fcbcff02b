"""The master's side of the control link: ``ControlRemote``, a MemberPort
whose calls travel as sealed frames to a subordinate's ControlService.

Each call sends one request and waits, at most its timeout, for the reply
with the request's seq in ``acked``; several calls may be in flight (a
``status`` while a ``drain`` runs). A refused request raises MemberError;
a member that cannot be reached raises ``LinkDown`` (a ConnectionError) at
once, so one unreachable member fails the CG quickly, while a background
task reconnects with exponential backoff. A frame that fails the channel's
checks (MAC, sequence, CRC) drops the connection with a log line; the
calls in flight on it raise LinkDown.

The same class, pointed at a member's secondary (its replication port),
is that secondary's ``FlashPort`` for session recovery: ``recovery_state``,
``commit_flash``, ``revert_flash`` and ``fast_reverse_restore`` travel as
the FLASH_* frames (firmware/control_service.py says why that path).

``ControlRemote`` alone owns this member's link state: it emits ``change
member name:… link:up|down``, once per change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from firmware import control_protocol as cp
from firmware import frames as p
from firmware.control_channel import ControlRefused, SealedChannel, open_master
from firmware.events import EventBus
from firmware.link_handshake import HANDSHAKE_TIMEOUT_S, RandomBytes, with_deadline
from firmware.member import MemberError, MemberPort, MemberState, RecoveryState
from firmware.remote_tasks import cancel_tasks, fail_pending
from hal.clock import AsyncioClock, Clock
from hal.link import Link, LinkDown

log = logging.getLogger(__name__)

LinkFactory = Callable[[], Awaitable[Link]]


class ControlRemote(MemberPort):
    def __init__(
        self,
        name: str,
        link_factory: LinkFactory,
        secret: bytes,
        *,
        session_id: str,
        random_bytes: RandomBytes,
        master_name: str = "master",
        clock: Clock | None = None,
        call_timeout_s: float = 5.0,
        drain_timeout_s: float = 300.0,
        backoff_s: tuple[float, float] = (0.05, 2.0),
        events: EventBus | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the control link needs a non-empty shared secret")
        self.name = name
        self._factory = link_factory
        self._secret = secret
        self.session_id = session_id
        self._random = random_bytes
        self._master_name = master_name
        self._clock = clock or AsyncioClock()
        self.call_timeout_s = call_timeout_s
        self.drain_timeout_s = drain_timeout_s  # a drain sends every OOS track: it may take long
        self._backoff_min_s, self._backoff_max_s = backoff_s
        self.events = events
        self._channel: SealedChannel | None = None
        self._reader: asyncio.Task | None = None
        self._reconnector: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, SealedChannel]] = {}
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self.last_error = ""
        self.stats = {"calls": 0, "handshakes": 0, "drops": 0, "timeouts": 0, "bad_frames": 0}

    # -- link state ------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self._channel is not None

    def _emit(self, link: str, **fields) -> None:
        if self.events is not None:
            self.events.emit("change", "member", name=self.name, link=link, **fields)

    async def connect(self) -> None:
        """One attempt to connect and pair. LinkDown (or ControlRefused) when it
        fails; a background task keeps trying with backoff."""
        if self._closed:
            raise LinkDown(f"member {self.name}: control link closed")
        async with self._connect_lock:
            if self._channel is not None:
                return
            try:
                await self._open()
            except (ConnectionError, TimeoutError, p.ProtocolError) as e:
                self.last_error = str(e)
                self._start_reconnector()
                if isinstance(e, ConnectionError):
                    raise
                raise LinkDown(str(e)) from None

    def start_connecting(self) -> None:
        """Connect in the background (with backoff) until the member answers."""
        self._start_reconnector(first_delay_s=0.0)

    async def _open(self) -> None:
        link = await self._factory()
        try:
            channel = await with_deadline(
                self._clock, open_master(link, self._secret, self.session_id, self._master_name, self._random),
                HANDSHAKE_TIMEOUT_S, f"member {self.name} handshake")
        except BaseException:
            await link.close()
            raise
        self.stats["handshakes"] += 1
        self._channel = channel
        self._reader = asyncio.ensure_future(self._read_loop(channel))
        log.info("member %s: control link up (%s)", self.name, link.peer)
        self._emit("up", peer=link.peer)

    def _start_reconnector(self, first_delay_s: float | None = None) -> None:
        if self._closed:
            return
        if self._reconnector is None or self._reconnector.done():
            delay = self._backoff_min_s if first_delay_s is None else first_delay_s
            self._reconnector = asyncio.ensure_future(self._reconnect_loop(delay))

    async def _reconnect_loop(self, delay: float) -> None:
        while not self._closed and self._channel is None:
            await self._clock.sleep(delay)
            delay = min(self._backoff_max_s, max(delay * 2, self._backoff_min_s))
            async with self._connect_lock:
                if self._closed or self._channel is not None:
                    return
                try:
                    await self._open()
                except (ConnectionError, TimeoutError, p.ProtocolError) as e:
                    if str(e) != self.last_error:
                        log.warning("member %s: reconnect failed (retrying with backoff): %s", self.name, e)
                    self.last_error = str(e)

    async def _drop(self, channel: SealedChannel, why: str) -> None:
        if self._channel is channel:
            self._channel = None
            self.stats["drops"] += 1
            self.last_error = why
            log.warning("member %s: control link to %s down: %s", self.name, channel.peer, why)
            self._emit("down", peer=channel.peer, reason=why)
        fail_pending(self._pending, channel, LinkDown(f"member {self.name}: control link down: {why}"))
        await channel.close()
        self._start_reconnector()

    async def _read_loop(self, channel: SealedChannel) -> None:
        try:
            while True:
                try:
                    frame = await channel.recv()
                except p.ProtocolError as e:
                    self.stats["bad_frames"] += 1
                    log.warning("member %s: refused a frame from %s: %s", self.name, channel.peer, e)
                    await channel.refuse(e.code, f"refused: {e}")
                    await self._drop(channel, f"bad frame: {e}")
                    return
                if isinstance(frame, (cp.MemberAck, cp.MemberReport, cp.FlashReport)):
                    entry = self._pending.get(frame.acked)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(frame)
                    else:
                        log.debug("member %s: reply to unknown or finished request %d", self.name, frame.acked)
                elif isinstance(frame, p.Error):
                    await self._drop(channel, f"subordinate error: {p.PeerError(frame.code, frame.message)}")
                    return
                else:
                    msg = f"unexpected {frame.KIND.name} from the subordinate"
                    await channel.refuse(p.ErrorCode.STATE, msg)
                    await self._drop(channel, msg)
                    return
        except LinkDown as e:
            await self._drop(channel, str(e))

    # -- calls -------------------------------------------------------------------
    async def _call(self, frame: p.Frame, timeout_s: float | None = None) -> p.Frame:
        if self._closed:
            raise LinkDown(f"member {self.name}: control link closed")
        if self._channel is None and (self._reconnector is None or self._reconnector.done()):
            await self.connect()  # never connected (or given up): one attempt now
        channel = self._channel
        if channel is None:
            raise LinkDown(f"member {self.name} unreachable: {self.last_error or 'reconnecting'}")
        fut = asyncio.get_running_loop().create_future()
        seq = 0

        def register(s: int) -> None:
            nonlocal seq
            seq = s
            self._pending[s] = (fut, channel)

        self.stats["calls"] += 1
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            try:
                await channel.send(frame, before_send=register)
            except LinkDown as e:
                await self._drop(channel, str(e))
                raise
            try:
                reply = await with_deadline(self._clock, fut, timeout,
                                            f"member {self.name} {frame.KIND.name}")
            except TimeoutError:
                self.stats["timeouts"] += 1
                raise
        finally:
            self._pending.pop(seq, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: raised above or moot
            elif not fut.done():
                fut.cancel()
        if isinstance(reply, cp.MemberAck) and reply.status != p.AckStatus.OK:
            word = "refused" if reply.status == p.AckStatus.REFUSED else "failed"
            raise MemberError(f"member {self.name} {word} {frame.KIND.name}: {reply.message}")
        return reply

    async def _state(self, frame: p.Frame) -> MemberState:
        reply = await self._call(frame)
        if not isinstance(reply, cp.MemberReport):
            raise MemberError(f"member {self.name} answered {frame.KIND.name} without its state")
        return reply.state

    async def hello(self, session_id: str) -> MemberState:
        return await self._state(cp.MemberHello(session_id=session_id))

    async def status(self) -> MemberState:
        return await self._state(cp.MemberStatus())

    async def start(self, seq: int) -> None:
        await self._call(cp.MemberStart(cg_seq=seq))

    async def run(self, seq: int) -> None:
        await self._call(cp.MemberRun(cg_seq=seq))

    async def drain(self, seq: int) -> None:
        await self._call(cp.MemberDrain(cg_seq=seq), self.drain_timeout_s)

    async def prepare(self, seq: int) -> None:
        await self._call(cp.MemberPrepare(cg_seq=seq))

    async def commit(self, seq: int) -> None:
        await self._call(cp.MemberCommit(cg_seq=seq))

    async def fail(self, seq: int, reason: str) -> None:
        await self._call(cp.MemberFail(cg_seq=seq, reason=reason))

    # -- FlashPort: a member's secondary, for session recovery -----------------------
    async def _flash(self, frame: p.Frame, timeout_s: float | None = None) -> cp.FlashReport:
        reply = await self._call(frame, timeout_s)
        if not isinstance(reply, cp.FlashReport):
            raise MemberError(f"secondary {self.name} answered {frame.KIND.name} without its state")
        return reply

    async def recovery_state(self) -> RecoveryState:
        reply = await self._flash(cp.FlashState())
        return RecoveryState(committed_seq=reply.committed_seq, prepared_seq=reply.prepared_seq or None)

    async def commit_flash(self, seq: int) -> None:
        await self._call(cp.FlashCommit(cg_seq=seq))

    async def revert_flash(self, seq: int) -> None:
        await self._call(cp.FlashRevert(cg_seq=seq))

    async def fast_reverse_restore(self) -> int:
        return (await self._flash(cp.FlashRestore(), self.drain_timeout_s)).grains

    async def close(self) -> None:
        self._closed = True
        await cancel_tasks(self._reconnector, self._reader)
        channel = self._channel
        if channel is not None:
            await self._drop(channel, "closed")


__all__ = ["ControlRefused", "ControlRemote"]
