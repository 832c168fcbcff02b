"""The secondary's side of the replication link: ``ReplicationService``.

It runs the handshake (version, mutual HMAC challenge, session, geometry)
and answers frames by calling a ``SecondaryPort`` (the Secondary). A peer
that fails the handshake or sends a bad frame gets an ERROR frame and is
closed, before anything touches B or C. After the handshake every frame
both ways goes through a ``SealedChannel`` (firmware/sealed.py): a frame
rewritten, replayed, reordered or from another connection is refused with
a log line and the connection closes; with ``encrypt`` (the default) a
DATA payload sent in clear is refused too.

Strangers are bounded: at most ``max_handshakes`` handshakes run at once,
a few times as many connections wait for one (more are refused at once),
and waiting and handshake together last at most ``handshake_timeout_s``.
The frame size before authentication is the TCP driver's to cap
(``PREAUTH_FRAME_BYTES``), the volume count the HELLO's declaration's
(``MAX_VOLUMES``). DATA frames are written
concurrently (at most ``data_inflight``), two for the same track in the
order they came; a CG step waits until every DATA frame before it is
written. A SYNC makes durable what was acknowledged before it (the
primary syncs only acknowledged tracks, firmware/drain.py): it flushes in a
task of its own without waiting for the DATA frames still being written,
which keep coming and being written meanwhile, so the pipeline does not
drain at every sync.

``ReplicationService`` alone owns the secondary's link state: it emits the
``change link`` events (state up/down), once per change, so a reconnect
reads down then up.

The handshake, its HMAC and what both sides share are in
firmware/link_handshake.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from firmware import link_handshake as hs
from firmware import protocol as p
from firmware.events import EventBus
from firmware.remote import RemoteError, SecondaryPort, VolumeGeometry
from firmware.sealed import SealedChannel
from hal.clock import AsyncioClock, Clock
from hal.link import Link, LinkDown

log = logging.getLogger(__name__)

MAX_HANDSHAKES = 8  # handshakes at once; strangers beyond it wait
WAITING_PER_HANDSHAKE = 4  # ... up to this many per handshake slot, then are refused at once
REJECTED_KEPT = 256  # refusal lines kept for status (a flood of strangers must not grow memory)
# DATA frames written at once. Each costs a copy-on-write of its grain to C,
# a durable write, so the secondary is latency-bound: enough in flight to
# cover that latency, as many as the primary's window (firmware/link_primary.py).
DATA_INFLIGHT = 128


class ReplicationService:
    """Answers one primary at a time; a newly paired link replaces the old."""

    def __init__(
        self,
        secondary: SecondaryPort,
        secret: bytes,
        session_id: str | None = None,
        *,
        random_bytes: hs.RandomBytes,
        clock: Clock | None = None,
        data_inflight: int = DATA_INFLIGHT,
        events: EventBus | None = None,
        encrypt: bool = True,
        max_handshakes: int = MAX_HANDSHAKES,
        handshake_timeout_s: float = hs.HANDSHAKE_TIMEOUT_S,
    ) -> None:
        if not secret:
            raise ValueError("the link needs a non-empty shared secret")
        if max_handshakes < 1 or not handshake_timeout_s > 0:
            raise ValueError("max_handshakes must be at least 1 and handshake_timeout_s positive")
        self.secondary = secondary
        # What each request frame asks of the secondary, decided once here.
        self._calls: dict[type[p.Frame], Callable[..., Awaitable[None]]] = {
            p.Data: secondary.receive_track,
            p.Sync: secondary.sync,
            p.DrainDone: secondary.drain_done,
            p.Prepare: secondary.prepare,
            p.Commit: secondary.commit,
            p.Abort: secondary.abort,
        }
        self._secret = secret
        self.session_id = session_id
        self._random = random_bytes
        self._clock = clock or AsyncioClock()
        self._slots = asyncio.Semaphore(data_inflight)
        self._tasks: set[asyncio.Task] = set()
        self._syncs: set[asyncio.Task] = set()  # SYNCs flushing, answered in their own task
        self._by_track: dict[tuple[int, int], asyncio.Task] = {}
        self._active: SealedChannel | None = None
        self.events = events
        self.encrypt = encrypt  # DATA payloads must come encrypted ([link] encrypt); integrity is never optional
        self.max_handshakes = max_handshakes
        self.handshake_timeout_s = handshake_timeout_s
        self._handshake_slots = asyncio.Semaphore(max_handshakes)
        self._unpaired = 0  # connections in or waiting for a handshake
        # One line per refused peer (the newest), for status and tests.
        self.rejected: collections.deque[str] = collections.deque(maxlen=REJECTED_KEPT)
        self.stats = {"data_frames": 0, "data_bytes": 0, "links": 0, "rejected": 0, "bad_frames": 0,
                      "busy": 0, "handshake_timeouts": 0}

    @property
    def link_up(self) -> bool:
        return self._active is not None

    def _emit(self, action: str, **fields) -> None:
        if self.events is not None:
            self.events.emit(action, "link", **fields)

    async def _send(self, channel: SealedChannel, frame: p.Frame) -> None:
        try:
            await channel.send(frame)
        except LinkDown:
            pass

    async def _refuse(self, link: Link | SealedChannel, code: int, message: str) -> None:
        """Say why to the peer (sealed once there is a channel) and log it."""
        self.stats["rejected"] += 1
        line = f"link from {link.peer or 'peer'} refused: {message}"
        self.rejected.append(line)
        log.warning("%s", line)
        self._emit("call", state="refused", peer=link.peer, reason=message)
        if isinstance(link, SealedChannel):
            await link.refuse(code, message)
            return
        try:
            await link.send(p.encode(p.Error(code=int(code), message=message)))
        except LinkDown:
            pass

    async def _handshake(self, link: Link) -> tuple[str, list[str], SealedChannel] | None:
        """Pair with a primary: its session, the volume names by wire index
        and the sealed channel to it, or None when refused."""
        try:
            hello = await hs.recv_frame(link)
        except p.ProtocolError as e:
            await self._refuse(link, e.code, str(e))
            return None
        if not isinstance(hello, p.Hello):
            await self._refuse(link, p.ErrorCode.STATE, f"expected HELLO first, got {hello.KIND.name}")
            return None
        if hello.version != p.PROTOCOL_VERSION:
            await self._refuse(link, p.ErrorCode.VERSION,
                               f"HELLO version {hello.version}; this secondary speaks {p.PROTOCOL_VERSION}")
            return None
        nonce = self._random(hs.NONCE_BYTES)
        await link.send(p.encode(p.AuthChallenge(seq=hello.seq, nonce=nonce)))
        try:
            response = await hs.recv_frame(link)
        except p.ProtocolError as e:
            await self._refuse(link, e.code, str(e))
            return None
        if isinstance(response, p.Error):
            log.warning("primary %s gave up: %s", link.peer, p.PeerError(response.code, response.message))
            return None
        if not isinstance(response, p.AuthResponse):
            await self._refuse(link, p.ErrorCode.STATE, f"expected AUTH_RESPONSE, got {response.KIND.name}")
            return None
        if not hs.check_mac(self._secret, hs.PRIMARY, nonce, hello.session_id, response.mac):
            await self._refuse(link, p.ErrorCode.AUTH, "authentication failed (wrong shared secret?)")
            return None
        if len(response.challenge) < 16:
            await self._refuse(link, p.ErrorCode.AUTH, "the primary's challenge is shorter than 16 bytes")
            return None
        mac = hs.auth_mac(self._secret, hs.SECONDARY, response.challenge, hello.session_id)
        await link.send(p.encode(p.AuthResponse(seq=response.seq, mac=mac)))
        # Both sides know the session keys now: everything after is sealed.
        sealing = p.Sealing.derive(self._secret, response.challenge, nonce, hello.session_id, hs.SECONDARY,
                                   hs.PRIMARY, require_encrypted=self.encrypt)
        channel = SealedChannel(link, sealing.seal, sealing.open, hs.SECONDARY, hs.PRIMARY)
        if self.session_id is not None and hello.session_id != self.session_id:
            await self._refuse(channel, p.ErrorCode.SESSION,
                               f"session {hello.session_id!r}; this secondary serves {self.session_id!r}")
            return None
        if self.encrypt and hello.flags & p.FLAG_CLEAR:
            await self._refuse(channel, p.ErrorCode.AUTH,
                               "the primary sends DATA in clear ([link] encrypt = false there), "
                               "this secondary requires encryption ([link] encrypt = true)")
            return None
        volumes = [VolumeGeometry(n, s, t) for n, s, t in hello.volumes]
        # Wait for work of an earlier link (DATA still being written) before
        # the secondary looks at its state again.
        await self._settle()
        try:
            state = await self.secondary.hello(hello.session_id, volumes, hello.generation)
        except (RemoteError, ValueError, KeyError) as e:
            await self._refuse(channel, p.ErrorCode.GEOMETRY, str(e) or type(e).__name__)
            return None
        await channel.send(p.Status(
            acked=hello.seq, session_id=state.session_id, committed_cg=state.committed_cg,
            new=state.new, volumes=hs.wire_geometry(state.volumes),
        ))
        return hello.session_id, [v.name for v in volumes], channel

    async def _gated_handshake(self, link: Link) -> tuple[str, list[str], SealedChannel] | None:
        async with self._handshake_slots:
            return await self._handshake(link)

    async def serve(self, link: Link) -> None:
        """Serve one connection until it drops or misbehaves."""
        if self._unpaired >= self.max_handshakes * WAITING_PER_HANDSHAKE:
            self.stats["busy"] += 1
            await self._refuse(link, p.ErrorCode.STATE,
                               f"busy: {self._unpaired} connections in or waiting for a handshake")
            await link.close()
            return
        self._unpaired += 1
        try:
            paired = await hs.with_deadline(self._clock, self._gated_handshake(link), self.handshake_timeout_s,
                                            "handshake")
        except TimeoutError as e:
            self.stats["handshake_timeouts"] += 1
            await self._refuse(link, p.ErrorCode.STATE, str(e))
            paired = None
        except LinkDown as e:
            log.info("link from %s dropped during the handshake: %s", link.peer, e)
            paired = None
        finally:
            self._unpaired -= 1
        if paired is None:
            await link.close()
            return
        session_id, names, channel = paired
        previous, self._active = self._active, channel
        if previous is not None:
            # The old link's serve() no longer owns the state: say it went
            # down here, so a reconnect reads down then up, never up twice.
            log.warning("new link from %s replaces the one from %s", link.peer, previous.peer)
            self._emit("change", state="down", peer=previous.peer, reason=f"replaced by a link from {link.peer}")
        self.stats["links"] += 1
        log.info("link up from %s", link.peer)
        self._emit("change", state="up", peer=link.peer, session=session_id)
        try:
            if previous is not None:
                await previous.close()
            await self._dispatch(channel, names)
        except LinkDown as e:
            log.info("link from %s down: %s", link.peer, e)
        finally:
            if self._active is channel:
                self._active = None
                self._emit("change", state="down", peer=link.peer)
            await link.close()

    async def _dispatch(self, link: SealedChannel, names: list[str]) -> None:
        while True:
            try:
                frame = await link.recv()
            except p.ProtocolError as e:
                # Noise (BadCrc) or an attacker (BadMac, BadSequence, NotEncrypted):
                # nothing after this frame can be trusted.
                self.stats["bad_frames"] += 1
                await self._refuse(link, e.code, f"bad frame: {e}")
                return
            call = self._calls.get(type(frame))
            if call is None:
                if isinstance(frame, p.Error):
                    log.warning("primary %s closed the link: %s", link.peer, p.PeerError(frame.code, frame.message))
                else:
                    await self._refuse(link, p.ErrorCode.STATE, f"unexpected {frame.KIND.name} after the handshake")
                return
            if isinstance(frame, p.Data):
                if frame.volume >= len(names):
                    await self._send(link, p.Ack(acked=frame.seq, status=p.AckStatus.REFUSED,
                                                 message=f"volume index {frame.volume} not in the hello"))
                    continue
                await self._slots.acquire()
                key = (frame.volume, frame.track)
                task = asyncio.ensure_future(
                    self._data(link, frame, call, names[frame.volume], self._by_track.get(key)))
                self._by_track[key] = task
                self._tasks.add(task)
                task.add_done_callback(lambda t, key=key: self._data_finished(t, key))
            elif isinstance(frame, p.Sync):  # durable: what was acknowledged before it
                task = asyncio.ensure_future(self._sync(link, frame, call))
                self._syncs.add(task)
                task.add_done_callback(self._syncs.discard)
            else:  # a CG step: it applies to every DATA frame received before it
                await self._settle()
                await self._send(link, await self._answer(frame, call, frame.cg_seq))

    def _data_finished(self, task: asyncio.Task, key: tuple[int, int]) -> None:
        self._slots.release()
        self._tasks.discard(task)
        if self._by_track.get(key) is task:
            del self._by_track[key]

    async def _settle(self) -> None:
        """Wait for every DATA frame received so far to be written (and
        every SYNC received so far to be answered)."""
        while self._tasks or self._syncs:
            await asyncio.gather(*self._tasks, *self._syncs, return_exceptions=True)

    async def _sync(self, link: SealedChannel, frame: p.Sync, sync: Callable[..., Awaitable[None]]) -> None:
        """Answer a SYNC once a flush begun after it came is done: it covers
        every DATA frame acknowledged before the SYNC was sent."""
        await self._send(link, await self._answer(frame, sync, frame.cg_seq))

    async def _data(self, link: SealedChannel, frame: p.Data, receive_track: Callable[..., Awaitable[None]], volume: str,
                    before: asyncio.Task | None) -> None:
        if before is not None:  # same track twice in flight: keep their order
            await asyncio.gather(before, return_exceptions=True)
        if frame.flags & p.FLAG_RUNS:
            try:
                runs, payload = p.unpack_runs(frame.payload)
            except p.ProtocolError as e:
                ack = p.Ack(acked=frame.seq, status=p.AckStatus.REFUSED, message=str(e))
            else:
                ack = await self._answer(frame, receive_track, volume, frame.track, frame.cg_seq, payload, runs)
        else:
            ack = await self._answer(frame, receive_track, volume, frame.track, frame.cg_seq, frame.payload)
        if ack.status == p.AckStatus.OK:
            self.stats["data_frames"] += 1
            self.stats["data_bytes"] += len(frame.payload)
        await self._send(link, ack)

    async def _answer(self, frame: p.Frame, call: Callable[..., Awaitable[None]], *args) -> p.Ack:
        """Make the call a request frame asks for; the ACK that answers it."""
        try:
            await call(*args)
        except RemoteError as e:
            return p.Ack(acked=frame.seq, status=p.AckStatus.REFUSED, message=str(e))
        except Exception as e:  # noqa: BLE001 - a failed request is answered, the link stays
            log.warning("%s(%s) failed: %s", frame.KIND.name, ", ".join(map(str, args[:3])), e)
            return p.Ack(acked=frame.seq, status=p.AckStatus.FAILED, message=f"{type(e).__name__}: {e}")
        return p.Ack(acked=frame.seq)
