"""The one record every trace reader yields, and streaming file helpers.

Readers never load a file whole: they iterate lines (or fixed-size binary
records) and yield ``IoRecord`` as they go, so multi-GB traces cost only the
memory of one line. Gzip-compressed traces (``.gz``, as MSR ships them) are
opened transparently, detected by their magic bytes rather than the name.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from testbench.errors import TraceError

OPS = ("R", "W", "T", "F")  # read, write, trim (discard), flush
SECTOR = 512


@dataclass(slots=True, frozen=True)
class IoRecord:
    """One I/O of a trace. ``ts_ns`` is in the trace's own time base (absolute or
    relative, per format); replay uses differences only."""

    ts_ns: int
    op: str  # one of OPS
    offset_bytes: int
    length_bytes: int
    device: str


def _is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _TraceGzip(gzip.GzipFile):
    """A gzip'd trace whose damage is a TraceError naming the file (gzip
    raises BadGzipFile, EOFError or zlib.error from any read)."""

    def read(self, size: int = -1) -> bytes:
        try:
            return super().read(size)
        except (OSError, EOFError, zlib.error) as e:
            raise TraceError(str(self.name), 0, f"not a readable gzip file: {e}") from None


def open_binary(path: str | os.PathLike) -> io.BufferedIOBase:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such trace file")
    if _is_gzip(path):
        return _TraceGzip(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


def head_bytes(path: str | os.PathLike, n: int = 8192) -> bytes:
    with open_binary(path) as f:
        try:
            return f.read(n)
        except TraceError:  # a truncated or damaged gzip sniffs as nothing
            return b""


MAX_LINE_BYTES = 1 << 20  # no trace format has lines near this; a longer one is not a text trace
READ_CHUNK_BYTES = 1 << 20


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line_no from 1, line without its newline); undecodable bytes become U+FFFD
    so a stray byte is reported by the parser with its line number. Lines end
    with LF, CRLF or CR. A line longer than ``MAX_LINE_BYTES`` is a
    TraceError as soon as that much of it is read: a 1 GB file of one line
    once grew the reader to 2.1 GB before any error."""
    n = 0
    with open_binary(path) as raw:
        rest = b""
        while True:
            chunk = raw.read(READ_CHUNK_BYTES)
            if chunk:
                parts = (rest + chunk).split(b"\n")
                rest = parts.pop()
            else:
                parts, rest = ([rest] if rest else []), b""
            for part in parts:
                if part.endswith(b"\r"):
                    part = part[:-1]
                for line in part.split(b"\r") if b"\r" in part else (part,):
                    n += 1
                    if len(line) > MAX_LINE_BYTES:
                        raise TraceError(str(path), n, f"line longer than {MAX_LINE_BYTES} bytes; not a text trace?")
                    yield n, line.decode("utf-8", "replace")
            if len(rest) > MAX_LINE_BYTES:
                raise TraceError(str(path), n + 1, f"line longer than {MAX_LINE_BYTES} bytes; not a text trace?")
            if not chunk:
                return


def parse_int(path, line_no: int, text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(str(path), line_no, f"{what} {text!r} is not an integer") from None
    if value < 0:
        raise TraceError(str(path), line_no, f"{what} {value} is negative")
    return value


def parse_number(path, line_no: int, text: str, what: str) -> float | int:
    """An integer, or a decimal for formats whose timestamps may carry fractions."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise TraceError(str(path), line_no, f"{what} {text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise TraceError(str(path), line_no, f"{what} {text!r} is negative or not finite")
    return value


class LineWriter:
    """Buffered text output for writers; counts what it wrote and what it skipped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._f = open(path, "w", encoding="utf-8", buffering=1 << 20)
        self.written = 0
        self.skipped = 0

    def line(self, text: str) -> None:
        self._f.write(text)
        self._f.write("\n")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> LineWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class WriteResult:
    """What a writer did: records written, records the format cannot express."""

    written: int = 0
    skipped: int = 0


def sniff_lines(head: bytes, complete: bool, fits, header: str | None = None) -> bool:
    """True when the head has data lines and every one ``fits``; a first line
    starting with ``header`` (case-insensitive) is the column header, skipped."""
    lines = head_lines(head, complete=complete)
    if header is not None and lines and lines[0].lower().startswith(header):
        lines = lines[1:]
    return bool(lines) and all(fits(ln) for ln in lines)


def head_lines(head: bytes, n: int = 8, *, complete: bool = False) -> list[str]:
    """The first ``n`` non-blank lines of a file's head; the last line is dropped
    when the head may have cut it (``complete`` says the head is the whole file)."""
    lines = head.decode("utf-8", "replace").splitlines()
    if not complete and not head.endswith(b"\n"):
        lines = lines[:-1]
    return [ln for ln in lines if ln.strip()][:n]
