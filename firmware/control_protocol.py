"""The session control link's frames: how a master's MemberPort calls reach
a subordinate primary (DESIGN.md section 3).

The framing is the replication link's (firmware/frames.py): the same
``Header`` (magic, version, kind, flags, seq, length), the same CRC32C
trailer, the same ``rest_length`` for the TCP driver, the same codec
(firmware/codec.py, with this link's frame table) and the same frame
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
import math
from dataclasses import dataclass

import construct as cs

from firmware import frames as p
from firmware import seal
from firmware.codec import Codec
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


# Both links refuse a frame with the same errors (firmware/frames.py).
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

# The codec both links share (firmware/codec.py), with the control link's
# frames; its only flag is REPLY (its sealed frames carry no FLAG_SEALED).
CONTROL = Codec("control link", FRAMES.values(), REPLY_KINDS, known_flags=p.FLAG_REPLY, sealed_flag=0)
Body = CONTROL.body


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
    if FRAMES.get(frame.KIND.value) is not type(frame):
        raise p.BadKind(f"{type(frame).__name__} is not a control link frame")
    return CONTROL.encode(frame, CONTROL.flags(frame), mac_key=key, role=role)


def decode(buf: bytes, *, key: bytes | None = None, role: str = "") -> p.Frame:
    """One frame from exactly its bytes; with ``key``, a sealed frame from
    ``role`` whose MAC is checked before its body is parsed. ProtocolError
    (BadMac for a MAC that does not match) says what is wrong."""
    return CONTROL.decode(buf, mac_key=key, role=role)
