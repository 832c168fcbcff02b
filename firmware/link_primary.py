"""The primary's side of the replication link: RemotePort calls as frames
over a hal ``Link``.

Track sends are pipelined: up to ``window`` DATA frames are in flight, each
waiting on a future keyed by its sequence number; the window is a
semaphore, so a slow secondary pushes back on the drain instead of growing
memory. When the link drops, every call in flight raises ``LinkDown`` (the
primary's CG fails and OOS ∪ CR still names every block the secondary
lacks), and a background task reconnects with exponential backoff. A
reconnect is transparent only when the secondary is the one we knew (same
session, not new); otherwise calls raise ``RemoteError`` until the primary
calls ``connect`` again and learns that a full copy is due.

After the handshake every frame both ways goes through a ``SealedChannel``
(firmware/sealed.py): sealed with the session keys and numbered, DATA
payloads encrypted unless ``encrypt`` is off. A reply that does not open
(rewritten, replayed, reordered) drops the link like any bad frame: the
calls in flight fail with ``LinkDown`` and the link reconnects.

``LinkRemote`` alone owns the primary's link state: it emits the ``change
link`` events (state up/down), once per change, so a reconnect reads down
then up. The primary reads ``LinkRemote.link_up`` rather than keeping a copy.

The handshake, its HMAC and what both sides share are in
firmware/link_handshake.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

from firmware import link_handshake as hs
from firmware import protocol as p
from firmware.events import EventBus
from firmware.remote import RemoteError, RemotePort, RemoteState, VolumeGeometry
from firmware.remote_tasks import cancel_tasks, fail_pending
from firmware.sealed import SealedChannel
from hal.clock import AsyncioClock, Clock
from hal.link import Link, LinkDown

log = logging.getLogger(__name__)

LinkFactory = Callable[[], Awaitable[Link]]


class HandshakeRefused(RemoteError):
    """The secondary (or this side) refused the pairing: secret, version,
    session or geometry. Retrying does not help until someone fixes it."""



class LinkRemote(RemotePort):
    def __init__(
        self,
        link_factory: LinkFactory | Link,
        secret: bytes,
        *,
        random_bytes: hs.RandomBytes,
        window: int = 128,
        clock: Clock | None = None,
        backoff_s: tuple[float, float] = (0.05, 2.0),
        down_wait_s: float = 1.0,
        events: EventBus | None = None,
        encrypt: bool = True,
    ) -> None:
        if not secret:
            raise ValueError("the link needs a non-empty shared secret")
        if window < 1:
            raise ValueError(f"window {window} must be at least 1")
        if isinstance(link_factory, Link):
            only = link_factory
            used = False

            async def once() -> Link:
                nonlocal used
                if used:
                    raise LinkDown("this link was given once and cannot be reopened")
                used = True
                return only

            self._factory: LinkFactory = once
        else:
            self._factory = link_factory
        self._secret = secret
        self.encrypt = encrypt  # DATA payloads encrypted ([link] encrypt); sealed (integrity) either way
        self._random = random_bytes
        self._clock = clock or AsyncioClock()
        self._window = asyncio.Semaphore(window)
        self.window = window
        self._backoff_min_s, self._backoff_max_s = backoff_s
        self._down_wait_s = down_wait_s
        self.events = events
        self._seq = itertools.count(1)
        self._link: SealedChannel | None = None
        self._reader: asyncio.Task | None = None
        self._reconnector: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, SealedChannel]] = {}
        self._connect_lock = asyncio.Lock()
        self._up = asyncio.Event()
        self._closed = False
        self._session_id: str | None = None
        self._volumes: list[VolumeGeometry] = []
        self._generation = 0
        self._index: dict[str, int] = {}
        self.state: RemoteState | None = None
        self._unreported: RemoteState | None = None  # from a background reconnect, not yet seen by connect()
        self._stale: str | None = None  # why calls must wait for connect()
        self.last_error: str = ""
        self.stats = {"data_frames": 0, "data_bytes": 0, "data_bytes_tried": 0, "handshakes": 0, "drops": 0, "reconnect_attempts": 0}

    # -- link state ------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self._link is not None

    def _emit(self, action: str, **fields) -> None:
        if self.events is not None:
            self.events.emit(action, "link", **fields)

    async def _handshake(self, link: Link) -> tuple[RemoteState, SealedChannel]:
        session_id = self._session_id or ""
        hello = p.Hello(seq=next(self._seq), version=p.PROTOCOL_VERSION, session_id=session_id,
                        volumes=hs.wire_geometry(self._volumes), generation=self._generation,
                        flags=0 if self.encrypt else p.FLAG_CLEAR)
        await link.send(p.encode(hello))
        challenge = await self._expect(link, p.AuthChallenge)
        nonce = self._random(hs.NONCE_BYTES)
        mac = hs.auth_mac(self._secret, hs.PRIMARY, challenge.nonce, session_id)
        await link.send(p.encode(p.AuthResponse(seq=next(self._seq), mac=mac, challenge=nonce)))
        answer = await self._expect(link, p.AuthResponse)
        if not hs.check_mac(self._secret, hs.SECONDARY, nonce, session_id, answer.mac):
            msg = "the secondary failed authentication (wrong shared secret?)"
            await self._send_error(link, p.ErrorCode.AUTH, msg)
            raise HandshakeRefused(msg)
        # The secondary proved the secret: from here on every frame is sealed.
        sealing = p.Sealing.derive(self._secret, nonce, challenge.nonce, session_id, hs.PRIMARY, hs.SECONDARY,
                                   encrypt=self.encrypt, require_encrypted=False)
        channel = SealedChannel(link, sealing.seal, sealing.open, hs.PRIMARY, hs.SECONDARY)
        status = await self._expect(channel, p.Status)
        state = RemoteState(
            session_id=status.session_id, committed_cg=status.committed_cg, new=status.new,
            volumes=[VolumeGeometry(n, s, t) for n, s, t in status.volumes],
        )
        return state, channel

    async def _expect(self, link: Link | SealedChannel, cls: type[p.Frame]) -> p.Frame:
        try:
            frame = await (link.recv() if isinstance(link, SealedChannel) else hs.recv_frame(link))
        except p.ProtocolError as e:
            await self._send_error(link, e.code, str(e))
            raise HandshakeRefused(f"handshake with {link.peer}: {e}") from None
        if isinstance(frame, p.Error):
            raise HandshakeRefused(f"secondary refused the link: {p.PeerError(frame.code, frame.message)}")
        if not isinstance(frame, cls):
            msg = f"handshake: expected {cls.KIND.name}, got {frame.KIND.name}"
            await self._send_error(link, p.ErrorCode.STATE, msg)
            raise HandshakeRefused(msg)
        return frame

    async def _send_error(self, link: Link | SealedChannel, code: int, message: str) -> None:
        """Tell the secondary why (sealed once there is a channel), best effort."""
        if isinstance(link, SealedChannel):
            await link.refuse(code, message)
            return
        try:
            await link.send(p.encode(p.Error(code=int(code), message=message)))
        except LinkDown:
            pass

    async def _open(self) -> RemoteState:
        """One attempt: connect, handshake, start the reader. Under _connect_lock."""
        self.stats["reconnect_attempts"] += 1
        link = await self._factory()
        try:
            state, channel = await hs.with_deadline(self._clock, self._handshake(link), hs.HANDSHAKE_TIMEOUT_S,
                                                    "handshake")
        except BaseException:
            await link.close()
            raise
        self.stats["handshakes"] += 1
        self.epoch += 1  # a new link: what was acknowledged on the old one is not synced by this one
        self._index = {v.name: i for i, v in enumerate(self._volumes)}
        self._link = channel
        self._up.set()
        self._reader = asyncio.ensure_future(self._read_loop(channel))
        log.info("link up to %s (secondary committed CG %d, new=%s)", link.peer, state.committed_cg, state.new)
        self._emit("change", state="up", peer=link.peer, committed_cg=state.committed_cg, new=state.new)
        return state

    async def connect(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        """Hello: one attempt to connect and pair. Raises LinkDown when the
        secondary cannot be reached (a background task keeps trying), or
        RemoteError when it refuses the pairing."""
        if self._closed:
            raise LinkDown("link remote closed")
        same = (session_id == self._session_id and list(volumes) == self._volumes
                and generation == self._generation)
        self._session_id = session_id
        self._volumes = list(volumes)
        self._generation = generation
        async with self._connect_lock:
            fresh, self._unreported = self._unreported, None
            if self._link is not None and fresh is not None and same:
                # The background reconnect already said hello with these
                # volumes: hand its answer over instead of pairing again.
                self.state, self._stale = fresh, None
                return fresh
            if self._link is not None:
                await self._drop(self._link, "reconnecting for a new hello")
            try:
                state = await self._open()
            except (LinkDown, TimeoutError, p.ProtocolError) as e:
                self.last_error = str(e)
                self._start_reconnector()
                raise LinkDown(str(e)) from None
            except RemoteError as e:
                self.last_error = str(e)
                raise
        self.state = state
        self._stale = None
        return state

    def _start_reconnector(self) -> None:
        if self._closed or self._session_id is None:
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = self._backoff_min_s
        while not self._closed and self._link is None and self._stale is None:
            await self._clock.sleep(delay)
            if self._closed or self._link is not None:
                return
            async with self._connect_lock:
                if self._link is not None:
                    return
                try:
                    state = await self._open()
                except (LinkDown, TimeoutError, p.ProtocolError, RemoteError) as e:
                    if str(e) != self.last_error:
                        log.warning("reconnect failed (retrying with backoff): %s", e)
                    self.last_error = str(e)
                    delay = min(self._backoff_max_s, delay * 2)
                    continue
            known = self.state
            if known is not None and (state.new and not known.new or state.session_id != known.session_id):
                # The secondary lost what it had: only the primary can decide
                # on a full copy, so make it call connect() again.
                self._stale = f"the secondary changed while the link was down (new={state.new}); connect again"
                log.warning("%s", self._stale)
            self._unreported = state
            if self._stale is None:
                self.state = state
            return

    async def _usable(self) -> SealedChannel:
        """The current link, waiting briefly for a reconnect; LinkDown if none."""
        if self._closed:
            raise LinkDown("link remote closed")
        if self._stale is not None:
            raise RemoteError(self._stale)
        if self._link is None:
            if self._session_id is None:
                raise LinkDown("not connected: call connect() first")
            self._start_reconnector()
            self._up.clear()
            waiter = asyncio.ensure_future(self._up.wait())
            try:
                await hs.with_deadline(self._clock, waiter, self._down_wait_s, "link")
            except TimeoutError:
                raise LinkDown(f"link down: {self.last_error or 'reconnecting'}") from None
            if self._stale is not None:
                raise RemoteError(self._stale)
        link = self._link
        if link is None:
            raise LinkDown(f"link down: {self.last_error or 'reconnecting'}")
        return link

    async def _drop(self, link: SealedChannel, why: str) -> None:
        if self._link is link:
            self._link = None
            self._up.clear()
            self.stats["drops"] += 1
            self.last_error = why
            # Our own close() (a clean stop) is no trouble worth a warning.
            (log.info if self._closed else log.warning)("link to %s down: %s", link.peer, why)
            self._emit("change", state="down", peer=link.peer, reason=why)
        fail_pending(self._pending, link, LinkDown(f"link down: {why}"))
        await link.close()
        if not self._closed:
            self._start_reconnector()

    async def _read_loop(self, link: SealedChannel) -> None:
        try:
            while True:
                try:
                    frame = await link.recv()
                except p.ProtocolError as e:
                    # Corrupted, forged, replayed or reordered: nothing after
                    # this frame can be trusted; say so and start over.
                    log.warning("bad frame from %s: %s", link.peer, e)
                    await self._send_error(link, e.code, str(e))
                    await self._drop(link, f"bad frame: {e}")
                    return
                if isinstance(frame, p.Ack):
                    self._resolve(frame.acked, frame)
                elif isinstance(frame, p.Error):
                    await self._drop(link, f"secondary error: {p.PeerError(frame.code, frame.message)}")
                    return
                else:
                    msg = f"unexpected {frame.KIND.name} frame from the secondary"
                    await self._send_error(link, p.ErrorCode.STATE, msg)
                    await self._drop(link, msg)
                    return
        except LinkDown as e:
            await self._drop(link, str(e))
        except asyncio.CancelledError:
            raise

    def _resolve(self, seq: int, ack: p.Ack) -> None:
        entry = self._pending.get(seq)
        if entry is None or entry[0].done():
            log.debug("ack for unknown or finished request %d", seq)
            return
        fut = entry[0]
        if ack.status == p.AckStatus.OK:
            fut.set_result(None)
        else:
            fut.set_exception(RemoteError(ack.message or f"secondary answered status {ack.status}"))

    async def _request(self, frame: p.Frame) -> None:
        link = await self._usable()
        fut = asyncio.get_running_loop().create_future()
        sent: list[int] = []

        def register(seq: int) -> None:  # the channel numbers the frame; its ACK names that seq
            self._pending[seq] = (fut, link)
            sent.append(seq)

        try:
            try:
                await link.send(frame, before_send=register)
            except LinkDown as e:
                await self._drop(link, str(e))
                raise
            await fut
        finally:
            if sent:
                self._pending.pop(sent[0], None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a send failure already raised for it

    # -- RemotePort ----------------------------------------------------------------
    async def send_track(self, volume: str, track: int, cg_seq: int, data: bytes,
                         runs: list[tuple[int, int]] | None = None) -> None:
        try:
            index = self._index[volume]
        except KeyError:
            raise RemoteError(f"volume {volume!r} was not in the hello") from None
        if runs is None:
            frame = p.Data(volume=index, track=track, cg_seq=cg_seq, payload=bytes(data))
        else:  # the run table travels inside the sealed payload
            frame = p.Data(volume=index, track=track, cg_seq=cg_seq, flags=p.FLAG_RUNS,
                           payload=p.pack_runs(runs) + data)
        async with self._window:
            self.stats["data_bytes_tried"] += len(data)
            await self._request(frame)
        # Acknowledged: the secondary has it.
        self.stats["data_frames"] += 1
        self.stats["data_bytes"] += len(data)

    async def sync(self, cg_seq: int) -> None:
        await self._request(p.Sync(cg_seq=cg_seq))

    async def drain_done(self, cg_seq: int) -> None:
        await self._request(p.DrainDone(cg_seq=cg_seq))

    async def prepare(self, cg_seq: int) -> None:
        await self._request(p.Prepare(cg_seq=cg_seq))

    async def commit(self, cg_seq: int) -> None:
        await self._request(p.Commit(cg_seq=cg_seq))

    async def abort(self, cg_seq: int) -> None:
        await self._request(p.Abort(cg_seq=cg_seq))

    async def close(self) -> None:
        self._closed = True
        await cancel_tasks(self._reconnector, self._reader)
        link = self._link
        if link is not None:
            await self._drop(link, "closed")
