"""A console client in the shape of labgrid's and pexpect's: ``sendline``,
``expect``, ``run``, ``run_check``, plus ``run_json`` for ``--json`` replies.

It talks through pyserial: ``serial_for_url`` for ``socket://`` and
``rfc2217://``, ``serial.Serial(path)`` for ``pty:///path`` (or a plain
device path such as /dev/ttyUSB0). Every byte received (and every line
sent) goes to the console log when ``log_path`` is given.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
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


def open_serial(url: str, timeout_s: float = POLL_S) -> serial.SerialBase:
    """A pyserial port for a console URL (pty:///path, socket://, rfc2217://, or a device path)."""
    try:
        if url.startswith("pty://"):
            return serial.Serial(url[len("pty://"):], timeout=timeout_s)
        if url.startswith("/"):
            return serial.Serial(url, timeout=timeout_s)
        return serial.serial_for_url(url, timeout=timeout_s)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise ConsoleConnectionError(f"cannot open console {url}: {exc}") from None


class ConsoleClient:
    def __init__(self, url: str, *, timeout_s: float = 10.0, log_path: str | Path | None = None,
                 prompt: re.Pattern = PROMPT, sync: bool = True) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.prompt = prompt
        self._buf = bytearray()
        self.before = b""
        self.after = b""
        self.match: re.Match | None = None
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self.serial = open_serial(url)
        if sync:
            try:
                self.sync()
            except ConsoleError:
                self.close()
                raise

    # ---- pexpect-shaped primitives ------------------------------------------

    def send(self, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        try:
            self.serial.write(raw)
            self.serial.flush()
        except (serial.SerialException, OSError) as exc:
            raise ConsoleConnectionError(f"console {self.url}: write failed: {exc}") from None
        if self._log:
            self._log.write(raw)
            self._log.flush()

    def sendline(self, text: str = "") -> None:
        self.send(text + "\n")

    def read_nonblocking(self) -> bytes:
        """What arrived within the poll interval (maybe nothing); logged, not buffered."""
        try:
            data = self.serial.read(max(1, self.serial.in_waiting))  # waits up to POLL_S
            # Then whatever else is there (socket:// reports 1 for "some", so loop).
            while data and (waiting := self.serial.in_waiting) and len(data) < READ_BATCH_BYTES:
                data += self.serial.read(waiting)
        except (serial.SerialException, OSError) as exc:
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
            self._buf += self.read_nonblocking()

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
        self.sendline("")
        self.sendline(f"help {marker}")
        # The marker followed by a quote is only in the error reply, never in an echo.
        self.expect(re.escape(marker) + r"'[^\n]*\n", timeout)
        self.expect(self.prompt, timeout)

    # ---- labgrid-shaped commands --------------------------------------------

    def run(self, command: str, timeout: float | None = None) -> tuple[list[str], int]:
        """Run one command; (output lines, 0 on success / 1 on an error reply)."""
        if "\n" in command or "\r" in command:
            raise ValueError("run takes one line")
        self.sendline(command)
        self.expect(self.prompt, timeout)
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
