"""The answering side of the control link: ``ControlService``.

It runs the handshake (firmware/control_channel.py), then answers each
sealed request by calling the object it was given, through one table of
bound methods built once from what that object offers:

- a ``MemberPort`` (a subordinate primary's LocalMember, or a test's fake):
  the MEMBER_* frames, the master driving its CGs;
- a ``FlashPort`` (a session member's Secondary): the FLASH_* frames,
  session recovery (``recovery_state``, ``commit_flash``, ``revert_flash``,
  ``fast_reverse_restore``).

Requests run concurrently (at most ``inflight``), so a ``status`` is
answered while a ``drain`` runs; each gets one reply. A frame that fails the
channel's checks (MAC, sequence, CRC), or a request of a kind the table does
not know, is refused with a log line, an ERROR frame, and the connection
closed, before it reaches the member.

How session recovery reaches the secondaries: straight from the master (or
``mirrorfw recover``) to each member's secondary, on the secondary's own
replication port, over this same sealed channel. ``serve_link_or_control``
looks at a new connection's first frame: HELLO goes to the replication
service (a primary), CONTROL_HELLO to a ControlService over the Secondary.
That is the simpler of the two authenticated paths (the other, through each
subordinate primary and new FlashPort requests on its data link, needs the
primary alive): the channel is authenticated by the session secret every
member already holds, replay-protected, needs no new port, and it works when
every primary is gone, which is when failover needs it.

One master at a time: a newly paired link replaces the old one. When the
master's link goes down, a master that is gone cannot release held acks or
end the CG: the service tells the member (``MemberPort.master_lost``;
LocalMember fails its CG in flight, in doubt from prepare on), then fails
through the MemberPort a CG the master started and left before prepare;
from prepare on that CG is left for ``session recover``, which alone knows
whether another member committed it. A new master's link is announced to
the member (``MemberPort.master_joined``), for its status.

``ControlService`` owns the subordinate's view of its master's link: it
emits ``change master link:up|down``, once per change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from firmware import control_protocol as cp
from firmware import frames as p
from firmware.control_channel import ControlRefused, SealedChannel, accept_subordinate
from firmware.events import EventBus
from firmware.link_handshake import HANDSHAKE_TIMEOUT_S, RandomBytes, with_deadline
from firmware.member import FlashPort, MemberError, MemberPort, MemberState, RecoveryState
from hal.clock import AsyncioClock, Clock
from hal.link import Link, LinkDown

log = logging.getLogger(__name__)

MASTER_GONE = "the master's control link went down"


class ControlService:
    def __init__(
        self,
        member: MemberPort | FlashPort,
        secret: bytes,
        session_id: str | None = None,
        *,
        random_bytes: RandomBytes,
        clock: Clock | None = None,
        inflight: int = 16,
        events: EventBus | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the control link needs a non-empty shared secret")
        self.member = member
        # What each request frame asks of the member, decided once here from
        # what it offers (a MemberPort, a FlashPort, or both); the frame's
        # body fields are the method's arguments, in order.
        methods = {
            cp.MemberHello: "hello", cp.MemberStatus: "status", cp.MemberStart: "start", cp.MemberRun: "run",
            cp.MemberDrain: "drain", cp.MemberPrepare: "prepare", cp.MemberCommit: "commit",
            cp.MemberFail: "fail", cp.FlashState: "recovery_state", cp.FlashCommit: "commit_flash",
            cp.FlashRevert: "revert_flash", cp.FlashRestore: "fast_reverse_restore",
        }
        self._calls: dict[type[p.Frame], Callable[..., Awaitable[object]]] = {
            frame: getattr(member, name) for frame, name in methods.items() if callable(getattr(member, name, None))
        }
        self._secret = secret
        self.session_id = session_id
        self._random = random_bytes
        self._clock = clock or AsyncioClock()
        self._slots = asyncio.Semaphore(inflight)
        self._tasks: set[asyncio.Task] = set()
        self._active: SealedChannel | None = None
        self._open_cg: int | None = None  # started by the master, not yet prepared, committed or failed
        self.events = events
        self.rejected: list[str] = []  # one line per refused peer or frame, for status and tests
        self.stats = {"links": 0, "requests": 0, "rejected": 0, "bad_frames": 0}

    @property
    def link_up(self) -> bool:
        return self._active is not None

    @property
    def master(self) -> str:
        """The master's name and address while its link is up, else ''."""
        ch = self._active
        return f"{ch.peer_name}@{ch.peer}" if ch is not None else ""

    def _emit(self, link: str, **fields) -> None:
        if self.events is not None:
            self.events.emit("change", "master", link=link, **fields)

    def _note_refusal(self, peer: str, message: str) -> None:
        self.stats["rejected"] += 1
        line = f"control link from {peer or 'peer'} refused: {message}"
        self.rejected.append(line)
        log.warning("%s", line)

    async def serve(self, link: Link) -> None:
        """Serve one connection until it drops or misbehaves."""
        try:
            channel = await with_deadline(
                self._clock, accept_subordinate(link, self._secret, self.session_id, self._random),
                HANDSHAKE_TIMEOUT_S, "control handshake")
        except ControlRefused as e:
            self._note_refusal(link.peer, str(e))
            await link.close()
            return
        except TimeoutError as e:
            self._note_refusal(link.peer, str(e))
            await link.close()
            return
        except LinkDown as e:
            log.info("control link from %s dropped during the handshake: %s", link.peer, e)
            await link.close()
            return
        previous, self._active = self._active, channel
        if previous is not None:
            log.warning("control link from %s replaces the one from %s", channel.peer, previous.peer)
            self._emit("down", peer=previous.peer, reason=f"replaced by a link from {channel.peer}")
            await previous.close()
        self.stats["links"] += 1
        log.info("control link up from master %s (%s)", channel.peer_name, channel.peer)
        self._emit("up", peer=channel.peer, name=channel.peer_name)
        joined = getattr(self.member, "master_joined", None)
        if joined is not None:
            joined(self.master)
        try:
            await self._dispatch(channel)
        except LinkDown as e:
            log.info("control link from %s down: %s", channel.peer, e)
        finally:
            await channel.close()
            if self._active is channel:
                self._active = None
                self._emit("down", peer=channel.peer)
                await self._master_gone()

    async def _dispatch(self, channel: SealedChannel) -> None:
        while True:
            try:
                frame = await channel.recv()
            except p.ProtocolError as e:
                self.stats["bad_frames"] += 1
                self._note_refusal(channel.peer, f"bad frame: {e}")
                await channel.refuse(e.code, f"refused: {e}")
                return
            call = self._calls.get(type(frame))
            if call is None:
                if isinstance(frame, p.Error):
                    log.warning("master %s closed the control link: %s", channel.peer,
                                p.PeerError(frame.code, frame.message))
                else:
                    msg = f"unexpected {frame.KIND.name} after the handshake"
                    self._note_refusal(channel.peer, msg)
                    await channel.refuse(p.ErrorCode.STATE, msg)
                return
            self.stats["requests"] += 1
            await self._slots.acquire()
            task = asyncio.ensure_future(self._answer(channel, frame, call))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._slots.release()
        self._tasks.discard(task)

    async def _answer(self, channel: SealedChannel, frame: p.Frame, call) -> None:
        args = [getattr(frame, f.name) for f in dataclasses.fields(frame) if f.name not in ("seq", "flags")]
        if isinstance(frame, cp.MemberStart):
            self._open_cg = frame.cg_seq
        try:
            result = await call(*args)
        except MemberError as e:
            reply: p.Frame = cp.MemberAck(acked=frame.seq, status=p.AckStatus.REFUSED, message=str(e))
        except Exception as e:  # noqa: BLE001 - a failed request is answered, the link stays
            log.warning("%s(%s) failed: %s", frame.KIND.name, ", ".join(map(str, args)), e)
            reply = cp.MemberAck(acked=frame.seq, status=p.AckStatus.FAILED, message=f"{type(e).__name__}: {e}")
        else:
            if isinstance(result, MemberState):
                reply = cp.MemberReport(acked=frame.seq, state=result)
            elif isinstance(result, RecoveryState):
                reply = cp.FlashReport(acked=frame.seq, committed_seq=result.committed_seq,
                                       prepared_seq=result.prepared_seq or 0)
            elif isinstance(frame, cp.FlashRestore):
                reply = cp.FlashReport(acked=frame.seq, committed_seq=0, grains=int(result or 0))
            else:
                reply = cp.MemberAck(acked=frame.seq)
        if isinstance(frame, (cp.MemberPrepare, cp.MemberCommit, cp.MemberFail)) and self._open_cg == frame.cg_seq:
            self._open_cg = None
        try:
            await channel.send(reply)
        except LinkDown:
            pass  # the master learns from its own side of the drop
        except p.ProtocolError as e:  # a state that does not fit the wire
            await channel.send(cp.MemberAck(acked=frame.seq, status=p.AckStatus.FAILED, message=str(e)))

    async def _master_gone(self) -> None:
        """The member's own word first (``master_lost``); then wait for the
        calls still running and fail a CG the master left before prepare."""
        lost = getattr(self.member, "master_lost", None)
        if lost is not None:
            lost(MASTER_GONE)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        seq, self._open_cg = self._open_cg, None
        if seq is None or self._active is not None:
            return
        log.warning("failing CG %d here: %s before its prepare", seq, MASTER_GONE)
        try:
            await self.member.fail(seq, MASTER_GONE)
        except MemberError as e:  # it ended there already (master_lost failed it)
            log.info("failing CG %d after the master left: %s", seq, e)
        except Exception as e:  # noqa: BLE001 - nothing more to do than say so
            log.warning("failing CG %d after the master left: %s", seq, e)

    async def close(self) -> None:
        channel, self._active = self._active, None
        if channel is not None:
            await channel.close()
            self._emit("down", peer=channel.peer, reason="closed")
        for task in list(self._tasks):
            task.cancel()


# -- one port for the replication link and session recovery --------------------------


class _Replayed(Link):
    """A link whose first frame was read already: recv gives it back once."""

    def __init__(self, link: Link, first: bytes) -> None:
        self._link = link
        self._first: bytes | None = first

    async def send(self, frame: bytes) -> None:
        await self._link.send(frame)

    async def recv(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._link.recv()

    async def close(self) -> None:
        await self._link.close()

    @property
    def peer(self) -> str:
        return self._link.peer


async def serve_link_or_control(link: Link, replication: Callable[[Link], Awaitable[None]],
                                control: Callable[[Link], Awaitable[None]] | None,
                                clock: Clock | None = None) -> None:
    """A session member's secondary port: a primary opens with HELLO (the
    replication link), session recovery with CONTROL_HELLO (``control``, a
    ControlService over the Secondary). Any other first frame, and a
    CONTROL_HELLO without ``control``, go to the replication service, which
    refuses them with its usual ERROR."""
    try:
        first = await with_deadline(clock or AsyncioClock(), link.recv(), HANDSHAKE_TIMEOUT_S, "first frame")
    except (LinkDown, TimeoutError) as e:
        log.info("link from %s: no first frame: %s", link.peer, e)
        await link.close()
        return
    kind = _kind_of(first)
    target = control if control is not None and kind == cp.ControlKind.CONTROL_HELLO else replication
    await target(_Replayed(link, first))


def _kind_of(frame: bytes) -> int | None:
    if len(frame) < p.HEADER_BYTES:
        return None  # too short to have a header: the replication service refuses it
    return p.HEADER.unpack_from(frame)[2]
