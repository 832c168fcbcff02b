"""The replication link's wire format, declared once with construct.

Every frame is ``header | body | crc32c``::

    magic "MFWL" | version u8 | kind u8 | flags u16 | seq u64 | length u32   (20 bytes)
    body: ``length`` bytes, laid out per kind (the structs below)
    crc: CRC32C (Castagnoli) of header and body, u32 big-endian

``seq`` numbers requests; replies (ACK, STATUS, ERROR) carry the request's
sequence number in their body, so many requests may be in flight at once.

After the handshake (firmware/link_handshake.py) every frame is sealed with
the connection's session keys (firmware/seal.py) and its header says so
(``FLAG_SEALED``); ``seq`` is then the sender's own sequence number, 1, 2,
3, ... in each direction, which the receiving channel checks
(firmware/sealed.py)::

    any kind:  header | fields | mac (32)                      mac = HMAC(mac key, role | seq | header | fields)
    DATA:      header | volume, track, cg_seq | sealed payload | tag (16)
               with FLAG_RUNS the payload is ``Runs`` (count u16, then count x
               (offset u32, length u32) within the track, ascending, apart) and
               the runs' bytes one after another: the segments of the track
               written since it was last sent; without it, the whole track
               AES-256-GCM, nonce = role | seq, associated data = header and fixed fields;
               the payload encrypted, or with FLAG_CLEAR ([link] encrypt = false) in clear
               and in the associated data (authenticated, not hidden)

The CRC32C stays on every frame: it tells noise (BadCrc) from an attacker
(BadMac). Before the handshake a peer is a stranger: a frame longer than
``PREAUTH_FRAME_BYTES`` is refused unread by the TCP driver (``is_sealed``
tells it when this side has authenticated its peer), and a volume list
longer than ``MAX_VOLUMES`` is refused before one entry is parsed.

The layout is declared once: ``Header`` (the kind an ``Enum`` of ``Kind``)
and ``Body``, a ``Switch`` on the kind whose cases are the frame classes'
own ``BODY`` structs behind an Adapter that makes and takes the dataclass.
``encode`` and ``decode`` build and parse those declarations; only the
fixed-width parts on the DATA hot path go through ``struct`` twins derived
from them (``hal.wire.fast_struct``), so a track's payload is copied once
on each side and never through construct. ``decode`` turns any bad input
into a ``ProtocolError`` that says what was wrong, never another exception.

The handshake these frames carry, and its HMAC, are in firmware/link_handshake.py.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import construct as cs
import crc32c

from firmware import seal
from firmware.layout import MAX_VOLUMES
from hal.wire import fast_struct

PROTOCOL_VERSION = 3  # 2: HELLO carries the primary's format generation; 3: frames sealed after the handshake
MAGIC = b"MFWL"
MAX_BODY_BYTES = 64 << 20  # a DATA frame carries one track; 64 MiB leaves room for huge tracks
PREAUTH_FRAME_BYTES = 64 << 10  # the longest frame from a peer not yet authenticated (a HELLO of 48 volumes is ~10 KiB)
LINK_KEYS_LABEL = b"mirrorfw-link-v3 session keys"


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


# A DATA payload with FLAG_RUNS starts with its run table (inside the seal).
Run = cs.Struct("offset" / cs.Int32ub, "length" / cs.Int32ub)
Runs = cs.PrefixedArray(cs.Int16ub, Run)
_RUN_COUNT = fast_struct(cs.Struct("count" / cs.Int16ub))
_RUN = fast_struct(Run)
MAX_RUNS = 0xFFFF


def pack_runs(runs: list[tuple[int, int]]) -> bytes:
    """The run table of a DATA payload (equal to ``Runs.build``, tested)."""
    if len(runs) > MAX_RUNS:
        raise BadBody(f"DATA with {len(runs)} runs; at most {MAX_RUNS}")
    try:
        return _RUN_COUNT.pack(len(runs)) + b"".join(_RUN.pack(o, n) for o, n in runs)
    except struct.error as e:
        raise BadBody(f"DATA run does not fit: {e}") from None


def unpack_runs(payload) -> tuple[list[tuple[int, int]], memoryview]:
    """A FLAG_RUNS payload's runs and the bytes after the table. BadBody
    when the table does not fit the payload, or the runs are not ascending
    and apart, empty, or their lengths do not add up to those bytes."""
    view = memoryview(payload).cast("B")
    if len(view) < _RUN_COUNT.size:
        raise BadBody("DATA runs: no run table")
    (count,) = _RUN_COUNT.unpack_from(view)
    table = _RUN_COUNT.size + count * _RUN.size
    if not count or len(view) < table:
        raise BadBody(f"DATA runs: {count} runs do not fit {len(view)} bytes")
    runs = [_RUN.unpack_from(view, _RUN_COUNT.size + i * _RUN.size) for i in range(count)]
    end = 0
    for offset, length in runs:
        if length == 0 or offset < end:
            raise BadBody(f"DATA runs: run {offset}+{length} is empty, overlaps or is out of order")
        end = offset + length
    if sum(n for _, n in runs) != len(view) - table:
        raise BadBody(f"DATA runs add up to {sum(n for _, n in runs)} bytes, the payload holds {len(view) - table}")
    return runs, view[table:]


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


class _FrameBody(cs.Adapter):
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


# The body of every kind; parse and build with kind=<Kind name> in the context
# (the names, because that is what the header's Enum parses to).
Body = cs.Switch(
    cs.this.kind,
    {cls.KIND.name: _FrameBody(cls) for cls in
     (Hello, AuthChallenge, AuthResponse, Data, DrainDone, Sync, Prepare, Commit, Abort, Ack, Status, Error)},
    default=cs.Error,
)

# The DATA hot path: header and DATA's fixed fields in one struct, derived from
# the declarations above; the payload is joined to it, never built by construct.
DATA_HEAD = fast_struct(cs.Struct(*Header.subcons, *DataHead.subcons))
_DATA_FIXED_BYTES = DataHead.sizeof()
# The ACK hot path (one per track): header, ACK's fixed fields and the length
# prefix of its message (``Text``'s), one struct; anything irregular falls
# back to the declaration, which also words the errors.
ACK_HEAD = fast_struct(cs.Struct(*Header.subcons, *AckHead.subcons, "message_length" / cs.Int16ub))
_ACK_BODY_BYTES = ACK_HEAD.size - HEADER_BYTES  # fixed fields and the message's length
_BODY_ERRORS = (cs.ConstructError, ValueError, TypeError, OverflowError, UnicodeError)
MAC_BYTES = seal.MAC_BYTES
TAG_BYTES = seal.TAG_BYTES


class Sealing:
    """How one side seals what it sends and opens what it receives on one
    connection after the handshake: the session keys, its own role and the
    peer's, whether its DATA payloads are encrypted, and whether it insists
    the peer's are."""

    def __init__(self, keys: seal.SessionKeys, role: str, peer_role: str, *, encrypt: bool = True,
                 require_encrypted: bool = True) -> None:
        self.keys = keys
        self.role = role
        self.peer_role = peer_role
        self.encrypt = encrypt
        self.require_encrypted = require_encrypted

    @classmethod
    def derive(cls, secret: bytes, primary_nonce: bytes, secondary_nonce: bytes, session_id: str, role: str,
               peer_role: str, **kw) -> Sealing:
        material = seal.session_key(secret, primary_nonce, secondary_nonce, LINK_KEYS_LABEL, session_id,
                                    2 * seal.KEY_BYTES)
        return cls(seal.SessionKeys(material), role, peer_role, **kw)

    def seal(self, frame: Frame) -> bytes | bytearray:
        return encode(frame, sealing=self)

    def open(self, raw: bytes) -> Frame:
        return decode(raw, sealing=self)


def encode(frame: Frame, *, sealing: Sealing | None = None) -> bytes | bytearray:
    """The bytes of one frame, sealed as ``sealing`` says when given (every
    frame after the handshake); raises ProtocolError for a value that does
    not fit."""
    kind = frame.KIND
    flags = frame.flags | (FLAG_REPLY if kind in REPLY_KINDS else 0)
    if kind is Kind.DATA:
        try:
            if sealing is not None:
                return _seal_data(frame, flags, sealing)
            return _encode_data(frame, flags)
        except (struct.error, TypeError):
            pass  # a value that does not fit: the declaration says which, below
    elif kind is Kind.ACK:
        try:
            return _encode_ack(frame, flags, sealing)
        except (struct.error, TypeError, AttributeError, UnicodeError):
            pass  # likewise
    try:
        body = Body.build(frame, kind=kind.name)
    except _BODY_ERRORS as e:
        raise BadBody(f"cannot encode {kind.name}: {e}") from None
    length = len(body) + (MAC_BYTES if sealing is not None else 0)
    if length > MAX_BODY_BYTES:
        raise BadLength(f"{kind.name} body is {length} bytes, more than {MAX_BODY_BYTES}")
    if sealing is not None:
        flags |= FLAG_SEALED
    try:
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, flags, frame.seq, length)
    except struct.error:
        header = _build_header(kind, flags, frame.seq, length)
    parts = [header, body]
    if sealing is not None:
        parts.append(seal.seal_mac(sealing.keys.mac_key, sealing.role, frame.seq, header + body))
    crc = crc32c.crc32c(b"".join(parts))
    parts.append(crc.to_bytes(CRC_BYTES, "big"))
    return b"".join(parts)


def _encode_data(frame: Data, flags: int) -> bytes:
    payload = frame.payload
    length = _DATA_FIXED_BYTES + len(payload)
    if length > MAX_BODY_BYTES:
        raise BadLength(f"DATA body is {length} bytes, more than {MAX_BODY_BYTES}")
    head = DATA_HEAD.pack(MAGIC, PROTOCOL_VERSION, Kind.DATA, flags, frame.seq, length,
                          frame.volume, frame.track, frame.cg_seq)
    crc = crc32c.crc32c(payload, crc32c.crc32c(head))
    return b"".join((head, payload, crc.to_bytes(CRC_BYTES, "big")))


def _encode_ack(frame: Ack, flags: int, sealing: Sealing | None) -> bytes:
    message = frame.message.encode("utf-8")
    length = _ACK_BODY_BYTES + len(message) + (MAC_BYTES if sealing is not None else 0)
    if sealing is not None:
        flags |= FLAG_SEALED
    head = ACK_HEAD.pack(MAGIC, PROTOCOL_VERSION, Kind.ACK, flags, frame.seq, length, frame.acked, frame.status,
                         len(message))
    parts = [head, message]
    if sealing is not None:
        parts.append(seal.seal_mac(sealing.keys.mac_key, sealing.role, frame.seq, head + message))
    crc = crc32c.crc32c(b"".join(parts))
    parts.append(crc.to_bytes(CRC_BYTES, "big"))
    return b"".join(parts)


def _seal_data(frame: Data, flags: int, sealing: Sealing) -> bytearray:
    """A sealed DATA frame built in one buffer: the payload is copied once,
    encrypted on its way in (or, in clear, copied and covered by the tag)."""
    payload = frame.payload
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError("payload must be bytes")
    size = len(payload)
    length = _DATA_FIXED_BYTES + size + TAG_BYTES
    if length > MAX_BODY_BYTES:
        raise BadLength(f"DATA body is {length} bytes, more than {MAX_BODY_BYTES}")
    flags |= FLAG_SEALED | (0 if sealing.encrypt else FLAG_CLEAR)
    head = DATA_HEAD.size
    buf = bytearray(head + size + TAG_BYTES + CRC_BYTES)
    DATA_HEAD.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, Kind.DATA, flags, frame.seq, length,
                        frame.volume, frame.track, frame.cg_seq)
    view = memoryview(buf)
    cipher, role, seq = sealing.keys.cipher, sealing.role, frame.seq
    if sealing.encrypt:
        cipher.seal_into(role, seq, payload, view[:head], view[head : head + size + TAG_BYTES])
    else:
        view[head : head + size] = payload
        cipher.seal_into(role, seq, b"", view[: head + size], view[head + size : head + size + TAG_BYTES])
    crc = crc32c.crc32c(view[:-CRC_BYTES])
    view[-CRC_BYTES:] = crc.to_bytes(CRC_BYTES, "big")
    return buf


def _build_header(kind: Kind, flags: int, seq: int, length: int) -> bytes:
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


def decode(buf: bytes, *, sealing: Sealing | None = None) -> Frame:
    """One frame from exactly its bytes; with ``sealing``, a sealed frame
    from the peer whose MAC (or tag) is checked before its body is parsed.
    ProtocolError says what is wrong (BadMac when the seal does not match)."""
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
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise BadKind(f"unknown frame kind {kind_value}") from None
    if flags & ~KNOWN_FLAGS:
        raise BadBody(f"{kind.name}: unknown flags {flags & ~KNOWN_FLAGS:#x}")
    if bool(flags & FLAG_REPLY) != (kind in REPLY_KINDS):
        raise BadBody(f"{kind.name}: reply flags {flags:#x} do not fit the kind")
    if flags & FLAG_CLEAR and not (kind is Kind.HELLO or kind is Kind.DATA and flags & FLAG_SEALED):
        raise BadBody(f"{kind.name}: flags {flags:#x} do not fit the kind")
    if flags & FLAG_RUNS and kind is not Kind.DATA:
        raise BadBody(f"{kind.name}: flags {flags:#x} do not fit the kind")
    end = size - CRC_BYTES
    if sealing is not None:
        if not flags & FLAG_SEALED:
            raise BadMac(f"{kind.name} seq {seq}: not sealed (an unsealed frame after the handshake)")
        if kind is Kind.DATA:
            return _open_data(view, flags, seq, length, sealing)
        if length < MAC_BYTES:
            raise BadMac(f"{kind.name} seq {seq}: too short for its MAC")
        end -= MAC_BYTES
        if not seal.check_seal_mac(sealing.keys.mac_key, sealing.peer_role, seq, view[:end],
                                   view[end : end + MAC_BYTES]):
            raise BadMac(f"{kind.name} seq {seq}: MAC mismatch (rewritten, forged, or from another connection)")
    elif flags & FLAG_SEALED:
        raise BadBody(f"{kind.name} seq {seq}: a sealed frame before the handshake")
    flags &= ~(FLAG_REPLY | FLAG_SEALED)
    if kind is Kind.DATA and length >= _DATA_FIXED_BYTES:
        *_, volume, track, cg_seq = DATA_HEAD.unpack_from(view)
        payload = bytes(view[DATA_HEAD.size : end])  # the one copy of the payload
        return Data(seq=seq, flags=flags, volume=volume, track=track, cg_seq=cg_seq, payload=payload)
    if kind is Kind.ACK and end >= ACK_HEAD.size:
        *_, acked, status, message_length = ACK_HEAD.unpack_from(view)
        if ACK_HEAD.size + message_length == end:
            try:
                message = str(view[ACK_HEAD.size : end], "utf-8")
            except UnicodeError:
                pass  # the declaration words it, below
            else:
                return Ack(seq=seq, flags=flags, acked=acked, status=status, message=message)
    try:
        return Body.parse(bytes(view[HEADER_BYTES:end]), kind=kind.name, seq=seq, flags=flags)
    except cs.TerminatedError:
        raise BadBody(f"{kind.name} body has trailing bytes") from None
    except cs.CheckError:  # the only Check: a volume list's count
        raise BadBody(f"{kind.name} lists more than {MAX_VOLUMES} volumes") from None
    except (cs.ConstructError, UnicodeError, ValueError, OverflowError) as e:
        raise BadBody(f"{kind.name} body does not parse: {_first_line(e)}") from None


def _open_data(view: memoryview, flags: int, seq: int, length: int, sealing: Sealing) -> Data:
    """A sealed DATA frame's fields and payload, once its tag matches."""
    head = DATA_HEAD.size
    if length < _DATA_FIXED_BYTES + TAG_BYTES:
        raise BadMac(f"DATA seq {seq}: too short for its fields and tag")
    clear = bool(flags & FLAG_CLEAR)
    if clear and sealing.require_encrypted:
        raise NotEncrypted(f"DATA seq {seq}: payload in clear, but this side requires encryption "
                           "([link] encrypt = true)")
    end = len(view) - CRC_BYTES
    cipher = sealing.keys.cipher
    if clear:
        opened = cipher.open(sealing.peer_role, seq, view[end - TAG_BYTES : end], view[: end - TAG_BYTES])
        payload = bytes(view[head : end - TAG_BYTES]) if opened is not None else None  # the one copy
    else:
        payload = cipher.open(sealing.peer_role, seq, view[head:end], view[:head])  # decrypted: the one copy
    if payload is None:
        raise BadMac(f"DATA seq {seq}: tag mismatch (rewritten, forged, or from another connection)")
    *_, volume, track, cg_seq = DATA_HEAD.unpack_from(view)
    return Data(seq=seq, flags=flags & ~(FLAG_SEALED | FLAG_CLEAR), volume=volume, track=track, cg_seq=cg_seq,
                payload=payload)


def _first_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0]
