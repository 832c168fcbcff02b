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

The layout is declared once in firmware/frames.py (``Header``, the frame
classes' ``BODY``); ``Body``, the data link's ``Switch`` on the kind, comes
from its ``Codec`` (firmware/codec.py), which both links share; the run
table is in firmware/runs.py. ``encode`` and ``decode`` build and parse
those declarations; only the
fixed-width parts on the DATA hot path go through ``struct`` twins derived
from them (``hal.wire.fast_struct``), so a track's payload is copied once
on each side and never through construct. ``decode`` turns any bad input
into a ``ProtocolError`` that says what was wrong, never another exception.

The handshake these frames carry, and its HMAC, are in firmware/link_handshake.py.
"""


from __future__ import annotations

import struct

import construct as cs
import crc32c

from firmware import seal
from firmware.codec import MAC_BYTES, Codec, is_sealed, rest_length, with_crc
from firmware.frames import (
    CRC_BYTES,
    FLAG_CLEAR,
    FLAG_REPLY,
    FLAG_RUNS,
    FLAG_SEALED,
    HEADER,
    HEADER_BYTES,
    KNOWN_FLAGS,
    MAGIC,
    MAX_BODY_BYTES,
    MAX_VOLUMES,
    PREAUTH_FRAME_BYTES,
    PROTOCOL_VERSION,
    REPLY_KINDS,
    Abort,
    Ack,
    AckHead,
    AckStatus,
    AuthChallenge,
    AuthResponse,
    BadBody,
    BadCrc,
    BadKind,
    BadLength,
    BadMac,
    BadMagic,
    BadSequence,
    BadVersion,
    CgStep,
    Commit,
    Data,
    DataHead,
    DrainDone,
    Error,
    ErrorCode,
    Frame,
    Header,
    Hello,
    Kind,
    NotEncrypted,
    PeerError,
    Prepare,
    ProtocolError,
    Status,
    Sync,
    Text,
)
from firmware.runs import MAX_RUNS, Run, Runs, pack_runs, unpack_runs
from hal.wire import fast_struct

# The replication link's face: its codec and sealing here, its frames, errors
# and run tables re-exported from the modules that declare them.
__all__ = [
    "ACK_HEAD", "CRC_BYTES", "DATA_HEAD", "FLAG_CLEAR", "FLAG_REPLY", "FLAG_RUNS", "FLAG_SEALED", "HEADER",
    "HEADER_BYTES", "KNOWN_FLAGS", "LINK", "LINK_KEYS_LABEL", "MAC_BYTES", "MAGIC", "MAX_BODY_BYTES", "MAX_RUNS",
    "MAX_VOLUMES", "PREAUTH_FRAME_BYTES", "PROTOCOL_VERSION", "REPLY_KINDS", "TAG_BYTES", "Abort", "Ack",
    "AckHead", "AckStatus", "AuthChallenge", "AuthResponse", "BadBody", "BadCrc", "BadKind", "BadLength", "BadMac",
    "BadMagic", "BadSequence", "BadVersion", "Body", "CgStep", "Commit", "Data", "DataHead", "DrainDone", "Error",
    "ErrorCode", "Frame", "Header", "Hello", "Kind", "NotEncrypted", "PeerError", "Prepare", "ProtocolError", "Run",
    "Runs", "Sealing", "Status", "Sync", "Text", "decode", "encode", "is_sealed", "pack_runs", "rest_length",
    "unpack_runs",
]

LINK_KEYS_LABEL = b"mirrorfw-link-v3 session keys"
LINK = Codec("replication link", (Hello, AuthChallenge, AuthResponse, Data, DrainDone, Sync, Prepare, Commit, Abort,
                                  Ack, Status, Error),
             REPLY_KINDS, known_flags=KNOWN_FLAGS, sealed_flag=FLAG_SEALED)
Body = LINK.body  # the body of every kind; parse and build with kind=<Kind name> in the context

# The DATA hot path: header and DATA's fixed fields in one struct, derived from
# the declarations above; the payload is joined to it, never built by construct.
DATA_HEAD = fast_struct(cs.Struct(*Header.subcons, *DataHead.subcons))
_DATA_FIXED_BYTES = DataHead.sizeof()
# The ACK hot path (one per track): header, ACK's fixed fields and the length
# prefix of its message (``Text``'s), one struct; anything irregular falls
# back to the declaration, which also words the errors.
ACK_HEAD = fast_struct(cs.Struct(*Header.subcons, *AckHead.subcons, "message_length" / cs.Int16ub))
_ACK_BODY_BYTES = ACK_HEAD.size - HEADER_BYTES  # fixed fields and the message's length
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
    flags = LINK.flags(frame)
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
    if sealing is None:
        return LINK.encode(frame, flags)
    return LINK.encode(frame, flags, mac_key=sealing.keys.mac_key, role=sealing.role)


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
    return with_crc(parts)


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


def decode(buf: bytes, *, sealing: Sealing | None = None) -> Frame:
    """One frame from exactly its bytes; with ``sealing``, a sealed frame
    from the peer whose MAC (or tag) is checked before its body is parsed.
    ProtocolError says what is wrong (BadMac when the seal does not match)."""
    view, cls, flags, seq, length = LINK.check(buf)
    kind = cls.KIND
    if flags & FLAG_CLEAR and not (kind is Kind.HELLO or kind is Kind.DATA and flags & FLAG_SEALED):
        raise BadBody(f"{kind.name}: flags {flags:#x} do not fit the kind")
    if flags & FLAG_RUNS and kind is not Kind.DATA:
        raise BadBody(f"{kind.name}: flags {flags:#x} do not fit the kind")
    end = len(view) - CRC_BYTES
    if sealing is not None:
        if not flags & FLAG_SEALED:
            raise BadMac(f"{kind.name} seq {seq}: not sealed (an unsealed frame after the handshake)")
        if kind is Kind.DATA:
            return _open_data(view, flags, seq, length, sealing)
        end = LINK.check_mac(view, kind.name, seq, length, sealing.keys.mac_key, sealing.peer_role)
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
    return LINK.parse(view, kind.name, seq, flags, end)


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
