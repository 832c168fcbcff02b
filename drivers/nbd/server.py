"""NBD server: serves a hal.host.HostTarget to NBD clients.

Fixed newstyle negotiation (GO, INFO, LIST, ABORT, EXPORT_NAME,
STRUCTURED_REPLY, LIST/SET_META_CONTEXT); one export per volume. With
structured replies the ``base:allocation`` context answers BLOCK_STATUS
from the volume's ``extents`` (``nbdinfo --map``); a volume that does not
know its holes is all data. In transmission each request runs
inline up to its first real wait (a volume that answers at once costs no
task and no extra loop iteration; there is no current task during that first
step), then goes on as a task of its own, so many are in flight per
connection and replies leave in completion order.

The hot path is a ``BufferedProtocol``: the kernel receives straight into a
preallocated ring buffer (headers, small payloads) or straight into the
payload buffer of a large write; request headers are unpacked with a struct
derived from the construct declaration; replies are queued and written with
one ``writelines`` per event-loop wakeup. All bounds and alignment checks
happen here, before a volume sees the request.

What a client may hold is bounded (``NbdLimits``, issue 16): a payload
buffer grows as its bytes arrive (never the declared length up front); a
connection over its byte or request budget, or any connection while the
server is over its own, or one whose replies wait for the client to read
them, stops parsing requests until that clears; a request that takes longer
than ``stall_timeout_s`` to arrive, replies not taken for as long, an idle
connection and a slow handshake are dropped; connections past
``max_connections`` are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable

from construct import ConstructError

from hal.host import HostTarget, HostVolume

from .limits import NbdLimits
from .protocol import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    EXPORT_NAME_ZEROES,
    IHAVEOPT,
    MAX_STRING_BYTES,
    OPTION_HEADER,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    BlockStatusChunk,
    ClientFlag,
    Cmd,
    CmdFlag,
    ErrorChunk,
    ExportNameReply,
    HandshakeFlag,
    Info,
    InfoRequest,
    MetaContextReply,
    MetaContextRequest,
    NbdErrno,
    Option,
    Reply,
    ReplyType,
    ServerEntry,
    ServerGreeting,
    info_reply,
    nbd_errno,
    option_reply,
)
from .protocol import (
    TransmissionFlag as TF,
)

log = logging.getLogger(__name__)

__all__ = ["NbdLimits", "NbdServer"]

MAX_OPTION_BYTES = 64 << 10  # option data beyond this is hostile: disconnect
DISCARD_LIMIT_BYTES = 256 << 20  # oversized WRITE payloads up to this are drained, then EINVAL
RING_BYTES = 256 << 10
FIRST_PAYLOAD_BYTES = 1 << 20  # a payload buffer starts at most this big, then doubles as bytes arrive
CLOSE_WAIT_S = 10.0
REFUSED_LOG_EVERY_S = 10.0
_ZEROS = memoryview(bytes(1 << 20))  # what a growing payload buffer is extended with

_UNKNOWN_CMD_FLAGS = 0xFFFF & ~int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE)
# Plain ints on the per-request path: IntFlag's & is a Python-level call.
_FUA = int(CmdFlag.FUA)
_NOTHING = object()
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_REQ_ONE = int(CmdFlag.REQ_ONE)
ALLOCATION_CONTEXT_ID = 1  # the id base:allocation gets in SET_META_CONTEXT replies
MAX_EXTENTS = 1024  # descriptors per BLOCK_STATUS reply; the client asks again for the rest


class _Resumed:
    """A coroutine already run by hand up to its first wait, handed to a Task:
    the Task's first step gets the future the coroutine waits on (or, if that
    is already done, the coroutine goes straight on); later steps go to the
    coroutine itself."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro, first) -> None:
        self._coro = coro
        self._first = first

    def __next__(self):  # what a Task's step calls
        first = self._first
        if first is not _NOTHING:
            self._first = _NOTHING
            if first is None or not first.done():
                return first
            first._asyncio_future_blocking = False
        return self._coro.send(None)

    def send(self, value):
        if value is None:
            return self.__next__()
        self._first = _NOTHING
        return self._coro.send(value)

    def throw(self, typ, val=None, tb=None):
        self._first = _NOTHING
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._first = _NOTHING
        self._coro.close()

    def __await__(self):
        return self

    def __iter__(self):
        return self


class _Disconnect(Exception):
    """The peer broke the protocol or went away; drop the connection."""


class _Export:
    """A volume as offered on the wire: size, block sizes, and what it can do.

    The volume's capabilities (hal.host.HostVolume ``can_*``) are read once,
    here; the transmission flags advertise exactly them, and ``refused`` maps
    each command the export cannot do to the errno it gets (the same errnos
    as an unadvertised command and a write to a read-only export always got:
    EINVAL and EPERM)."""

    def __init__(self, volume: HostVolume, read_only: bool, max_request: int) -> None:
        self.volume = volume
        self.name = volume.name
        self.size = int(volume.size_bytes)
        can_write = volume.can_write() and not read_only
        can_flush = volume.can_flush()
        # FUA, trim and zero are write capabilities: a read-only export offers none of them.
        can_fua = can_write and volume.can_fua()
        can_trim = can_write and volume.can_trim()
        can_zero = can_write and volume.can_zero()
        self.read_only = not can_write
        self.min_block = max(1, int(volume.block_size or 1))
        preferred = int(volume.preferred_block_size or max(4096, self.min_block))
        self.preferred = max(preferred, self.min_block)
        self.can_extents = volume.can_extents()
        self.max_block = max(self.min_block, max_request - max_request % self.min_block)
        flags = TF.HAS_FLAGS
        if not can_write:
            flags |= TF.READ_ONLY
        if can_flush:
            flags |= TF.SEND_FLUSH
        if can_fua:
            flags |= TF.SEND_FUA
        if can_trim:
            flags |= TF.SEND_TRIM
        if can_zero:
            flags |= TF.SEND_WRITE_ZEROES
        if volume.can_multi_conn():
            flags |= TF.CAN_MULTI_CONN
        self.flags = int(flags)
        refused: dict[int, NbdErrno] = {}
        if not can_write:
            refused.update(dict.fromkeys(_WRITES, NbdErrno.EPERM))
        if can_write and not can_trim:
            refused[Cmd.TRIM] = NbdErrno.EINVAL
        if can_write and not can_zero:
            refused[Cmd.WRITE_ZEROES] = NbdErrno.EINVAL
        if not can_flush:
            refused[Cmd.FLUSH] = NbdErrno.EINVAL
        self.refused = refused
        # A FUA flag the export did not advertise is refused, except on a read-only
        # export, which has always ignored it on reads (and refuses writes with EPERM).
        self.bad_flags = _UNKNOWN_CMD_FLAGS | (_FUA if can_write and not can_fua else 0)


class NbdServer:
    """Serves every volume of ``target`` as an export named after it, within ``limits``."""

    def __init__(self, target: HostTarget, *, read_only: bool = False, limits: NbdLimits | None = None) -> None:
        self.target = target
        self.read_only = read_only
        self.limits = limits if limits is not None else NbdLimits()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self.closing = False
        # The server-wide budgets: bytes held and requests in flight over all connections.
        self.buffered = 0
        self.inflight = 0
        self._waiting: set[_Connection] = set()  # stopped on the server's budgets
        self._wake_scheduled = False
        # Over the byte budget, one connection at a time may still grow the payload it is
        # receiving (it was taken while under budget; its bytes are on the way): no deadlock.
        self._overdraft: _Connection | None = None
        self.dropped = dict(refused=0, handshake=0, idle=0, slow_sender=0, slow_reader=0)
        self._refused_logged_at = -REFUSED_LOG_EVERY_S
        # Counting hook (harness/metrics.py): on_request(cmd, err, seconds, length) per answered request.
        self.on_request: Callable[[int, int, float, int], None] | None = None

    def status(self) -> dict:
        """What the clients hold now, what was dropped and why, and the limits."""
        return dict(connections=len(self._connections), buffered_bytes=self.buffered, inflight=self.inflight,
                    waiting=len(self._waiting), dropped=dict(self.dropped), limits=self.limits.as_dict())

    # -- the server-wide budgets ------------------------------------------------
    def _over(self) -> bool:
        lim = self.limits
        return self.buffered >= lim.server_buffer_bytes or self.inflight >= lim.server_max_inflight

    def _room_for(self, conn: _Connection, nbytes: int) -> bool:
        """May ``conn`` take ``nbytes`` more for the payload it is receiving?"""
        if self.buffered + nbytes <= self.limits.server_buffer_bytes:
            return True
        if self._overdraft is None:
            self._overdraft = conn
        return self._overdraft is conn

    def _end_overdraft(self, conn: _Connection) -> None:
        if self._overdraft is conn:
            self._overdraft = None
            self._wake()

    def _wake(self) -> None:
        """Connections stopped on the server's budgets look again (soon, not from inside a caller)."""
        if self._waiting and not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake_waiting)

    def _wake_waiting(self) -> None:
        self._wake_scheduled = False
        for conn in list(self._waiting):
            conn._update_reading()

    def _admit(self) -> bool:
        """A new connection: False (and it is closed) past max_connections."""
        if len(self._connections) < self.limits.max_connections:
            return True
        self.dropped["refused"] += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
            self._refused_logged_at = now
            log.warning("nbd: %d connections open (max_connections); refusing more (%d so far)",
                        len(self._connections), self.dropped["refused"])
        return False

    # -- exports --------------------------------------------------------------
    def _export(self, vol: HostVolume) -> _Export:
        return _Export(vol, self.read_only, self.limits.max_request_bytes)

    def exports(self) -> dict[str, _Export]:
        return {name: self._export(vol) for name, vol in self.target.volumes().items()}

    def find_export(self, name: str) -> _Export | None:
        volumes = self.target.volumes()
        if name == "" and len(volumes) == 1:
            (vol,) = volumes.values()
            return self._export(vol)
        vol = volumes.get(name)
        return self._export(vol) if vol is not None else None

    def open_export(self, name: str) -> _Export | None:
        """The export one connection transmits on, over its own volume from
        ``target.open`` (closed when the connection ends)."""
        if name == "":
            volumes = self.target.volumes()
            if len(volumes) == 1:
                (name,) = volumes
        vol = self.target.open(name)
        return self._export(vol) if vol is not None else None

    # -- listening ------------------------------------------------------------
    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._new_connection, host, port, reuse_address=True)
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        log.info("nbd: listening on %s:%d", sockname[0], sockname[1])
        return sockname[0], sockname[1]

    async def start_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from a previous run
        server = await loop.create_unix_server(self._new_connection, path)
        self._servers.append(server)
        self._unix_paths.append(path)
        log.info("nbd: listening on unix socket %s", path)

    def _new_connection(self) -> _Connection:
        return _Connection(self)

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish, drop connections."""
        self.closing = True
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        await asyncio.gather(*(c.shutdown() for c in conns), return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), CLOSE_WAIT_S)
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        # Allocated once the connection is admitted (a refused one costs no ring).
        self.ring = bytearray()
        self.ring_view = memoryview(self.ring)
        self.start = 0  # unread bytes are ring[start:end]
        self.end = 0
        # A large WRITE being received straight into its own buffer, which grows
        # as the bytes arrive (up to payload_len, the request's length).
        self.payload: bytearray | None = None
        self.payload_view: memoryview | None = None
        self.payload_filled = 0
        self.payload_len = 0
        self.grow_by = 0  # bytes of budget taken for the payload buffer, added by the next get_buffer
        self.payload_req: tuple = ()
        self.into_payload = False
        self.discard_left = 0  # bytes of a refused WRITE's payload still to skip
        self.export: _Export | None = None
        self.released = False  # the export's volume was closed
        self.structured = False
        self.allocation_for: str | None = None  # base:allocation was set for this export name
        self.allocation = False  # ... and stays set in transmission (the export GO chose)
        self.transmitting = False
        self.closed = False
        self.disc_requested = False
        self.reading_paused = False
        self.haggle_paused = False  # reading paused during negotiation: the ring is half full
        self.writing_paused = False
        self.inflight = 0
        self.tasks: set[asyncio.Task] = set()
        self.out: list = []
        self.flush_scheduled = False
        self.waiter: asyncio.Future | None = None
        self.drained: asyncio.Future | None = None
        self.negotiation: asyncio.Task | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        # Budgets. ``held`` is every byte this connection holds (also counted in
        # server.buffered): payload being received, WRITE data at the volume, READ data
        # from the request on; of the READ data, ``out_held`` is queued in ``out`` and
        # ``tx_held`` is in the transport's buffer (released as the client takes it).
        self.held = 0
        self.out_held = 0
        self.tx_held = 0
        self.blocked = False  # stopped parsing (and reading) on a budget; _update_reading resumes
        self.resume_scheduled = False
        # Watchdog (after GO): progress counters, looked at every tick, cost nothing per request.
        self.watchdog: asyncio.TimerHandle | None = None
        self.rx_total = 0
        self.rx_seen = 0
        self.rx_at = 0.0
        self.parsed = 0
        self.partial_mark: int | None = None
        self.partial_at = 0.0
        self.write_paused_at = 0.0

    # -- transport callbacks --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self.server.closing or not self.server._admit():
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ring = bytearray(RING_BYTES)
        self.ring_view = memoryview(self.ring)
        self.server._connections.add(self)
        self.negotiation = self.loop.create_task(self._negotiate())

    def connection_lost(self, exc) -> None:
        self.closed = True
        server = self.server
        server._connections.discard(self)
        server._waiting.discard(self)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        # What is not at the volume is let go now; requests still there let go of theirs when done.
        if self.payload is not None:
            self.payload_view.release()
            self._unhold(len(self.payload) + self.grow_by)
            self.payload = self.payload_view = None
            self.grow_by = 0
            server._end_overdraft(self)
        self._unhold(self.out_held + self.tx_held)
        self.out_held = self.tx_held = 0
        if self.inflight:
            log.info("nbd %s: client went away with %d requests in flight", self.peer, self.inflight)
        else:
            self._release()
        self._wake()
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)
        self.out.clear()

    def eof_received(self):
        self._wake()
        return False  # close the transport

    def pause_writing(self) -> None:
        # The client is not taking replies as fast as they come: take no new
        # requests (checked per request in _parse) until it has.
        self.writing_paused = True
        self.write_paused_at = self.loop.time()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._observe_tx()
        d = self.drained
        if d is not None and not d.done():
            d.set_result(None)
        if self.blocked:
            self._update_reading()

    def get_buffer(self, sizehint: int):
        if self.payload is not None:
            self.into_payload = True
            if not self.grow_by and self.payload_filled == len(self.payload):
                # Reading goes on only with room in the buffer; should it not, make room
                # rather than hand the transport an empty buffer.
                self._grow_payload(force=True)
            if self.grow_by:
                self._apply_growth()
            return self.payload_view[self.payload_filled :]
        self.into_payload = False
        if self.start == self.end:
            self.start = self.end = 0
        elif RING_BYTES - self.end < 4096:
            n = self.end - self.start
            self.ring[:n] = self.ring[self.start : self.end]
            self.start, self.end = 0, n
        return self.ring_view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.rx_total += nbytes
        if self.into_payload:
            self.payload_filled += nbytes
            if self.payload_filled == self.payload_len:
                data, req = self.payload, self.payload_req
                self.payload_view.release()
                self.payload = self.payload_view = None
                self.server._end_overdraft(self)
                self._dispatch(*req, data)
                if self.end > self.start:
                    self._parse()
            elif self.payload_filled == len(self.payload) and not self._grow_payload():
                self._block()  # the server is over budget: wait for room before reading on
            return
        self.end += nbytes
        if self.transmitting:
            self._parse()
            return
        if self.end - self.start >= RING_BYTES // 2 and not self.haggle_paused and not self.closed:
            # Negotiation takes bytes only as fast as it answers them: read no further
            # ahead than half the ring (a whole option, at most 64 KiB, always fits).
            self.haggle_paused = True
            self.transport.pause_reading()
        self._wake()

    # -- negotiation ----------------------------------------------------------
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _recv(self, n: int) -> bytes:
        while self.end - self.start < n:
            if self.closed or (self.transport is not None and self.transport.is_closing()):
                raise _Disconnect("connection closed during negotiation")
            self.waiter = self.loop.create_future()
            await self.waiter
        data = bytes(self.ring[self.start : self.start + n])
        self.start += n
        self._haggle_resume()
        return data

    def _haggle_resume(self) -> None:
        if self.haggle_paused and self.end - self.start < RING_BYTES // 2 and not self.closed:
            self.haggle_paused = False
            self.transport.resume_reading()

    async def _drain(self) -> None:
        while self.writing_paused and not self.closed:
            self.drained = self.loop.create_future()
            await self.drained

    def _send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def _negotiate(self) -> None:
        timeout_s = self.limits.handshake_timeout_s
        try:
            await asyncio.wait_for(self._haggle(), timeout_s)
        except _Disconnect as e:
            log.info("nbd %s: negotiation ended: %s", self.peer, e)
            self._abort()
        except TimeoutError:
            self._drop(f"negotiation not done after {timeout_s:g} s (handshake_timeout_s)", "handshake")
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("nbd %s: negotiation failed", self.peer)
            self._abort()
        else:
            if self.export is not None and not self.closed:
                self.transmitting = True
                log.info("nbd %s: serving export %r (%d bytes%s)", self.peer, self.export.name,
                         self.export.size, ", read-only" if self.export.read_only else "")
                self._arm_watchdog()
                if self.haggle_paused:
                    self.haggle_paused = False
                    self.transport.resume_reading()
                self._parse()

    async def _haggle(self) -> None:
        self._send(ServerGreeting.build(dict(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)))
        (cflags,) = CLIENT_FLAGS.unpack(await self._recv(4))
        if cflags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
            raise _Disconnect(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & ClientFlag.C_NO_ZEROES)
        while True:
            if self.writing_paused:
                await self._drain()  # a client that asks and never reads the answers gets no more
            magic, option, length = OPTION_HEADER.unpack(await self._recv(OPTION_HEADER.size))
            if magic != IHAVEOPT:
                raise _Disconnect(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_BYTES:
                raise _Disconnect(f"option {option} data of {length} bytes is too long")
            data = await self._recv(length)
            if self.server.closing:
                self._send(option_reply(option, Reply.ERR_SHUTDOWN))
                raise _Disconnect("server shutting down")
            if option == Option.EXPORT_NAME:
                export = self._lookup(data)
                if export is None:
                    raise _Disconnect(f"no export named {data[:64]!r}")
                self.allocation = self.allocation_for == data.decode("utf8")
                reply = ExportNameReply.build(dict(size=export.size, flags=export.flags))
                self._send(reply if no_zeroes else reply + bytes(EXPORT_NAME_ZEROES))
                self._select(export)
                return
            if option == Option.ABORT:
                self._send(option_reply(option, Reply.ACK))
                raise _Disconnect("client aborted negotiation")
            if option == Option.LIST:
                if length:
                    self._send(option_reply(option, Reply.ERR_INVALID, b"LIST takes no data"))
                    continue
                for name in self.server.target.volumes():
                    self._send(option_reply(option, Reply.SERVER, ServerEntry.build(dict(name=name, description=""))))
                self._send(option_reply(option, Reply.ACK))
            elif option == Option.STRUCTURED_REPLY:
                if length:
                    self._send(option_reply(option, Reply.ERR_INVALID, b"STRUCTURED_REPLY takes no data"))
                else:
                    self.structured = True
                    self._send(option_reply(option, Reply.ACK))
            elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                self._meta_context(option, data)
            elif option in (Option.INFO, Option.GO):
                if self._info(option, data) and option == Option.GO:
                    return
            else:
                self._send(option_reply(option, Reply.ERR_UNSUP, f"option {option} not supported".encode()))

    def _meta_context(self, option: int, data: bytes) -> None:
        """LIST/SET_META_CONTEXT: ``base:allocation`` is the one context (SET needs
        structured replies first; a SET replaces what an earlier one chose)."""
        try:
            req = MetaContextRequest.parse(data)
            if len(MetaContextRequest.build(req)) != len(data):
                raise ValueError("trailing bytes")
        except (ConstructError, ValueError, UnicodeDecodeError):
            self._send(option_reply(option, Reply.ERR_INVALID, b"malformed META_CONTEXT request"))
            return
        setting = option == Option.SET_META_CONTEXT
        if setting and not self.structured:
            self._send(option_reply(option, Reply.ERR_INVALID, b"negotiate STRUCTURED_REPLY first"))
            return
        if self.server.find_export(req.name) is None:
            msg = f"no export named {req.name!r}; exports: {', '.join(self.server.target.volumes())}"
            self._send(option_reply(option, Reply.ERR_UNKNOWN, msg.encode()[:MAX_STRING_BYTES]))
            return
        # LIST with no query, or the query "base:", lists every base: context; SET takes exact names.
        wanted = any(q == BASE_ALLOCATION or (not setting and q == "base:") for q in req.queries)
        if not setting and not req.queries:
            wanted = True
        if setting:
            self.allocation_for = req.name if wanted else None
        if wanted:
            context_id = ALLOCATION_CONTEXT_ID if setting else 0
            self._send(option_reply(option, Reply.META_CONTEXT,
                                    MetaContextReply.build(dict(context_id=context_id, name=BASE_ALLOCATION))))
        self._send(option_reply(option, Reply.ACK))

    def _lookup(self, raw_name: bytes) -> _Export | None:
        try:
            name = raw_name.decode("utf8")
        except UnicodeDecodeError:
            return None
        return self.server.open_export(name)

    def _select(self, export: _Export) -> None:
        """The connection transmits on ``export`` (opened for it) from now on."""
        self.export = export
        if self.closed:
            self._release()

    def _release(self) -> None:
        """Close the connection's volume once: the connection is gone and nothing is in flight."""
        if self.export is None or self.released:
            return
        self.released = True
        try:
            self.export.volume.close()
        except Exception:  # noqa: BLE001 - a closing volume must not take the server down
            log.exception("nbd %s: closing export %r failed", self.peer, self.export.name)

    def _info(self, option: int, data: bytes) -> bool:
        try:
            req = InfoRequest.parse(data)
            if len(data) != 4 + len(req.name.encode()) + 2 + 2 * len(req.requests):
                raise ValueError("trailing bytes")
        except (ConstructError, ValueError, UnicodeDecodeError):
            self._send(option_reply(option, Reply.ERR_INVALID, b"malformed INFO/GO request"))
            return False
        # GO selects the export: the connection gets its own volume (INFO only describes it).
        export = self.server.open_export(req.name) if option == Option.GO else self.server.find_export(req.name)
        if export is None:
            msg = f"no export named {req.name!r}; exports: {', '.join(self.server.target.volumes())}"
            self._send(option_reply(option, Reply.ERR_UNKNOWN, msg.encode()[:MAX_STRING_BYTES]))
            return False
        self._send(info_reply(option, Info.EXPORT, size=export.size, flags=export.flags))
        if Info.NAME in req.requests:
            self._send(info_reply(option, Info.NAME, name=export.name))
        if Info.DESCRIPTION in req.requests:
            self._send(info_reply(option, Info.DESCRIPTION, description=f"mirrorfw volume {export.name}"))
        # Sent whether asked or not (the spec allows it): we enforce alignment.
        self._send(info_reply(option, Info.BLOCK_SIZE, minimum=export.min_block,
                              preferred=export.preferred, maximum=export.max_block))
        self._send(option_reply(option, Reply.ACK))
        if option == Option.GO:
            # Contexts set for another export name do not carry over (the spec's rule).
            self.allocation = self.allocation_for == req.name
            self._select(export)
        return True

    # -- transmission ---------------------------------------------------------
    def _parse(self) -> None:
        """Take complete requests out of the ring buffer while the budgets allow."""
        if self.blocked:
            return
        ring, start, end = self.ring, self.start, self.end
        export = self.export
        server = self.server
        lim = self.limits
        max_inflight, conn_bytes = lim.max_inflight, lim.connection_buffer_bytes
        server_inflight, server_bytes = lim.server_max_inflight, lim.server_buffer_bytes
        parsed = self.parsed
        while not self.closed:
            if self.discard_left:
                skip = min(self.discard_left, end - start)
                start += skip
                self.discard_left -= skip
                if self.discard_left:
                    break
            if end - start < REQUEST_SIZE:
                break
            if (self.inflight >= max_inflight or self.held >= conn_bytes or self.writing_paused
                    or server.inflight >= server_inflight or server.buffered >= server_bytes):
                self.start, self.end, self.parsed = start, end, parsed
                if self._block():
                    return
                continue  # room after all (replies had left): go on
            magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(ring, start)
            start += REQUEST_SIZE
            parsed += 1
            if magic != REQUEST_MAGIC:
                self.start, self.end, self.parsed = start, end, parsed
                log.warning("nbd %s: bad request magic %#010x; disconnecting", self.peer, magic)
                self._abort()
                return
            err = self._check(export, flags, cmd, offset, length)
            if cmd == Cmd.WRITE:
                if err:
                    if length > DISCARD_LIMIT_BYTES:
                        self.start, self.end, self.parsed = start, end, parsed
                        log.warning("nbd %s: write of %d bytes refused; disconnecting", self.peer, length)
                        self._abort()
                        return
                    self.discard_left = length
                    self._reply_error(cmd, handle, err)
                    continue
                avail = end - start
                if avail >= length:
                    data = ring[start : start + length]
                    start += length
                    self._hold(length)
                    self._dispatch(flags, cmd, handle, offset, length, data)
                    continue
                # Payload not all here: receive the rest straight into its buffer,
                # which holds what has arrived and grows as more does.
                self.start, self.end, self.parsed = end, end, parsed
                self._start_payload(start, end, (flags, cmd, handle, offset, length))
                return
            if err:
                self._reply_error(cmd, handle, err)
            elif cmd == Cmd.DISC:
                self.start, self.end, self.parsed = start, end, parsed
                self._disc()
                return
            else:
                if cmd == Cmd.READ:
                    self._hold(length)  # the reply's data, until the client has taken it
                self._dispatch(flags, cmd, handle, offset, length, None)
        self.start, self.end, self.parsed = start, end, parsed

    def _start_payload(self, start: int, end: int, req: tuple) -> None:
        avail, length = end - start, req[4]
        want = min(length, max(avail, FIRST_PAYLOAD_BYTES))
        room = self.server._room_for(self, want)
        if not room:
            want = avail  # only what is already here; the rest waits for room
        payload = bytearray(want)
        payload[:avail] = self.ring_view[start:end]
        self._hold(want)
        self.payload, self.payload_view = payload, memoryview(payload)
        self.payload_filled = avail
        self.payload_len = length
        self.payload_req = req
        if not room:
            self._block()

    def _grow_payload(self, *, force: bool = False) -> bool:
        """Room for more of the payload being received (taken from the budget now,
        made by get_buffer): False when the server is over budget."""
        cap = len(self.payload)
        step = min(self.payload_len, max(2 * cap, FIRST_PAYLOAD_BYTES)) - cap
        if not self.server._room_for(self, step) and not force:
            return False
        self.grow_by = step
        self._hold(step)
        return True

    def _apply_growth(self) -> None:
        # Only here: the transport has let go of the last buffer it was given (a
        # bytearray with a view on it cannot be resized).
        self.payload_view.release()
        payload = self.payload
        left, self.grow_by = self.grow_by, 0
        while left:
            n = min(left, len(_ZEROS))
            payload += _ZEROS[:n]
            left -= n
        self.payload_view = memoryview(payload)

    def _hold(self, n: int) -> None:
        self.held += n
        self.server.buffered += n

    def _unhold(self, n: int) -> None:
        if n:
            self.held -= n
            server = self.server
            server.buffered -= n
            if server._waiting and server.buffered < server.limits.server_buffer_bytes:
                server._wake()

    def _observe_tx(self) -> None:
        """Let go of the READ data the client has taken off the transport's buffer."""
        if self.tx_held and self.transport is not None:
            buffered = self.transport.get_write_buffer_size()
            if buffered < self.tx_held:
                n = self.tx_held - buffered
                self.tx_held = buffered
                self._unhold(n)

    def _over(self) -> int:
        """0 if the connection may take another request; 1 if its own limits (or a
        client not reading its replies) say no; 2 if the server's do."""
        lim = self.limits
        if self.writing_paused or self.inflight >= lim.max_inflight or self.held >= lim.connection_buffer_bytes:
            return 1
        return 2 if self.server._over() else 0

    def _block(self) -> bool:
        """Stop parsing and reading until a budget frees up; False if one already has."""
        if self.payload is None:
            self._observe_tx()
            over = self._over()
            if not over:
                return False
            if over == 2:
                self.server._waiting.add(self)
        else:
            self.server._waiting.add(self)  # waiting for room to grow the payload
        self.blocked = True
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
        return True

    def _update_reading(self) -> None:
        """A budget may have freed up: a blocked connection looks again."""
        if self.closed or self.transport is None or not self.blocked:
            self.server._waiting.discard(self)
            return
        if self.payload is not None:
            if not self._grow_payload():
                self.server._waiting.add(self)
                return
        else:
            self._observe_tx()
            over = self._over()
            if over == 2:
                self.server._waiting.add(self)
            elif over:
                self.server._waiting.discard(self)  # its own limits: it is woken by its own requests
            if over:
                return
        self.server._waiting.discard(self)
        self.blocked = False
        if self.reading_paused and self.transmitting:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.payload is None and not self.resume_scheduled:
            # Parse what is waiting in the ring soon, not from inside this caller (which
            # may be a request finishing inline in the middle of _parse).
            self.resume_scheduled = True
            self.loop.call_soon(self._resume_parse)

    def _resume_parse(self) -> None:
        self.resume_scheduled = False
        if self.transmitting and not self.closed and not self.blocked:
            self._parse()

    def _check(self, export: _Export, flags: int, cmd: int, offset: int, length: int) -> int:
        """0 if the request may go to the volume, else the NBD errno to reply."""
        if flags & export.bad_flags:
            return NbdErrno.EINVAL
        if cmd == Cmd.READ or cmd == Cmd.WRITE:
            if length > export.max_block:
                return NbdErrno.EOVERFLOW if cmd == Cmd.READ else NbdErrno.EINVAL
        elif cmd == Cmd.TRIM or cmd == Cmd.WRITE_ZEROES:
            pass
        elif cmd == Cmd.FLUSH or cmd == Cmd.DISC:
            return export.refused.get(cmd, 0)
        elif cmd == Cmd.BLOCK_STATUS:
            # Only with a context set; any range inside the export (alignment is the reply's business).
            if not self.allocation or length == 0 or offset + length > export.size:
                return NbdErrno.EINVAL
            return 0
        else:
            return NbdErrno.EINVAL  # unknown command
        if cmd in export.refused:
            return export.refused[cmd]
        if offset + length > export.size:
            return NbdErrno.ENOSPC if cmd == Cmd.WRITE or cmd == Cmd.WRITE_ZEROES else NbdErrno.EINVAL
        mb = export.min_block
        if offset % mb or length % mb:
            return NbdErrno.EINVAL
        return 0

    def _dispatch(self, flags, cmd, handle, offset, length, data) -> None:
        self.inflight += 1
        self.server.inflight += 1
        if self.inflight == 1:
            self.idle.clear()
        coro = self._serve(flags, cmd, handle, offset, length, data)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return  # answered inline
        task = self.loop.create_task(_Resumed(coro, waiting_on))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, flags, cmd, handle, offset, length, data) -> None:
        volume = self.export.volume
        payload = None
        status = None
        err = 0
        started = time.monotonic()
        try:
            if cmd == Cmd.READ:
                payload = await volume.read(offset, length)
                if len(payload) != length:
                    log.error("nbd %s: volume %s returned %d bytes for a %d-byte read",
                              self.peer, volume.name, len(payload), length)
                    err = NbdErrno.EIO
            elif cmd == Cmd.WRITE:
                await volume.write(offset, data, fua=bool(flags & _FUA))
            elif cmd == Cmd.FLUSH:
                await volume.flush()
            elif cmd == Cmd.TRIM:
                await volume.trim(offset, length)
                if flags & _FUA:
                    await volume.flush()
            elif cmd == Cmd.WRITE_ZEROES:
                await volume.write_zeroes(offset, length, fua=bool(flags & _FUA))
            elif cmd == Cmd.BLOCK_STATUS:
                status = await self._block_status(volume, flags, offset, length)
        except PermissionError:
            err = NbdErrno.EPERM
        except OSError as e:
            err = nbd_errno(e.errno)
            log.info("nbd %s: %s %s at %d+%d failed: %s", self.peer, Cmd(cmd).name, volume.name,
                     offset, length, e)
        except asyncio.CancelledError:
            err = -1
            raise
        except Exception:  # noqa: BLE001 - one bad request must not end the server
            log.exception("nbd %s: %s %s at %d+%d failed", self.peer, Cmd(cmd).name, volume.name, offset, length)
            err = NbdErrno.EIO
        finally:
            self.inflight -= 1
            server = self.server
            server.inflight -= 1
            if server.on_request is not None and err != -1:  # -1: cancelled, never answered
                server.on_request(cmd, err, time.monotonic() - started, length)
            if cmd == Cmd.WRITE or (cmd == Cmd.READ and (err or self.closed)):
                self._unhold(length)  # a READ's data stays held until the client takes it
            if server._waiting and not server._over():
                server._wake()
            if self.inflight == 0:
                self.idle.set()
                if self.closed:
                    self._release()
            if self.blocked:
                self._update_reading()
        if self.closed:
            return  # nothing goes out (and a READ's data was let go above)
        if err:
            self._reply_error(cmd, handle, err)
        elif status is not None:
            self._queue(STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS,
                                              handle, len(status)), status)
        elif payload is not None:
            self.out_held += length
            if self.structured:
                self._queue(
                    STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA,
                                          handle, 8 + length),
                    offset.to_bytes(8, "big"),
                    payload,
                )
            else:
                self._queue(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), payload)
        else:
            self._queue(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
        if self.disc_requested and self.inflight == 0:
            self._disc()

    async def _block_status(self, volume: HostVolume, flags: int, offset: int, length: int) -> bytes:
        """The BLOCK_STATUS payload for base:allocation: what the volume says, cut
        to the range (and to one descriptor with REQ_ONE); all data if it does not know."""
        export = self.export
        if export.can_extents:
            # The volume is asked in whole blocks; its answer is cut back to the bytes asked.
            mb = export.min_block
            start = offset - offset % mb
            end = min(export.size, -(-(offset + length) // mb) * mb)
            runs = await volume.extents(start, end - start)
        else:
            start, runs = offset, [(length, 0)]
        descriptors, left, skip = [], length, offset - start
        for n, state in runs:
            n = int(n)
            if n <= 0:
                break
            if skip:
                cut = min(skip, n)
                n, skip = n - cut, skip - cut
                if not n:
                    continue
            n = min(n, left)
            descriptors.append(dict(length=n, flags=int(state) & 3))
            left -= n
            if left == 0 or len(descriptors) >= MAX_EXTENTS or flags & _REQ_ONE:
                break
        if not descriptors:
            raise OSError(errno.EIO, f"volume {volume.name} described no extent at {offset}")
        return BlockStatusChunk.build(dict(context_id=ALLOCATION_CONTEXT_ID, descriptors=descriptors))

    def _reply_error(self, cmd: int, handle: int, err: int) -> None:
        if self.structured and (cmd == Cmd.READ or cmd == Cmd.BLOCK_STATUS):
            # A structured client must get a structured reply to READ and BLOCK_STATUS.
            body = ErrorChunk.build(dict(error=err, message=""))
            self._queue(STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR,
                                              handle, len(body)), body)
        else:
            self._queue(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))

    def _queue(self, *parts) -> None:
        if self.closed:
            return
        self.out.extend(parts)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self.flush_scheduled = False
        out, self.out = self.out, []
        held, self.out_held = self.out_held, 0
        if self.closed:
            self._unhold(held)
            return
        if out:
            self.tx_held += held
            self.transport.writelines(out)
            self._observe_tx()

    def _disc(self) -> None:
        """NBD_CMD_DISC: finish what is in flight, then close."""
        self.disc_requested = True
        self.transmitting = False  # read no more requests
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        if self.inflight == 0 and not self.closed:
            self._flush_out()
            self._close_transport()

    def _abort(self) -> None:
        if not self.closed and self.transport is not None:
            self._flush_out()
            self._close_transport()
        self.closed = True
        self._wake()

    def _close_transport(self) -> None:
        """Close after the replies queued so far are sent, but wait no longer
        than stall_timeout_s for a client that does not read them."""
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(self.limits.stall_timeout_s, transport.abort)

    def _drop(self, why: str, counter: str) -> None:
        """A client over one of its timeouts: the connection ends now, queued replies and all."""
        log.warning("nbd %s: %s; disconnecting", self.peer, why)
        self.server.dropped[counter] += 1
        self.closed = True
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    # -- timeouts ---------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        lim = self.limits
        self.tick_s = min(1.0, max(0.05, min(lim.idle_timeout_s, lim.stall_timeout_s) / 4))
        self.rx_seen = self.rx_total
        self.rx_at = self.loop.time()
        self.watchdog = self.loop.call_later(self.tick_s, self._tick)

    def _tick(self) -> None:
        """Looks at the connection's progress every tick_s: a request whose bytes
        arrive too slowly, replies the client does not take, or nothing at all
        for idle_timeout_s ends it."""
        self.watchdog = None
        if self.closed:
            return
        now = self.loop.time()
        lim = self.limits
        if self.rx_total != self.rx_seen:
            self.rx_seen, self.rx_at = self.rx_total, now
        if self.tx_held:
            self._observe_tx()
        if self.blocked:
            self._update_reading()
        # A request part here (not held back by a budget) must be whole within stall_timeout_s.
        partial = not self.blocked and (self.payload is not None or self.discard_left > 0 or self.end > self.start)
        if partial:
            if self.partial_mark != self.parsed:
                self.partial_mark, self.partial_at = self.parsed, now
            elif now - self.partial_at >= lim.stall_timeout_s:
                self._drop(f"a request still incomplete after {lim.stall_timeout_s:g} s (stall_timeout_s)",
                           "slow_sender")
                return
        else:
            self.partial_mark = None
        if self.writing_paused and now - self.write_paused_at >= lim.stall_timeout_s:
            self._drop(f"replies not taken for {lim.stall_timeout_s:g} s (stall_timeout_s)", "slow_reader")
            return
        if (not partial and self.inflight == 0 and self.end == self.start and not self.writing_paused
                and self.transmitting and now - self.rx_at >= lim.idle_timeout_s):
            self._drop(f"idle for {lim.idle_timeout_s:g} s (idle_timeout_s)", "idle")
            return
        self.watchdog = self.loop.call_later(self.tick_s, self._tick)

    async def shutdown(self) -> None:
        """Server closing: finish in-flight requests, flush replies, close."""
        if self.negotiation is not None and not self.negotiation.done():
            self.negotiation.cancel()
        self.transmitting = False
        if self.transport is not None and not self.closed and not self.reading_paused:
            self.reading_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        if self.inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), CLOSE_WAIT_S)
        self._abort()
