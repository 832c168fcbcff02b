"""Console transports: serve a line console on a pty, a TCP socket or RFC 2217.

``serve_console(url, handle_session)`` opens the transport a URL names and
calls ``handle_session(port)`` (a coroutine) once per session with a hal
``ConsolePort``:

- ``pty:///path/link``: a pseudo-terminal in raw mode whose slave name is
  symlinked at the path, so ``picocom``, ``screen`` or ``minicom`` can
  attach. One session at a time, like a UART. The server keeps the slave
  open itself, so the line survives terminal programs attaching and
  detaching; output nobody reads is flushed the way a UART with no listener
  loses it. Characters are echoed and backspace edits the line (terminal
  programs do not echo locally).
- ``socket://127.0.0.1:PORT``: a TCP server (port 0 picks a free port),
  one session per connection, several at once. No echo by default (the
  client's line discipline echoes).
- ``rfc2217://127.0.0.1:PORT``: TCP with telnet/RFC 2217 negotiation
  answered by pyserial's ``PortManager`` over a virtual line, so pyserial's
  ``rfc2217://`` client and telnet clients connect. Echoes (it says WILL ECHO).

``?echo=on|off`` overrides the echo default. The host is the URL's; an empty
host means 127.0.0.1. Input lines end with CR, LF, CRLF (or telnet's CR NUL);
a line longer than ``max_line_chars`` is cut to ``max_line_chars + 1``
characters and its rest discarded, so the command layer sees it is too long
without the driver holding unbounded input. A TCP client that sends more
than ``DROP_AFTER_CHARS`` with no line end is disconnected, and every chunk
read yields to the event loop: two clients streaming bytes without a newline
once raised host write latency from 11 ms to half a second.

``?token_file=PATH`` (TCP schemes; harness/config.py adds it from
``[console] token_file``): the first line of every connection must be
``auth TOKEN``, anything else is refused and the connection closed. A TCP
console on a host other than loopback is refused without a token.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import stat
import termios
import tty
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hal.console import ConsolePort
from hal.url import UrlError, parse_url

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_LINE_CHARS = 4096
READ_CHUNK_BYTES = 4096
PTY_STALL_S = 1.0  # a pty nobody reads: wait this long for room, then drop stale output
SCHEMES = ("pty", "socket", "rfc2217")
DROP_AFTER_CHARS = 16 * MAX_LINE_CHARS  # a TCP client past this with no line end is cut off
TOKEN_MAX_BYTES = 4096
AUTH_TIMEOUT_S = 30.0  # a connection that never says `auth` does not hold a session forever
_LINE_EVENT = re.compile(r"[\r\n\b\x7f\x15\x03]")  # what ends or edits a line

SessionHandler = Callable[[ConsolePort], Awaitable[None]]


class LineAssembler:
    """Bytes in, complete lines out, with minimal terminal line editing.

    CR, LF and CRLF (and CR NUL) end a line; backspace/DEL removes the last
    character; Ctrl-U drops the line; Ctrl-C abandons it (an empty line, so
    the prompt comes back). Other control characters stay in the line so the
    command layer can name them. Bytes decode as UTF-8, invalid ones as U+FFFD.
    """

    def __init__(self, *, max_line_chars: int = MAX_LINE_CHARS,
                 echo: Callable[[str], None] | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars: list[str] = []
        self._max = max_line_chars
        self._echo = echo
        self._after_cr = False
        self.pending_chars = 0  # characters of the unfinished line, counting those dropped

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        echoed: list[str] = []
        text = self._decoder.decode(data)
        i, n = 0, len(text)
        while i < n:
            if len(self._chars) > self._max and not self._after_cr:
                # Over the limit: skip to what ends or edits the line in one
                # step, not character by character (a flood must stay cheap).
                m = _LINE_EVENT.search(text, i)
                end = m.start() if m else n
                self.pending_chars += end - i
                i = end
                if i >= n:
                    break
            ch = text[i]
            i += 1
            self.pending_chars += 1
            if self._after_cr and ch in "\n\0":
                self._after_cr = False
                continue
            self._after_cr = ch == "\r"
            if ch in "\r\n":
                lines.append("".join(self._chars))
                self._chars.clear()
                self.pending_chars = 0
                echoed.append("\r\n")
            elif ch in "\b\x7f":
                if self._chars:
                    self._chars.pop()
                    echoed.append("\b \b")
            elif ch == "\x15":  # Ctrl-U
                echoed.append("\b \b" * min(len(self._chars), self._max))
                self._chars.clear()
                self.pending_chars = 0
            elif ch == "\x03":  # Ctrl-C
                self._chars.clear()
                self.pending_chars = 0
                lines.append("")
                echoed.append("^C\r\n")
            elif len(self._chars) <= self._max:
                self._chars.append(ch)
                if ch.isprintable() and len(self._chars) <= self._max:
                    echoed.append(ch)
        if self._echo is not None and echoed:
            self._echo("".join(echoed))
        return lines


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def _echo_option(url: str, query: dict[str, str], default: bool) -> bool:
    value = query.get("echo")
    if value is None:
        return default
    if value.lower() in ("1", "on", "yes", "true"):
        return True
    if value.lower() in ("0", "off", "no", "false"):
        return False
    raise UrlError(f"{url}: echo={value!r}: expected on or off")


# ---- TCP and RFC 2217 -------------------------------------------------------


@dataclass
class VirtualLine:
    """The serial line PortManager configures: it only remembers settings."""

    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    xonxoff: bool = False
    rtscts: bool = False
    break_condition: bool = False
    dtr: bool = True
    rts: bool = True
    cts: bool = True
    dsr: bool = True
    ri: bool = False
    cd: bool = True

    def reset_input_buffer(self) -> None:
        return None

    def reset_output_buffer(self) -> None:
        return None


class _TelnetConnection:
    """What PortManager writes its negotiation answers to."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)


class StreamConsolePort(ConsolePort):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 echo: bool, telnet: bool, max_line_chars: int = MAX_LINE_CHARS) -> None:
        self._reader = reader
        self._writer = writer
        self._lines: deque[str] = deque()
        self._closed = False
        self._telnet = None
        if telnet:
            from serial.rfc2217 import PortManager

            self._telnet = PortManager(VirtualLine(), _TelnetConnection(writer), logger=None)
        self._assembler = LineAssembler(max_line_chars=max_line_chars,
                                        echo=self._write_raw if echo else None)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")

    def _write_raw(self, text: str) -> None:
        if self._closed or self._writer.is_closing():
            return
        data = text.encode("utf-8", errors="replace")
        if self._telnet is not None:
            data = b"".join(self._telnet.escape(data))
        self._writer.write(data)

    async def readline(self) -> str | None:
        while not self._lines:
            if self._closed:
                return None
            try:
                data = await self._reader.read(READ_CHUNK_BYTES)
            except (ConnectionError, OSError):
                data = b""
            if not data:  # the peer went away; a partial line is dropped, never executed
                self._closed = True
                return None
            if self._telnet is not None:
                data = b"".join(self._telnet.filter(data))
            self._lines.extend(self._assembler.feed(data))
            if not self._lines and self._assembler.pending_chars > DROP_AFTER_CHARS:
                log.warning("console %s: %d characters without a line end; disconnecting",
                            self.peer, self._assembler.pending_chars)
                await self.write(f"error: more than {DROP_AFTER_CHARS} characters without a line end; "
                                 "disconnecting\n")
                self._closed = True
                return None
            # read() returns at once while bytes are buffered: without this a
            # flood of input never lets the host path, the CG loop or the
            # other sessions run.
            await asyncio.sleep(0)
        return self._lines.popleft()

    async def write(self, text: str) -> None:
        if self._closed:
            return
        try:
            self._write_raw(_crlf(text))
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._closed = True

    async def close(self) -> None:
        self._closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


# ---- pty --------------------------------------------------------------------


class PtyConsolePort(ConsolePort):
    """The master side of a pty; the slave is what a terminal program opens."""

    def __init__(self, link_path: str, *, echo: bool, max_line_chars: int = MAX_LINE_CHARS) -> None:
        self.link_path = link_path
        self._loop = asyncio.get_running_loop()
        self.master, self.slave = os.openpty()
        try:
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            self.slave_name = os.ttyname(self.slave)
            _replace_symlink(self.slave_name, link_path)
        except BaseException:
            os.close(self.master)
            os.close(self.slave)
            raise
        self._lines: deque[str] = deque()
        self._waiter: asyncio.Future | None = None
        self.broken = False
        self._closed = False
        self._assembler = LineAssembler(max_line_chars=max_line_chars,
                                        echo=self._echo if echo else None)
        self._loop.add_reader(self.master, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: every slave descriptor closed
            log.info("console pty %s: %s; reopening", self.link_path, exc)
            data = b""
        if not data:
            self.broken = True
            self._loop.remove_reader(self.master)
        else:
            self._lines.extend(self._assembler.feed(data))
        if (self._lines or self.broken) and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _echo(self, text: str) -> None:
        # Written at once so the echo precedes the reply; a full pty drops it.
        with contextlib.suppress(OSError):
            os.write(self.master, text.encode("utf-8", errors="replace"))

    async def readline(self) -> str | None:
        while not self._lines:
            if self.broken or self._closed:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._lines.popleft()

    async def write(self, text: str) -> None:
        data = memoryview(_crlf(text).encode("utf-8", errors="replace"))
        flushed = False
        while data and not (self.broken or self._closed):
            try:
                n = os.write(self.master, data)
                data = data[n:]
                continue
            except BlockingIOError:
                pass
            except OSError:
                self.broken = True
                return
            if not await self._wait_writable(PTY_STALL_S):
                if flushed:
                    log.debug("console pty %s: nobody reads; dropping %d bytes", self.link_path, len(data))
                    return
                # Nobody attached reads the line: forget what piled up, like a UART would.
                with contextlib.suppress(termios.error):
                    termios.tcflush(self.slave, termios.TCIFLUSH)
                flushed = True

    async def _wait_writable(self, timeout_s: float) -> bool:
        fut = self._loop.create_future()
        self._loop.add_writer(self.master, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._loop.remove_writer(self.master)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._loop.remove_reader(self.master)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            if os.path.islink(self.link_path) and os.readlink(self.link_path) == self.slave_name:
                os.unlink(self.link_path)


def _replace_symlink(target: str, link_path: str) -> None:
    if os.path.lexists(link_path) and not os.path.islink(link_path):
        raise UrlError(f"pty://{link_path}: the path exists and is not a symlink; refusing to replace it")
    parent = os.path.dirname(link_path) or "."
    if not os.path.isdir(parent):
        raise UrlError(f"pty://{link_path}: folder {parent} does not exist")
    tmp = f"{link_path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link_path)  # atomic: a terminal program never sees the link missing


# ---- the server -------------------------------------------------------------


@dataclass
class ConsoleServer:
    url: str  # the URL clients use (the real port when 0 was asked for)
    scheme: str
    host: str = ""
    port: int | None = None
    path: str = ""
    _server: asyncio.AbstractServer | None = field(default=None, repr=False)
    _tasks: set = field(default_factory=set, repr=False)
    _pty: PtyConsolePort | None = field(default=None, repr=False)

    @property
    def slave_name(self) -> str | None:
        return self._pty.slave_name if self._pty else None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pty is not None:
            await self._pty.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


async def serve_console(url: str, handle_session: SessionHandler, *,
                        max_line_chars: int = MAX_LINE_CHARS) -> ConsoleServer:
    """Start serving; returns once the console is reachable. Raises UrlError
    for a bad URL and OSError when the port or path cannot be taken."""
    u = parse_url(url)
    if u.scheme not in SCHEMES:
        raise UrlError(f"{url}: unknown console scheme {u.scheme!r}; known: {', '.join(SCHEMES)}")
    u.check_keys({"echo"} if u.scheme == "pty" else {"echo", "token_file"})
    if u.scheme == "pty":
        if u.host or not u.path.startswith("/"):
            raise UrlError(f"{url}: expected pty:///absolute/path/link")
        echo = _echo_option(url, u.query, True)
        server = ConsoleServer(url=f"pty://{u.path}", scheme="pty", path=u.path)
        server._pty = PtyConsolePort(u.path, echo=echo, max_line_chars=max_line_chars)
        _spawn(server, _pty_sessions(server, handle_session, echo, max_line_chars))
        log.info("console on pty %s -> %s", u.path, server._pty.slave_name)
        return server
    if u.port is None:
        raise UrlError(f"{url}: a port is needed ({u.scheme}://127.0.0.1:PORT, 0 for any free port)")
    host = u.host or DEFAULT_HOST
    telnet = u.scheme == "rfc2217"
    echo = _echo_option(url, u.query, telnet)
    token = _read_token(url, u.query["token_file"]) if "token_file" in u.query else None
    if token is None and not _is_loopback(host):
        raise UrlError(f"{url}: a console on {host} (beyond loopback) needs a token: add "
                       "?token_file=PATH ([console] token_file in the config)")
    server = ConsoleServer(url="", scheme=u.scheme, host=host)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = StreamConsolePort(reader, writer, echo=echo, telnet=telnet, max_line_chars=max_line_chars)
        task = asyncio.current_task()
        server._tasks.add(task)
        log.info("console session from %s", port.peer)
        try:
            if token is not None and not await _authenticate(port, token):
                return
            await handle_session(port)
        except Exception:  # noqa: BLE001 - one session's bug must not take the console down
            log.exception("console session from %s failed", port.peer)
        finally:
            server._tasks.discard(task)
            await port.close()

    server._server = await asyncio.start_server(on_connect, host, u.port)
    sock_host, sock_port = server._server.sockets[0].getsockname()[:2]
    server.port = sock_port
    shown = f"[{sock_host}]" if ":" in sock_host else sock_host
    server.url = f"{u.scheme}://{shown}:{sock_port}"
    log.info("console on %s", server.url)
    return server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_token(url: str, path: str) -> bytes:
    """The token: a regular file of at most TOKEN_MAX_BYTES, not empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UrlError(f"{url}: token_file {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UrlError(f"{url}: token_file {path} is not a regular file")
        data = os.read(fd, TOKEN_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > TOKEN_MAX_BYTES:
        raise UrlError(f"{url}: token_file {path} is longer than {TOKEN_MAX_BYTES} bytes")
    if not data.strip():
        raise UrlError(f"{url}: token_file {path} is empty")
    return data.strip()


async def _authenticate(port: StreamConsolePort, token: bytes) -> bool:
    """The first line that is not blank must be ``auth TOKEN`` (blank lines
    are a client's sync). Nothing else is read or run before it."""
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            line = ""
            while not line.strip():
                got = await port.readline()
                if got is None:
                    return False
                line = got
    except TimeoutError:
        await port.write("error: no auth within the time allowed; disconnecting\n")
        return False
    word, _, given = line.strip().partition(" ")
    if word == "auth" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token):
        return True
    log.warning("console %s: refused (%s)", port.peer, "bad token" if word == "auth" else "no auth line")
    await port.write("error: this console needs a token: send 'auth TOKEN' first "
                     "(mirrorfw console --token-file FILE)\n")
    return False


def _spawn(server: ConsoleServer, coro) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    server._tasks.add(task)
    task.add_done_callback(server._tasks.discard)


async def _pty_sessions(server: ConsoleServer, handle_session: SessionHandler, echo: bool,
                        max_line_chars: int) -> None:
    """One session after another on the pty; a broken pty is made anew at the same path."""
    while True:
        port = server._pty
        assert port is not None
        try:
            await handle_session(port)
        except Exception:  # noqa: BLE001 - keep the console alive for the next session
            log.exception("console session on %s failed", server.path)
        if port.broken:
            await port.close()
            server._pty = PtyConsolePort(server.path, echo=echo, max_line_chars=max_line_chars)
        await asyncio.sleep(0.05)  # a session that ends at once must not spin the loop

