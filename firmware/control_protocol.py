"""The session control link's frames: how a master's MemberPort calls reach
a subordinate primary (DESIGN.md section 3).

The framing is the replication link's (firmware/protocol.py): the same
``Header`` (magic, version, kind, flags, seq, length), the same CRC32C
trailer, the same ``rest_length`` for the TCP driver, and the same frame
classes built on ``Frame`` with a ``BODY`` declaration. The handshake
reuses the data link's ``AuthChallenge``, ``AuthResponse`` and ``Error``
frames; the kinds below (``ControlKind``, numbered from 32 so they never
meet a data link kind) are the control link's own.

The ``FLASH_*`` kinds carry ``FlashPort`` (firmware/member.py) for session
recovery: the master (or ``mirrorfw recover``) opens the same sealed
channel straight to each member's secondary, on the secondary's replication
port (firmware/control_service.py ``serve_link_or_control``).

After the handshake every frame is sealed: its body ends with a MAC::

    header | fields | mac (32 bytes) | crc32c        length = len(fields) + 32
    mac = HMAC-SHA256(session key, role of the sender | seq | header | fields)

The session key is derived from the shared secret and both handshake
nonces (``session_key``), so a frame recorded on one connection is worth
nothing on the next, and the sender's role in the MAC means a frame cannot
be reflected back at its sender. The header's ``seq`` is the sender's
sequence number, covered by the MAC; the channel (firmware/control_channel.py)
insists it grows by one per frame in each direction, which refuses a
replayed or reordered frame even on the same connection.
"""

from __future__ import annotations

import enum
import hmac
import math
from dataclasses import dataclass

import construct as cs
import crc32c

from firmware import protocol as p
from firmware import seal
from firmware.member import MemberState

CONTROL_VERSION = 1
MAC_BYTES = seal.MAC_BYTES  # HMAC-SHA256
KEY_BYTES = seal.KEY_BYTES
MASTER = "master"  # the roles in the handshake's MACs and in every sealed frame's MAC
SUBORDINATE = "subordinate"


class ControlKind(enum.IntEnum):
    CONTROL_HELLO = 32  # master -> subordinate, opens the handshake
    MEMBER_HELLO = 40
    MEMBER_STATUS = 41
    MEMBER_START = 42
    MEMBER_RUN = 43
    MEMBER_DRAIN = 44
    MEMBER_PREPARE = 45
    MEMBER_COMMIT = 46
    MEMBER_FAIL = 47
    MEMBER_ACK = 48  # reply: done, refused or failed
    MEMBER_STATE = 49  # reply to MEMBER_HELLO and MEMBER_STATUS
    FLASH_STATE = 56  # session recovery, master -> a member's secondary (FlashPort)
    FLASH_COMMIT = 57
    FLASH_REVERT = 58
    FLASH_RESTORE = 59
    FLASH_REPORT = 60  # reply to FLASH_STATE and FLASH_RESTORE


# Both links refuse a frame with the same errors (firmware/protocol.py).
BadMac = p.BadMac
BadSequence = p.BadSequence


# -- frames --------------------------------------------------------------------


@dataclass
class ControlHello(p.Frame):
    version: int
    session_id: str
    name: str  # the master's name, for the subordinate's log
    KIND = ControlKind.CONTROL_HELLO
    BODY = cs.Struct("version" / cs.Int16ub, "session_id" / p.Text, "name" / p.Text)


@dataclass
class MemberHello(p.Frame):
    session_id: str
    KIND = ControlKind.MEMBER_HELLO
    BODY = cs.Struct("session_id" / p.Text)


@dataclass
class MemberStatus(p.Frame):
    KIND = ControlKind.MEMBER_STATUS
    BODY = cs.Struct()


@dataclass
class MemberStep(p.Frame):
    """A MemberPort call about one CG (the kinds below share this body)."""

    cg_seq: int
    BODY = cs.Struct("cg_seq" / cs.Int64ub)


class MemberStart(MemberStep):
    KIND = ControlKind.MEMBER_START


class MemberRun(MemberStep):
    KIND = ControlKind.MEMBER_RUN


class MemberDrain(MemberStep):
    KIND = ControlKind.MEMBER_DRAIN


class MemberPrepare(MemberStep):
    KIND = ControlKind.MEMBER_PREPARE


class MemberCommit(MemberStep):
    KIND = ControlKind.MEMBER_COMMIT


@dataclass
class MemberFail(p.Frame):
    cg_seq: int
    reason: str
    KIND = ControlKind.MEMBER_FAIL
    BODY = cs.Struct("cg_seq" / cs.Int64ub, "reason" / p.Text)


@dataclass
class MemberAck(p.Frame):
    acked: int  # the seq of the request this answers
    status: int = p.AckStatus.OK  # REFUSED: MemberError; FAILED: the member failed doing it
    message: str = ""
    KIND = ControlKind.MEMBER_ACK
    BODY = cs.Struct("acked" / cs.Int64ub, "status" / cs.Int16ub, "message" / p.Text)


class _StateAdapter(cs.Adapter):
    """A MemberState on the wire; ``last_cg_time`` None travels as NaN."""

    def _decode(self, obj, context, path):
        last = None if math.isnan(obj.last_cg_time) else obj.last_cg_time
        return MemberState(
            name=obj.name, session_id=obj.session_id, copy_state=obj.copy_state, phase=obj.phase,
            link=obj.link, committed_seq=obj.committed_seq, oos_tracks=obj.oos_tracks,
            cr_tracks=obj.cr_tracks, held_ack_ms={e.key: e.value for e in obj.held_ack_ms},
            last_cg_time=last, cg_seq=obj.cg_seq, in_doubt_seq=obj.in_doubt_seq,
        )

    def _encode(self, obj, context, path):
        return dict(
            name=obj.name, session_id=obj.session_id, copy_state=obj.copy_state, phase=obj.phase,
            link=obj.link, committed_seq=obj.committed_seq, oos_tracks=obj.oos_tracks,
            cr_tracks=obj.cr_tracks,
            held_ack_ms=[dict(key=str(k), value=float(v)) for k, v in obj.held_ack_ms.items()],
            last_cg_time=math.nan if obj.last_cg_time is None else float(obj.last_cg_time),
            cg_seq=obj.cg_seq, in_doubt_seq=obj.in_doubt_seq,
        )


WireState = _StateAdapter(cs.Struct(
    "name" / p.Text,
    "session_id" / p.Text,
    "copy_state" / p.Text,
    "phase" / p.Text,
    "link" / p.Text,
    "committed_seq" / cs.Int64ub,
    "oos_tracks" / cs.Int64ub,
    "cr_tracks" / cs.Int64ub,
    "held_ack_ms" / cs.PrefixedArray(cs.Int16ub, cs.Struct("key" / p.Text, "value" / cs.Float64b)),
    "last_cg_time" / cs.Float64b,
    "cg_seq" / cs.Int64ub,
    "in_doubt_seq" / cs.Int64ub,
))


@dataclass
class MemberReport(p.Frame):
    acked: int
    state: MemberState
    KIND = ControlKind.MEMBER_STATE
    BODY = cs.Struct("acked" / cs.Int64ub, "state" / WireState)


@dataclass
class FlashState(p.Frame):
    """FlashPort.recovery_state: what the secondary's C holds."""

    KIND = ControlKind.FLASH_STATE
    BODY = cs.Struct()


class FlashCommit(MemberStep):
    KIND = ControlKind.FLASH_COMMIT


class FlashRevert(MemberStep):
    KIND = ControlKind.FLASH_REVERT


@dataclass
class FlashRestore(p.Frame):
    """FlashPort.fast_reverse_restore: C -> B (failover)."""

    KIND = ControlKind.FLASH_RESTORE
    BODY = cs.Struct()


@dataclass
class FlashReport(p.Frame):
    acked: int
    committed_seq: int
    prepared_seq: int = 0  # 0: no CG prepared (in doubt)
    grains: int = 0  # FLASH_RESTORE: grains copied C -> B
    KIND = ControlKind.FLASH_REPORT
    BODY = cs.Struct("acked" / cs.Int64ub, "committed_seq" / cs.Int64ub, "prepared_seq" / cs.Int64ub,
                     "grains" / cs.Int64ub)


# Every frame the control link carries, by kind value: the data link's
# handshake frames and ERROR, then the control link's own.
FRAMES: dict[int, type[p.Frame]] = {cls.KIND.value: cls for cls in (
    p.AuthChallenge, p.AuthResponse, p.Error,
    ControlHello, MemberHello, MemberStatus, MemberStart, MemberRun, MemberDrain, MemberPrepare,
    MemberCommit, MemberFail, MemberAck, MemberReport,
    FlashState, FlashCommit, FlashRevert, FlashRestore, FlashReport,
)}
REPLY_KINDS = {p.Kind.ERROR.value, ControlKind.MEMBER_ACK.value, ControlKind.MEMBER_STATE.value,
               ControlKind.FLASH_REPORT.value}
REQUESTS = (MemberHello, MemberStatus, MemberStart, MemberRun, MemberDrain, MemberPrepare, MemberCommit,
            MemberFail, FlashState, FlashCommit, FlashRevert, FlashRestore)
# The requests a session's secondary answers (FlashPort, session recovery).
FLASH_REQUESTS = (FlashState, FlashCommit, FlashRevert, FlashRestore)

# The data link's body adapter (dataclass in Python, its BODY on the wire,
# trailing bytes refused), one per control frame class.
Body = cs.Switch(cs.this.kind, {cls.KIND.name: p._FrameBody(cls) for cls in FRAMES.values()}, default=cs.Error)
_BODY_ERRORS = (cs.ConstructError, ValueError, TypeError, OverflowError, UnicodeError)


# -- keys and MACs ---------------------------------------------------------------


def session_key(secret: bytes, master_nonce: bytes, subordinate_nonce: bytes, session_id: str) -> bytes:
    """HKDF-SHA256 (RFC 5869, one block): extract with both nonces as the salt,
    expand with the protocol and session as the info (firmware/seal.py)."""
    return seal.session_key(secret, master_nonce, subordinate_nonce, b"mirrorfw-control-v1 session key", session_id)


seal_mac = seal.seal_mac  # the MAC of a sealed frame: the sender's role, its seq, header and fields


# -- codec -----------------------------------------------------------------------


def encode(frame: p.Frame, *, key: bytes | None = None, role: str = "") -> bytes:
    """The bytes of one frame; sealed with ``key`` as ``role`` when a key is
    given (every frame after the handshake). ProtocolError for a value that
    does not fit."""
    kind = frame.KIND
    if FRAMES.get(kind.value) is not type(frame):
        raise p.BadKind(f"{type(frame).__name__} is not a control link frame")
    flags = frame.flags | (p.FLAG_REPLY if kind.value in REPLY_KINDS else 0)
    try:
        fields = Body.build(frame, kind=kind.name)
    except _BODY_ERRORS as e:
        raise p.BadBody(f"cannot encode {kind.name}: {e}") from None
    length = len(fields) + (MAC_BYTES if key is not None else 0)
    if length > p.MAX_BODY_BYTES:
        raise p.BadLength(f"{kind.name} body is {length} bytes, more than {p.MAX_BODY_BYTES}")
    try:
        header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, kind.value, flags, frame.seq, length)
    except Exception as e:  # struct.error: a seq or flags that does not fit
        raise p.BadBody(f"cannot encode {kind.name} header: {e}") from None
    parts = [header, fields]
    if key is not None:
        parts.append(seal_mac(key, role, frame.seq, header + fields))
    body_crc = crc32c.crc32c(b"".join(parts))
    parts.append(body_crc.to_bytes(p.CRC_BYTES, "big"))
    return b"".join(parts)


def decode(buf: bytes, *, key: bytes | None = None, role: str = "") -> p.Frame:
    """One frame from exactly its bytes; with ``key``, a sealed frame from
    ``role`` whose MAC is checked before its body is parsed. ProtocolError
    (BadMac for a MAC that does not match) says what is wrong."""
    view = memoryview(buf).cast("B")
    size = len(view)
    if size < p.HEADER_BYTES + p.CRC_BYTES:
        raise p.BadLength(f"frame of {size} bytes is shorter than header and CRC")
    magic, version, kind_value, flags, seq, length = p.HEADER.unpack_from(view)
    if magic != p.MAGIC:
        raise p.BadMagic(f"bad magic {bytes(magic)!r} (expected {p.MAGIC!r})")
    if version != p.PROTOCOL_VERSION:
        raise p.BadVersion(f"frame version {version} not supported (this side speaks {p.PROTOCOL_VERSION})")
    if size != p.HEADER_BYTES + length + p.CRC_BYTES:
        raise p.BadLength(f"frame is {size} bytes but its header says {p.HEADER_BYTES + length + p.CRC_BYTES}")
    crc = int.from_bytes(view[-p.CRC_BYTES:], "big")
    actual = crc32c.crc32c(view[: -p.CRC_BYTES])
    if crc != actual:
        raise p.BadCrc(f"CRC32C mismatch: frame says {crc:#010x}, bytes give {actual:#010x}")
    cls = FRAMES.get(kind_value)
    if cls is None:
        raise p.BadKind(f"frame kind {kind_value} is not a control link frame")
    kind = cls.KIND
    # The control link's only flag is REPLY (its sealed frames carry no FLAG_SEALED).
    if flags & ~p.FLAG_REPLY or bool(flags & p.FLAG_REPLY) != (kind_value in REPLY_KINDS):
        raise p.BadBody(f"{kind.name}: flags {flags:#x} do not fit the kind")
    end = size - p.CRC_BYTES
    if key is not None:
        if length < MAC_BYTES:
            raise BadMac(f"{kind.name} seq {seq}: no MAC (an unsealed frame after the handshake)")
        end -= MAC_BYTES
        if not hmac.compare_digest(seal_mac(key, role, seq, view[:end]), view[end : end + MAC_BYTES]):
            raise BadMac(f"{kind.name} seq {seq}: MAC mismatch (rewritten, forged, or from another connection)")
    try:
        return Body.parse(bytes(view[p.HEADER_BYTES : end]), kind=kind.name, seq=seq,
                          flags=flags & ~p.FLAG_REPLY)
    except cs.TerminatedError:
        raise p.BadBody(f"{kind.name} body has trailing bytes") from None
    except (cs.ConstructError, UnicodeError, ValueError, OverflowError) as e:
        text = str(e) or type(e).__name__
        raise p.BadBody(f"{kind.name} body does not parse: {text.splitlines()[0]}") from None
