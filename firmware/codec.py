"""One codec for both links: a frame table and its reply kinds in, the
frames' bytes out and back (firmware/frames.py declares the layout).

The replication link (firmware/protocol.py) and the session control link
(firmware/control_protocol.py) share the header, the CRC32C trailer and,
after the handshake, the MAC that seals every frame::

    header | fields | mac (32) | crc32c        mac = HMAC(mac key, role | seq | header | fields)

They differ in their frames, their reply kinds and their flags: the
replication link marks a sealed frame with ``FLAG_SEALED`` and has DATA
and ACK hot paths of its own; the control link knows only ``FLAG_REPLY``.
A ``Codec`` holds those differences; ``rest_length`` and ``is_sealed`` read
any header for the TCP driver.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable

import construct as cs
import crc32c

from firmware import seal
from firmware.frames import (
    CRC_BYTES,
    FLAG_REPLY,
    FLAG_SEALED,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    MAX_BODY_BYTES,
    PROTOCOL_VERSION,
    BadBody,
    BadCrc,
    BadKind,
    BadLength,
    BadMac,
    BadMagic,
    BadVersion,
    Frame,
    Header,
)
from firmware.layout import MAX_VOLUMES

MAC_BYTES = seal.MAC_BYTES
BODY_ERRORS = (cs.ConstructError, ValueError, TypeError, OverflowError, UnicodeError)


class FrameBody(cs.Adapter):
    """A frame class's ``BODY`` on the wire, that class's instance in Python.

    Parsing takes ``seq`` and ``flags`` from the context (they are in the
    header) and insists the body is used up exactly: trailing bytes are an
    error."""

    def __init__(self, cls: type[Frame]) -> None:
        super().__init__(cs.FocusedSeq("body", "body" / cls.BODY, cs.Terminated))
        self.cls = cls
        self.names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("seq", "flags"))

    def _decode(self, obj, context, path):
        return self.cls(seq=context.seq, flags=context.flags, **{k: obj[k] for k in self.names})

    def _encode(self, obj, context, path):
        return {k: getattr(obj, k) for k in self.names}

    def _build(self, obj, stream, context, path):
        # BODY itself: the Terminated check is for parsing only.
        return self.cls.BODY._build(self._encode(obj, context, path), stream, context, path)


def with_crc(parts: list) -> bytes:
    """The frame of ``parts`` (header, fields, maybe a MAC) with its CRC32C."""
    crc = crc32c.crc32c(b"".join(parts))
    parts.append(crc.to_bytes(CRC_BYTES, "big"))
    return b"".join(parts)


class Codec:
    """The frames of one link: ``frames`` by kind value, which of them are
    replies (``FLAG_REPLY``), the flags a frame may carry, and the flag that
    marks a sealed frame (0 where sealed frames are not marked)."""

    def __init__(self, link: str, frames: Iterable[type[Frame]], reply_kinds: Iterable[int], *,
                 known_flags: int, sealed_flag: int) -> None:
        self.link = link
        self.frames: dict[int, type[Frame]] = {cls.KIND.value: cls for cls in frames}
        self.reply_kinds = frozenset(int(k) for k in reply_kinds)
        self.known_flags = known_flags
        self.sealed_flag = sealed_flag
        # The body of every kind; parse and build with kind=<the kind's name> in
        # the context (the names, because that is what the header's Enum parses to).
        self.body = cs.Switch(cs.this.kind, {cls.KIND.name: FrameBody(cls) for cls in self.frames.values()},
                              default=cs.Error)

    def flags(self, frame: Frame) -> int:
        """The header flags of ``frame``: its own and FLAG_REPLY on a reply."""
        return frame.flags | (FLAG_REPLY if frame.KIND.value in self.reply_kinds else 0)

    def encode(self, frame: Frame, flags: int, *, mac_key: bytes | None = None, role: str = "") -> bytes:
        """The bytes of ``frame`` through its declaration, sealed with
        ``mac_key`` as ``role`` when a key is given. ProtocolError for a value
        that does not fit."""
        kind = frame.KIND
        try:
            body = self.body.build(frame, kind=kind.name)
        except BODY_ERRORS as e:
            raise BadBody(f"cannot encode {kind.name}: {e}") from None
        length = len(body) + (MAC_BYTES if mac_key is not None else 0)
        if length > MAX_BODY_BYTES:
            raise BadLength(f"{kind.name} body is {length} bytes, more than {MAX_BODY_BYTES}")
        if mac_key is not None:
            flags |= self.sealed_flag
        try:
            header = HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, flags, frame.seq, length)
        except struct.error:
            header = _build_header(kind, flags, frame.seq, length)
        parts = [header, body]
        if mac_key is not None:
            parts.append(seal.seal_mac(mac_key, role, frame.seq, header + body))
        return with_crc(parts)

    def check(self, buf) -> tuple[memoryview, type[Frame], int, int, int]:
        """The view, frame class, flags, seq and body length of one frame
        from exactly its bytes, once its header, length, CRC, kind and flags
        are this link's; ProtocolError says what is wrong."""
        view = memoryview(buf).cast("B")
        size = len(view)
        if size < HEADER_BYTES + CRC_BYTES:
            start = bytes(view[:4])
            if start != MAGIC[: len(start)]:
                raise BadMagic(f"bad magic {start!r} (expected {MAGIC!r})")
            raise BadLength(f"frame of {size} bytes is shorter than header and CRC ({HEADER_BYTES + CRC_BYTES})")
        magic, version, kind_value, flags, seq, length = HEADER.unpack_from(view)
        if magic != MAGIC:
            raise BadMagic(f"bad magic {magic!r} (expected {MAGIC!r})")
        if version != PROTOCOL_VERSION:
            raise BadVersion(f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})")
        if length > MAX_BODY_BYTES:
            raise BadLength(f"body length {length} over the limit {MAX_BODY_BYTES}")
        expected = HEADER_BYTES + length + CRC_BYTES
        if size != expected:
            raise BadLength(f"frame is {size} bytes but its header says {expected}")
        crc = int.from_bytes(view[-CRC_BYTES:], "big")
        actual = crc32c.crc32c(view[:-CRC_BYTES])
        if crc != actual:
            raise BadCrc(f"CRC32C mismatch: frame says {crc:#010x}, bytes give {actual:#010x}")
        cls = self.frames.get(kind_value)
        if cls is None:
            raise BadKind(f"unknown frame kind {kind_value} (not a {self.link} frame)")
        name = cls.KIND.name
        if flags & ~self.known_flags:
            raise BadBody(f"{name}: unknown flags {flags & ~self.known_flags:#x}")
        if bool(flags & FLAG_REPLY) != (kind_value in self.reply_kinds):
            raise BadBody(f"{name}: reply flags {flags:#x} do not fit the kind")
        return view, cls, flags, seq, length

    @staticmethod
    def check_mac(view: memoryview, name: str, seq: int, length: int, mac_key: bytes, role: str) -> int:
        """Where a sealed frame's fields end, once its MAC (by ``role``) matches."""
        if length < MAC_BYTES:
            raise BadMac(f"{name} seq {seq}: too short for its MAC")
        end = len(view) - CRC_BYTES - MAC_BYTES
        if not seal.check_seal_mac(mac_key, role, seq, view[:end], view[end : end + MAC_BYTES]):
            raise BadMac(f"{name} seq {seq}: MAC mismatch (rewritten, forged, or from another connection)")
        return end

    def parse(self, view: memoryview, name: str, seq: int, flags: int, end: int) -> Frame:
        """The frame whose fields are ``view[HEADER_BYTES:end]``, through its declaration."""
        try:
            return self.body.parse(bytes(view[HEADER_BYTES:end]), kind=name, seq=seq, flags=flags)
        except cs.TerminatedError:
            raise BadBody(f"{name} body has trailing bytes") from None
        except cs.CheckError:  # the only Check: a volume list's count
            raise BadBody(f"{name} lists more than {MAX_VOLUMES} volumes") from None
        except (cs.ConstructError, UnicodeError, ValueError, OverflowError) as e:
            text = str(e) or type(e).__name__
            raise BadBody(f"{name} body does not parse: {text.splitlines()[0]}") from None

    def decode(self, buf, *, mac_key: bytes | None = None, role: str = "") -> Frame:
        """One frame from exactly its bytes; with ``mac_key``, a sealed frame
        from ``role`` whose MAC is checked before its body is parsed."""
        view, cls, flags, seq, length = self.check(buf)
        name = cls.KIND.name
        end = len(view) - CRC_BYTES
        if mac_key is not None:
            end = self.check_mac(view, name, seq, length, mac_key, role)
        return self.parse(view, name, seq, flags & ~(FLAG_REPLY | self.sealed_flag), end)


def _build_header(kind, flags: int, seq: int, length: int) -> bytes:
    """The header through its declaration, for the message when a value does not fit."""
    try:
        return Header.build(dict(version=PROTOCOL_VERSION, kind=kind.name, flags=flags, seq=seq, length=length))
    except cs.ConstructError as e:
        raise BadBody(f"cannot encode {kind.name} header: {e}") from None


def rest_length(header: bytes) -> int:
    """How many bytes follow a frame header on the wire (body + CRC).

    The link reads the header, asks this, then reads the rest. For a header
    that is not ours, or a length over the limit, it returns 0 so the link
    hands back the header alone and ``decode`` names the problem.
    """
    if len(header) < HEADER_BYTES or header[:4] != MAGIC:
        return 0
    length = HEADER.unpack_from(header)[5]
    if length > MAX_BODY_BYTES:
        return 0
    return length + CRC_BYTES


def is_sealed(header: bytes) -> bool:
    """Whether a frame header says the frame is sealed. The TCP driver asks
    it of the frames this side sends: a side seals only after it has
    authenticated its peer, so from then on the peer may send long frames."""
    return len(header) >= HEADER_BYTES and header[:4] == MAGIC and bool(HEADER.unpack_from(header)[3] & FLAG_SEALED)
