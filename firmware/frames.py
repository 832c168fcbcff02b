"""The link frames, declared once with construct: the header both links
share, the replication link's kinds and frame classes, and the errors a
frame that cannot be accepted raises.

Every frame is ``header | body | crc32c``::

    magic "MFWL" | version u8 | kind u8 | flags u16 | seq u64 | length u32   (20 bytes)
    body: ``length`` bytes, laid out per kind (each frame class's ``BODY``)
    crc: CRC32C (Castagnoli) of header and body, u32 big-endian

``seq`` numbers requests; replies (ACK, STATUS, ERROR) carry the request's
sequence number in their body, so many requests may be in flight at once.
How frames are sealed, built and parsed is in firmware/protocol.py (the
replication link) and firmware/codec.py (what both links share); the
control link's own frames are in firmware/control_protocol.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import construct as cs

from firmware.layout import MAX_VOLUMES
from hal.wire import fast_struct

PROTOCOL_VERSION = 3  # 2: HELLO carries the primary's format generation; 3: frames sealed after the handshake
MAGIC = b"MFWL"
MAX_BODY_BYTES = 64 << 20  # a DATA frame carries one track; 64 MiB leaves room for huge tracks
PREAUTH_FRAME_BYTES = 64 << 10  # the longest frame from a peer not yet authenticated (a HELLO of 48 volumes is ~10 KiB)


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
    SYNC = 12  # make B durable for everything sent so far (the OOS barrier)


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


Header = cs.Struct(
    "magic" / cs.Const(MAGIC),
    "version" / cs.Int8ub,
    "kind" / cs.Enum(cs.Int8ub, Kind),
    "flags" / cs.Int16ub,
    "seq" / cs.Int64ub,
    "length" / cs.Int32ub,
)
HEADER = fast_struct(Header)  # (magic, version, kind, flags, seq, length), for every frame
HEADER_BYTES = HEADER.size
CRC_BYTES = 4

FLAG_REPLY = 0x0001  # set on ACK/STATUS/ERROR; informative, checked only for unknown bits
FLAG_SEALED = 0x0002  # sealed with the session keys (every frame after the handshake)
FLAG_CLEAR = 0x0004  # DATA: the payload in clear (authenticated only); HELLO: this primary sends it so
FLAG_RUNS = 0x0008  # DATA: the payload is a run table and the runs' bytes, not the whole track
KNOWN_FLAGS = FLAG_REPLY | FLAG_SEALED | FLAG_CLEAR | FLAG_RUNS

Text = cs.PascalString(cs.Int16ub, "utf8")

Geometry = cs.Struct(
    "name" / Text,
    "size_bytes" / cs.Int64ub,
    "track_bytes" / cs.Int32ub,
)


class _VolumeList(cs.Adapter):
    """Geometries on the wire; a list of ``(name, size_bytes, track_bytes)`` in a frame."""

    def _decode(self, obj, context, path):
        return [(g.name, g.size_bytes, g.track_bytes) for g in obj]

    def _encode(self, obj, context, path):
        return [{"name": n, "size_bytes": s, "track_bytes": t} for n, s, t in obj]


# A count, then that many geometries; a count over MAX_VOLUMES (what the NVRAM
# layout can hold) fails before one entry is parsed, so a stranger's HELLO of
# 65,535 volumes costs one check, not a parse of each.
Volumes = _VolumeList(cs.FocusedSeq(
    "items",
    "count" / cs.Rebuild(cs.Int16ub, cs.len_(cs.this.items)),
    cs.Check(cs.this.count <= MAX_VOLUMES),
    "items" / cs.Array(cs.this.count, Geometry),
))


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


class BadMac(ProtocolError):
    """A sealed frame whose MAC or tag does not match: rewritten, forged,
    reflected, or from another connection; or an unsealed frame after the
    handshake."""

    code = ErrorCode.AUTH


class BadSequence(ProtocolError):
    """A sealed frame out of sequence: replayed, reordered or dropped."""

    code = ErrorCode.AUTH


class NotEncrypted(ProtocolError):
    """A DATA payload in clear where this side requires encryption."""

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
# Each class names its kind and declares its body; the dataclass fields other
# than seq and flags are the body's fields, in order.


@dataclass(kw_only=True)
class Frame:
    seq: int = 0
    flags: int = 0
    KIND: ClassVar[Kind]
    BODY: ClassVar[cs.Construct]


@dataclass
class Hello(Frame):
    version: int
    session_id: str
    volumes: list[tuple[str, int, int]] = field(default_factory=list)  # (name, size_bytes, track_bytes)
    generation: int = 0  # the primary NVRAM's format generation (a new one demands a full copy)
    KIND = Kind.HELLO
    BODY = cs.Struct("version" / cs.Int16ub, "session_id" / Text, "volumes" / Volumes,
                     "generation" / cs.Int64ub)


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


DataHead = cs.Struct("volume" / cs.Int16ub, "track" / cs.Int64ub, "cg_seq" / cs.Int64ub)


@dataclass
class Data(Frame):
    volume: int  # index into the HELLO geometry list
    track: int
    cg_seq: int
    payload: bytes
    KIND = Kind.DATA
    BODY = cs.Struct(*DataHead.subcons, "payload" / cs.GreedyBytes)


@dataclass
class CgStep(Frame):
    """A request about one CG as a whole (the kinds below share this body)."""

    cg_seq: int
    BODY = cs.Struct("cg_seq" / cs.Int64ub)


class DrainDone(CgStep):
    KIND = Kind.DRAIN_DONE


class Sync(CgStep):
    KIND = Kind.SYNC


class Prepare(CgStep):
    KIND = Kind.PREPARE


class Commit(CgStep):
    KIND = Kind.COMMIT


class Abort(CgStep):
    KIND = Kind.ABORT


AckHead = cs.Struct("acked" / cs.Int64ub, "status" / cs.Int16ub)


@dataclass
class Ack(Frame):
    acked: int  # the seq of the request this answers
    status: int = AckStatus.OK
    message: str = ""
    KIND = Kind.ACK
    BODY = cs.Struct(*AckHead.subcons, "message" / Text)


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
        "volumes" / Volumes,
    )


@dataclass
class Error(Frame):
    code: int
    message: str
    KIND = Kind.ERROR
    BODY = cs.Struct("code" / cs.Int16ub, "message" / Text)


REPLY_KINDS = {Kind.ACK, Kind.STATUS, Kind.ERROR}
