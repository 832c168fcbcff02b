"""TCP links: a hal ``Link`` over an asyncio stream.

Frames carry their own length in their header, so the link reads a fixed
header, asks the ``Framing`` how many bytes follow, and reads those. The
driver does not know the frame layout (it may not import the firmware);
the harness passes the firmware protocol's framing in. With no framing
given, frames travel behind a 4-byte big-endian length prefix.

Before the handshake the peer is a stranger: with ``preauth_bytes`` set, a
frame whose header announces more than that is refused unread (a warning,
then LinkDown), so a stranger cannot make us buffer a 64 MiB frame. The
limit lifts once this side sends a frame that ``opens`` says is sealed: a
side seals only after it authenticated its peer.

Sending queues the frame and returns: the frames queued in one event-loop
turn go to the socket together at the end of it (one write for many DATA
frames or ACKs, not one each). A sender waits only while the socket buffer
is over its high-water mark, so a slow peer pushes back on the sender
instead of growing memory. A write that fails breaks the link: the next
send and the reader say LinkDown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hal.link import Link, LinkDown

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
SEND_BUFFER_BYTES = 1 << 20  # high-water mark of the transport's write buffer


@dataclass(frozen=True)
class Framing:
    header_bytes: int
    rest_length: Callable[[bytes], int]  # bytes that follow this header (0: the header is the frame)
    prefix: bool = False  # True: the link adds a length prefix of header_bytes itself
    preauth_bytes: int | None = None  # the longest frame (header included) before the limit lifts
    opens: Callable[[bytes], bool] | None = None  # a header this side sends only once its peer is authenticated


LENGTH_PREFIX = Framing(4, lambda h: int.from_bytes(h, "big"), prefix=True)
MAX_PREFIXED_BYTES = 256 << 20


class TcpLink(Link):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: Framing = LENGTH_PREFIX
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._framing = framing
        self._send_lock = asyncio.Lock()  # one sender waits for the buffer to drain at a time
        self._queued: list[bytes] = []  # frames of this loop turn, written at its end (_flush)
        self._flush_handle: asyncio.Handle | None = None
        self._closed = False
        self._down: str | None = None
        self.frame_limit = framing.preauth_bytes  # None: only the framing's own limit
        self.refused_frames = 0  # frames refused unread over frame_limit
        peer = writer.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
        except (RuntimeError, OSError) as e:
            # The peer closed before we got here (a controller restarting):
            # uvloop raises RuntimeError on a closed transport. That is a
            # link that is down, not an error of the caller's: the first
            # send/recv says LinkDown.
            self._down = f"closed before it was set up ({e})"

    @property
    def peer(self) -> str:
        return self._peer

    def _broken(self, why: str) -> LinkDown:
        if self._down is None:
            self._down = why
        return LinkDown(f"link to {self._peer} down: {self._down}")

    async def send(self, frame: bytes) -> None:
        if self._closed or self._down:
            raise self._broken("closed")
        if self.frame_limit is not None and self._framing.opens is not None:
            if self._framing.opens(frame[: self._framing.header_bytes]):
                self.frame_limit = None  # we seal, so the peer proved itself: long frames may come
        if self._framing.prefix:
            self._queued.append(len(frame).to_bytes(self._framing.header_bytes, "big"))
        self._queued.append(frame)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        if self._writer.transport.get_write_buffer_size() >= SEND_BUFFER_BYTES:
            async with self._send_lock:
                try:
                    await self._writer.drain()
                except (ConnectionError, OSError, RuntimeError) as e:
                    raise self._broken(f"send failed: {e or type(e).__name__}") from None

    def _flush(self) -> None:
        """Write the frames queued in this loop turn, in one go."""
        self._flush_handle = None
        frames, self._queued = self._queued, []
        if not frames or self._down:
            return
        try:
            self._writer.writelines(frames)
        except (ConnectionError, OSError, RuntimeError) as e:
            self._broken(f"send failed: {e or type(e).__name__}")

    async def recv(self) -> bytes:
        if self._closed or self._down:
            raise self._broken("closed")
        framing = self._framing
        try:
            header = await self._reader.readexactly(framing.header_bytes)
            rest = framing.rest_length(header)
            if framing.prefix:
                if rest > MAX_PREFIXED_BYTES:
                    raise self._broken(f"frame of {rest} bytes over the limit")
                return await self._reader.readexactly(rest)
            if rest == 0:
                return header
            limit = self.frame_limit
            if limit is not None and len(header) + rest > limit:
                self.refused_frames += 1
                log.warning("link from %s: a frame of %d bytes before the handshake, over the %d-byte limit: "
                            "refused unread", self._peer, len(header) + rest, limit)
                raise self._broken(f"a frame of {len(header) + rest} bytes before the handshake "
                                   f"(limit {limit}): refused unread")
            return header + await self._reader.readexactly(rest)
        except asyncio.IncompleteReadError as e:
            why = "peer closed" if not e.partial else f"peer closed mid-frame ({len(e.partial)} bytes)"
            raise self._broken(why) from None
        except (ConnectionError, OSError) as e:
            raise self._broken(f"receive failed: {e or type(e).__name__}") from None

    async def close(self) -> None:
        if self._closed:
            return
        if self._flush_handle is not None:  # what was sent before the close still goes out
            self._flush_handle.cancel()
            self._flush()
        self._closed = True
        self._broken("closed")
        try:
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            pass

    def abort(self) -> None:
        """Drop the connection at once (a reset, not an orderly close)."""
        self._closed = True
        self._broken("aborted")
        self._queued.clear()
        self._writer.transport.abort()


def split_address(text: str, *, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """``"127.0.0.1:7700"`` / ``":7700"`` / ``"[::1]:7700"`` -> (host, port); ValueError if bad."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:7700)")
    host = host.strip("[]") or default_host
    return host, int(port)


async def connect_link(
    host: str, port: int, *, timeout_s: float = 5.0, framing: Framing = LENGTH_PREFIX
) -> TcpLink:
    """Connect to a listening peer; raises LinkDown when it cannot."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (TimeoutError, ConnectionError, OSError) as e:
        raise LinkDown(f"cannot connect to {host}:{port}: {e or type(e).__name__}") from None
    if writer.get_extra_info("sockname") == writer.get_extra_info("peername"):
        # TCP self-connect: nobody listens on a port in the ephemeral range and
        # the kernel picked that very port as our source. Holding it would
        # keep the real listener from binding when it comes back.
        writer.transport.abort()
        raise LinkDown(f"cannot connect to {host}:{port}: nobody listening (self-connect)")
    return TcpLink(reader, writer, framing)


async def listen_links(
    host: str,
    port: int,
    on_link: Callable[[TcpLink], Awaitable[None]],
    *,
    framing: Framing = LENGTH_PREFIX,
) -> asyncio.Server:
    """Accept links on host:port (127.0.0.1 unless told otherwise); ``on_link``
    runs once per connection and the link is closed when it returns.
    ``server.sockets[0].getsockname()`` tells the port when 0 was asked."""

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = TcpLink(reader, writer, framing)
        try:
            await on_link(link)
        except LinkDown as e:
            log.info("%s", e)
        except Exception:  # noqa: BLE001 - one bad peer must not stop the listener
            log.exception("link handler for %s failed", link.peer)
        finally:
            await link.close()

    return await asyncio.start_server(accepted, host or DEFAULT_HOST, port)
