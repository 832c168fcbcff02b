"""The replication link's wire format, declared once with construct.

Every frame is ``header | body | crc32c``::

    magic "MFWL" | version u8 | kind u8 | flags u16 | seq u64 | length u32   (20 bytes)
    body: ``length`` bytes, laid out per kind (the structs below)
    crc: CRC32C (Castagnoli) of header and body, u32 big-endian

``seq`` numbers requests; replies (ACK, STATUS, ERROR) carry the request's
sequence number in their body, so many requests may be in flight at once.
Parsing and building use the same declarations; ``decode`` turns any bad
input into a ``ProtocolError`` that says what was wrong, never another
exception.

The handshake (primary P connects to secondary S)::

    P -> S  HELLO(version, session id, volume geometry)
    S -> P  AUTH_CHALLENGE(nonce_s)
    P -> S  AUTH_RESPONSE(mac = HMAC(secret, "primary" | nonce_s | session), challenge = nonce_p)
    S -> P  AUTH_RESPONSE(mac = HMAC(secret, "secondary" | nonce_p | session))
    S -> P  STATUS(session, committed CG, new, geometry)    or ERROR(code, message)
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import ClassVar

import construct as cs
import crc32c

PROTOCOL_VERSION = 1
MAGIC = b"MFWL"
MAX_BODY_BYTES = 64 << 20  # a DATA frame carries one track; 64 MiB leaves room for huge tracks
NONCE_BYTES = 32
MAC_BYTES = 32

Header = cs.Struct(
    "magic" / cs.Bytes(4),
    "version" / cs.Int8ub,
    "kind" / cs.Int8ub,
    "flags" / cs.Int16ub,
    "seq" / cs.Int64ub,
    "length" / cs.Int32ub,
)
HEADER_BYTES = Header.sizeof()
CRC_BYTES = 4

FLAG_REPLY = 0x0001  # set on ACK/STATUS/ERROR; informative, checked only for unknown bits
KNOWN_FLAGS = FLAG_REPLY

Text = cs.PascalString(cs.Int16ub, "utf8")

Geometry = cs.Struct(
    "name" / Text,
    "size_bytes" / cs.Int64ub,
    "track_bytes" / cs.Int32ub,
)


class Kind(enum.IntEnum):
    HELLO = 1
    AUTH_CHALLENGE = 2
    AUTH_RESPONSE = 3
    DATA = 4
    DRAIN_DONE = 5
    PREPARE = 6
    COMMIT = 7
    ABORT = 8
    ACK = 9
    STATUS = 10
    ERROR = 11


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1  # magic, length, CRC, kind or body did not parse
    VERSION = 2
    AUTH = 3
    GEOMETRY = 4
    SESSION = 5
    STATE = 6  # a frame that is legal but not now (DATA before the handshake)
    INTERNAL = 7
    REFUSED = 8  # the secondary refused a request (per-request failures use ACK status)


class AckStatus(enum.IntEnum):
    OK = 0
    REFUSED = 1  # RemoteError from the secondary: the message says why
    FAILED = 2  # the secondary failed doing it (device error, ...)


# -- errors ------------------------------------------------------------------


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code`` is what an ERROR frame says."""

    code = ErrorCode.BAD_FRAME


class BadMagic(ProtocolError):
    pass


class BadVersion(ProtocolError):
    code = ErrorCode.VERSION


class BadLength(ProtocolError):
    pass


class BadCrc(ProtocolError):
    pass


class BadKind(ProtocolError):
    pass


class BadBody(ProtocolError):
    pass


class AuthError(ProtocolError):
    code = ErrorCode.AUTH


class PeerError(ProtocolError):
    """The peer sent an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code = ErrorCode(code)
            name = self.code.name
        except ValueError:
            name = str(code)
        super().__init__(f"peer error {name}: {message}")
        self.peer_message = message


# -- frames ------------------------------------------------------------------


@dataclass(kw_only=True)
class Frame:
    seq: int = 0
    flags: int = 0
    KIND: ClassVar[Kind]
    BODY: ClassVar[cs.Construct]

    def body_fields(self) -> dict:
        return {k: getattr(self, k) for k in _body_names(type(self))}


@dataclass
class Hello(Frame):
    version: int
    session_id: str
    volumes: list[tuple[str, int, int]] = field(default_factory=list)  # (name, size_bytes, track_bytes)
    KIND = Kind.HELLO
    BODY = cs.Struct("version" / cs.Int16ub, "session_id" / Text, "volumes" / cs.PrefixedArray(cs.Int16ub, Geometry))


@dataclass
class AuthChallenge(Frame):
    nonce: bytes
    KIND = Kind.AUTH_CHALLENGE
    BODY = cs.Struct("nonce" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes))


@dataclass
class AuthResponse(Frame):
    mac: bytes
    challenge: bytes = b""  # the responder's counter-challenge (empty in the last step)
    KIND = Kind.AUTH_RESPONSE
    BODY = cs.Struct(
        "mac" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes),
        "challenge" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes),
    )


@dataclass
class Data(Frame):
    volume: int  # index into the HELLO geometry list
    track: int
    cg_seq: int
    payload: bytes
    KIND = Kind.DATA
    BODY = cs.Struct(
        "volume" / cs.Int16ub, "track" / cs.Int64ub, "cg_seq" / cs.Int64ub, "payload" / cs.GreedyBytes
    )


_CgBody = cs.Struct("cg_seq" / cs.Int64ub)


@dataclass
class DrainDone(Frame):
    cg_seq: int
    KIND = Kind.DRAIN_DONE
    BODY = _CgBody


@dataclass
class Prepare(Frame):
    cg_seq: int
    KIND = Kind.PREPARE
    BODY = _CgBody


@dataclass
class Commit(Frame):
    cg_seq: int
    KIND = Kind.COMMIT
    BODY = _CgBody


@dataclass
class Abort(Frame):
    cg_seq: int
    KIND = Kind.ABORT
    BODY = _CgBody


@dataclass
class Ack(Frame):
    acked: int  # the seq of the request this answers
    status: int = AckStatus.OK
    message: str = ""
    KIND = Kind.ACK
    BODY = cs.Struct("acked" / cs.Int64ub, "status" / cs.Int16ub, "message" / Text)


@dataclass
class Status(Frame):
    acked: int
    session_id: str
    committed_cg: int
    new: bool
    volumes: list[tuple[str, int, int]] = field(default_factory=list)
    KIND = Kind.STATUS
    BODY = cs.Struct(
        "acked" / cs.Int64ub,
        "session_id" / Text,
        "committed_cg" / cs.Int64ub,
        "new" / cs.Flag,
        "volumes" / cs.PrefixedArray(cs.Int16ub, Geometry),
    )


@dataclass
class Error(Frame):
    code: int
    message: str
    KIND = Kind.ERROR
    BODY = cs.Struct("code" / cs.Int16ub, "message" / Text)


FRAME_TYPES: dict[Kind, type[Frame]] = {
    t.KIND: t for t in (Hello, AuthChallenge, AuthResponse, Data, DrainDone, Prepare, Commit, Abort, Ack, Status, Error)
}
REPLY_KINDS = {Kind.ACK, Kind.STATUS, Kind.ERROR}
# Decoding insists the body is used up exactly: trailing bytes are an error.
_WHOLE_BODY = {k: cs.FocusedSeq("body", "body" / t.BODY, cs.Terminated) for k, t in FRAME_TYPES.items()}


def _body_names(cls: type[Frame]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("seq", "flags")]


def _to_wire(frame: Frame) -> dict:
    fields = frame.body_fields()
    if "volumes" in fields:
        fields["volumes"] = [dict(name=n, size_bytes=s, track_bytes=t) for n, s, t in fields["volumes"]]
    return fields


def _from_wire(kind: Kind, seq: int, flags: int, body: cs.Container) -> Frame:
    cls = FRAME_TYPES[kind]
    values = {k: body[k] for k in _body_names(cls)}
    if "volumes" in values:
        values["volumes"] = [(g.name, g.size_bytes, g.track_bytes) for g in values["volumes"]]
    for k, v in values.items():
        if isinstance(v, (bytearray, memoryview)):
            values[k] = bytes(v)
    return cls(seq=seq, flags=flags, **values)


def encode(frame: Frame) -> bytes:
    """The bytes of one frame; raises ProtocolError for a value that does not fit."""
    kind = frame.KIND
    try:
        body = frame.BODY.build(_to_wire(frame))
    except (cs.ConstructError, ValueError, TypeError, OverflowError, UnicodeError) as e:
        raise BadBody(f"cannot encode {kind.name}: {e}") from None
    if len(body) > MAX_BODY_BYTES:
        raise BadLength(f"{kind.name} body is {len(body)} bytes, more than {MAX_BODY_BYTES}")
    flags = frame.flags | (FLAG_REPLY if kind in REPLY_KINDS else 0)
    try:
        header = Header.build(
            dict(magic=MAGIC, version=PROTOCOL_VERSION, kind=kind, flags=flags, seq=frame.seq, length=len(body))
        )
    except cs.ConstructError as e:
        raise BadBody(f"cannot encode {kind.name} header: {e}") from None
    crc = crc32c.crc32c(body, crc32c.crc32c(header))
    return b"".join((header, body, crc.to_bytes(4, "big")))


def rest_length(header: bytes) -> int:
    """How many bytes follow a frame header on the wire (body + CRC).

    The link reads the header, asks this, then reads the rest. For a header
    that is not ours, or a length over the limit, it returns 0 so the link
    hands back the header alone and ``decode`` names the problem.
    """
    if len(header) < HEADER_BYTES or header[:4] != MAGIC:
        return 0
    length = int.from_bytes(header[16:20], "big")
    if length > MAX_BODY_BYTES:
        return 0
    return length + CRC_BYTES


def decode(buf: bytes) -> Frame:
    """One frame from exactly its bytes; ProtocolError says what is wrong."""
    buf = bytes(buf)
    if len(buf) < HEADER_BYTES + CRC_BYTES:
        if buf[:4] != MAGIC[: len(buf[:4])]:
            raise BadMagic(f"bad magic {buf[:4]!r} (expected {MAGIC!r})")
        raise BadLength(f"frame of {len(buf)} bytes is shorter than header and CRC ({HEADER_BYTES + CRC_BYTES})")
    h = Header.parse(buf[:HEADER_BYTES])
    if h.magic != MAGIC:
        raise BadMagic(f"bad magic {h.magic!r} (expected {MAGIC!r})")
    if h.version != PROTOCOL_VERSION:
        raise BadVersion(f"protocol version {h.version} not supported (this side speaks {PROTOCOL_VERSION})")
    if h.length > MAX_BODY_BYTES:
        raise BadLength(f"body length {h.length} over the limit {MAX_BODY_BYTES}")
    expected = HEADER_BYTES + h.length + CRC_BYTES
    if len(buf) != expected:
        raise BadLength(f"frame is {len(buf)} bytes but its header says {expected}")
    body = buf[HEADER_BYTES : HEADER_BYTES + h.length]
    crc = int.from_bytes(buf[-CRC_BYTES:], "big")
    actual = crc32c.crc32c(buf[:-CRC_BYTES])
    if crc != actual:
        raise BadCrc(f"CRC32C mismatch: frame says {crc:#010x}, bytes give {actual:#010x}")
    try:
        kind = Kind(h.kind)
    except ValueError:
        raise BadKind(f"unknown frame kind {h.kind}") from None
    if h.flags & ~KNOWN_FLAGS:
        raise BadBody(f"{kind.name}: unknown flags {h.flags & ~KNOWN_FLAGS:#x}")
    if bool(h.flags & FLAG_REPLY) != (kind in REPLY_KINDS):
        raise BadBody(f"{kind.name}: reply flags {h.flags:#x} do not fit the kind")
    try:
        parsed = _WHOLE_BODY[kind].parse(body)
    except cs.TerminatedError:
        raise BadBody(f"{kind.name} body has trailing bytes") from None
    except (cs.ConstructError, UnicodeError, ValueError, OverflowError) as e:
        raise BadBody(f"{kind.name} body does not parse: {_first_line(e)}") from None
    return _from_wire(kind, h.seq, h.flags & ~FLAG_REPLY, parsed)


def _first_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


# -- authentication ------------------------------------------------------------


def auth_mac(secret: bytes, role: str, nonce: bytes, session_id: str) -> bytes:
    """HMAC-SHA256 over the role that answers, the peer's nonce and the session.

    The role is in the MAC so a response cannot be reflected back at its
    sender; the session binds the response to this pairing."""
    msg = b"mirrorfw-link-v1\0" + role.encode() + b"\0" + nonce + b"\0" + session_id.encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def check_mac(secret: bytes, role: str, nonce: bytes, session_id: str, mac: bytes) -> bool:
    return hmac.compare_digest(auth_mac(secret, role, nonce, session_id), mac)
