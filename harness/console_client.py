"""A console client in the shape of labgrid's and pexpect's: ``sendline``,
``expect``, ``run``, ``run_check``, plus ``run_json`` for ``--json`` replies.

It talks through pyserial: ``serial_for_url`` for ``socket://`` and
``rfc2217://``, ``serial.Serial(path)`` for ``pty:///path`` (or a plain
device path such as /dev/ttyUSB0). Every byte received (and every line
sent) goes to the console log when ``log_path`` is given.

``token`` (or ``token_file``): sent as ``auth TOKEN`` before anything else,
for a TCP console that has a token (drivers/console.py).

``run`` pairs one command with the next prompt, so it must start with
nothing owed: a line the caller sent itself (``send``/``sendline``) may
still have a reply and a prompt on the way. A streaming ``events`` ended by
``sendline("")`` answers with a prompt nobody has read; the next ``run``
took that prompt as its own and returned the stream's tail, and every later
``run`` the previous command's reply. So after a raw send, ``run`` first
resynchronises (``sync``: a marker command and its prompt), which also ends
a stream still running.

A pty is one line: a terminal program attached to it (picocom, screen) and
this client would each read part of the other's replies. So a pty this
client opens is refused with one line, ``busy: ... attached by NAME (pid
N)``, when another process holds it open (``attached_by``; the controller
that serves it is recognised by holding its master), and while the client
runs it holds the pty's exclusive lock, which picocom honours.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import IO

import serial

log = logging.getLogger(__name__)

PROMPT = re.compile(rb"mirrorfw(?:-sec)?> ")
POLL_S = 0.05
READ_BATCH_BYTES = 65536


class ConsoleError(Exception):
    """The console client's error family."""


class ConsoleConnectionError(ConsoleError):
    """The console cannot be reached, or went away."""


class ConsoleBusy(ConsoleConnectionError):
    """Another program is attached to the console's pty."""


class ConsoleTimeout(ConsoleError):
    """``expect`` saw no match in time; ``seen`` holds what arrived meanwhile."""

    def __init__(self, message: str, seen: bytes) -> None:
        super().__init__(message)
        self.seen = seen


class ConsoleCommandError(ConsoleError):
    """The command was answered with an error."""

    def __init__(self, command: str, output: list[str]) -> None:
        super().__init__(f"{command!r}: {' / '.join(output) or 'error'}")
        self.command = command
        self.output = output


Pattern = str | bytes | re.Pattern


def attached_by(tty_path: str) -> list[tuple[int, str]]:
    """(pid, name) of every process but this one holding the pty slave
    ``tty_path`` (a /dev/pts/N or a symlink to one) open, except the one
    holding its master (the controller serving it). Only what /proc shows
    (every process of this user; all of them as root)."""
    try:
        slave = os.path.realpath(tty_path)
        index = slave.rsplit("/", 1)[1] if slave.startswith("/dev/pts/") else None
    except OSError:
        return []
    if index is None:
        return []
    me, found = os.getpid(), []
    for pid_text in os.listdir("/proc"):
        if not pid_text.isdigit() or int(pid_text) == me:
            continue
        holds_slave = holds_master = False
        try:
            fd_dir = f"/proc/{pid_text}/fd"
            for fd in os.listdir(fd_dir):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target == slave:
                    holds_slave = True
                elif target == "/dev/ptmx":
                    with open(f"/proc/{pid_text}/fdinfo/{fd}") as info:
                        holds_master |= f"tty-index:\t{index}\n" in info.read()
        except OSError:  # gone, or not ours to look at
            continue
        if holds_slave and not holds_master:
            try:
                with open(f"/proc/{pid_text}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "?"
            found.append((int(pid_text), name))
    return found


def open_serial(url: str, timeout_s: float = POLL_S) -> serial.SerialBase:
    """A pyserial port for a console URL (pty:///path, socket://, rfc2217://, or a device path).
    A pty another program is attached to raises ConsoleBusy."""
    try:
        if url.startswith(("pty://", "/")):
            path = url[len("pty://"):] if url.startswith("pty://") else url
            _refuse_if_attached(url, path)
            try:
                return serial.Serial(path, timeout=timeout_s, exclusive=True)
            except serial.SerialException as exc:
                if "lock" in str(exc).lower():  # picocom (or another client) holds the lock
                    raise ConsoleBusy(f"busy: console {url} is locked by another program "
                                      f"({_holders(path) or 'unknown'}); detach it first") from None
                raise
        return serial.serial_for_url(url, timeout=timeout_s)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise ConsoleConnectionError(f"cannot open console {url}: {exc}") from None


def _holders(path: str) -> str:
    return ", ".join(f"{name} (pid {pid})" for pid, name in attached_by(path))


def _refuse_if_attached(url: str, path: str) -> None:
    holders = _holders(path)
    if holders:
        raise ConsoleBusy(f"busy: console {url} is attached by {holders}; detach it first "
                          "(a pty is one line: two readers would each get half the replies)")


class ConsoleClient:
    def __init__(self, url: str, *, timeout_s: float = 10.0, log_path: str | Path | None = None,
                 prompt: re.Pattern = PROMPT, sync: bool = True, token: str | None = None,
                 token_file: str | Path | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.prompt = prompt
        self._buf = bytearray()
        self.before = b""
        self.after = b""
        self.match: re.Match | None = None
        self._in_step = False  # nothing owed: no reply or prompt on the way (see run)
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        if token is None and token_file is not None:
            token = read_token(token_file)
        self.serial = open_serial(url)
        try:
            if token is not None:
                self._write(f"auth {token}\n".encode())
            if sync:
                self.sync()
        except ConsoleError:
            self.close()
            raise

    # ---- pexpect-shaped primitives ------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Write bytes as they are; the next ``run`` resynchronises first."""
        self._in_step = False
        self._write(data.encode() if isinstance(data, str) else bytes(data))

    def _write(self, raw: bytes) -> None:
        try:
            self.serial.write(raw)
            self.serial.flush()
        except (serial.SerialException, OSError) as exc:
            raise ConsoleConnectionError(f"console {self.url}: write failed: {exc}") from None
        if self._log:
            self._log.write(b"auth ***\n" if raw.startswith(b"auth ") else raw)  # never the token
            self._log.flush()

    def sendline(self, text: str = "") -> None:
        self.send(text + "\n")

    def read_nonblocking(self) -> bytes:
        """What arrived within the poll interval (maybe nothing); logged, not buffered."""
        data = b""
        try:
            data = self.serial.read(max(1, self.serial.in_waiting))  # waits up to POLL_S
            # Then whatever else is there (socket:// reports 1 for "some", so loop).
            while data and (waiting := self.serial.in_waiting) and len(data) < READ_BATCH_BYTES:
                data += self.serial.read(waiting)
        except (serial.SerialException, OSError) as exc:
            if not data:  # else hand over what came before the hang-up (a refusal); the next read raises
                raise ConsoleConnectionError(f"console {self.url}: read failed: {exc}") from None
        if data and self._log:
            self._log.write(data)
            self._log.flush()
        return data

    def expect(self, pattern: Pattern | list[Pattern], timeout: float | None = None) -> int:
        """Wait until one of the patterns matches what arrived; return its index.
        ``before``/``after``/``match`` are set as in pexpect; the match and
        what precedes it are consumed."""
        patterns = pattern if isinstance(pattern, list) else [pattern]
        compiled = [_compile(p) for p in patterns]
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        while True:
            best: tuple[int, int, re.Match] | None = None
            buf = bytes(self._buf)  # match objects must not see the buffer change under them
            for i, rx in enumerate(compiled):
                m = rx.search(buf)
                if m and (best is None or m.start() < best[1]):
                    best = (i, m.start(), m)
            if best is not None:
                i, _, m = best
                self.before, self.after, self.match = buf[:m.start()], m.group(0), m
                del self._buf[:m.end()]
                return i
            if time.monotonic() >= deadline:
                seen = bytes(self._buf)
                shown = " | ".join(rx.pattern.decode(errors="replace") for rx in compiled)
                raise ConsoleTimeout(f"console {self.url}: no {shown!r} within "
                                     f"{self.timeout_s if timeout is None else timeout} s; "
                                     f"seen: {seen[-400:]!r}", seen)
            try:
                self._buf += self.read_nonblocking()
            except ConsoleConnectionError as exc:
                # A console that refuses (a wrong or missing token) says why, then hangs up.
                said = bytes(self._buf).decode("utf-8", errors="replace").splitlines()
                refusal = next((line.strip() for line in said if line.startswith("error: ")), None)
                if refusal is None:
                    raise
                raise ConsoleConnectionError(f"console {self.url} hung up: {refusal}") from exc

    def read_available(self) -> bytes:
        """Whatever has arrived and was not consumed by expect."""
        while self.serial.in_waiting:
            self._buf += self.read_nonblocking()
        data, self._buf = bytes(self._buf), bytearray()
        return data

    def sync(self, timeout: float | None = None) -> None:
        """Skip the banner and any stale prompts: after this, the console
        waits at a fresh prompt and nothing older is buffered."""
        marker = f"__sync_{secrets.token_hex(4)}"
        # The blank line first: a session left streaming events by an earlier
        # client (a pty outlives its clients) ends the stream on any line.
        self._write(b"\n")
        self._write(f"help {marker}\n".encode())
        # The marker followed by a quote is only in the error reply, never in an echo.
        try:
            self.expect(re.escape(marker) + r"'[^\n]*\n", timeout)
            self.expect(self.prompt, timeout)
        except ConsoleTimeout as exc:
            said = exc.seen.decode("utf-8", errors="replace").strip().splitlines()
            refusal = next((line for line in said if line.startswith("error: ")), None)
            wait = self.timeout_s if timeout is None else timeout
            raise ConsoleTimeout(f"console {self.url}: " + (refusal or (
                f"no answer within {wait} s (is the controller running, or another program reading "
                "its line?)")), exc.seen) from None
        self._in_step = True

    # ---- labgrid-shaped commands --------------------------------------------

    def run(self, command: str, timeout: float | None = None) -> tuple[list[str], int]:
        """Run one command; (output lines, 0 on success / 1 on an error reply)."""
        if "\n" in command or "\r" in command:
            raise ValueError("run takes one line")
        if not self._in_step:
            self.sync(timeout)
        self._in_step = False  # until its prompt is read (a timeout leaves it owed)
        self._write(f"{command}\n".encode())
        self.expect(self.prompt, timeout)
        self._in_step = True
        text = self.before.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        if lines and lines[0].strip() == command.strip():  # the console's echo
            lines = lines[1:]
        while lines and not lines[-1].strip():
            lines.pop()
        return lines, _status(lines)

    def run_check(self, command: str, timeout: float | None = None) -> list[str]:
        lines, status = self.run(command, timeout)
        if status:
            raise ConsoleCommandError(command, lines)
        return lines

    def run_json(self, command: str, timeout: float | None = None, *, check: bool = True) -> dict:
        """The command's JSON reply as a dict (``--json`` is added when missing).
        With check, an ``ok: false`` reply raises ConsoleCommandError."""
        if "--json" not in command.split():
            command += " --json"
        lines, status = self.run(command, timeout)
        for line in lines:
            if line.startswith("{"):
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if check and not reply.get("ok"):
                    raise ConsoleCommandError(command, [reply.get("error", line)])
                return reply
        raise ConsoleError(f"{command!r}: no JSON line in the reply: {lines!r}")

    def close(self) -> None:
        try:
            self.serial.close()
        finally:
            if self._log:
                self._log.close()
                self._log = None

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_token(path: str | Path) -> str:
    """A console token file: regular, at most 4 KiB, not empty (ConsoleError if not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConsoleError(f"token file {path} is not a regular file")
            data = os.read(fd, 4097)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConsoleError(f"token file {path}: {exc.strerror or exc}") from None
    token = data.decode("utf-8", errors="replace").strip()
    if len(data) > 4096 or not token or "\n" in token or "\r" in token:
        raise ConsoleError(f"token file {path}: expected one line of at most 4096 bytes")
    return token


class EventFollower:
    """Follows a console's event stream in a thread: ``command`` (an
    ``events`` line) is sent once, then every line that arrives goes to
    ``take(line)`` (stripped, decoded) until ``close``. Subclasses say what
    a line means to them; ``take`` runs in the follower's thread."""

    def __init__(self, console_url: str, command: str = "events", timeout_s: float = 1.0) -> None:
        self._stop = threading.Event()
        self._client = ConsoleClient(console_url, timeout_s=timeout_s)
        self._client.sendline(command)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        pending = b""
        while not self._stop.is_set():
            try:
                pending += self._client.read_nonblocking()
            except ConsoleError:
                return
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self.take(raw.decode(errors="replace").strip())

    def take(self, line: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._client.close()


def _compile(p: Pattern) -> re.Pattern:
    if isinstance(p, re.Pattern):
        return p if isinstance(p.pattern, bytes) else re.compile(p.pattern.encode(), p.flags & ~re.UNICODE)
    return re.compile(p.encode() if isinstance(p, str) else p)


def _status(lines: list[str]) -> int:
    if not lines:
        return 0
    first = lines[0]
    if first.startswith("error: "):
        return 1
    if first.startswith("{"):
        try:
            return 0 if json.loads(first).get("ok") else 1
        except (ValueError, AttributeError):
            return 0
    return 0
