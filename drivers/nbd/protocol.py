"""The NBD wire format (fixed newstyle), declared once with construct.

Server and client both parse and build from these declarations. The two
per-request headers on the hot path (the 28-byte request and the 16-byte
simple reply) also get a ``struct.Struct`` *derived* from their construct
declaration by ``hal.wire.fast_struct``, so the per-request cost is one
``unpack_from``/``pack`` while the layout is still written down only here.

Reference: the NetworkBlockDevice/nbd repository's doc/proto.md.
"""

from __future__ import annotations

import enum
import errno

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    GreedyRange,
    GreedyString,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
    Switch,
    this,
)

from hal.wire import fast_struct

# -- magic numbers --------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809
MAX_STRING_BYTES = 4096  # names and messages (spec: MUST be no longer than 4096)


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Reply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9

    @property
    def is_error(self) -> bool:
        return bool(self.value & _ERR)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0

# The one metadata context served: allocation, as ``nbdinfo --map`` asks for it.
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0  # base:allocation descriptor flags
STATE_ZERO = 1 << 1


class NbdErrno(enum.IntEnum):
    """The error values the protocol defines (they match Linux errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_ERRNO_TO_NBD = {
    errno.EPERM: NbdErrno.EPERM,
    errno.EACCES: NbdErrno.EPERM,
    errno.EROFS: NbdErrno.EPERM,
    errno.EIO: NbdErrno.EIO,
    errno.ENOMEM: NbdErrno.ENOMEM,
    errno.EINVAL: NbdErrno.EINVAL,
    errno.ENOSPC: NbdErrno.ENOSPC,
    errno.EDQUOT: NbdErrno.ENOSPC,
    errno.EFBIG: NbdErrno.ENOSPC,
    errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    errno.EOPNOTSUPP: NbdErrno.ENOTSUP,
    errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}


def nbd_errno(err: int | None) -> int:
    """Map a host errno onto the NBD error set; anything unknown is EIO."""
    return int(_ERRNO_TO_NBD.get(err or 0, NbdErrno.EIO))


# -- handshake ------------------------------------------------------------------
ServerGreeting = Struct(
    "nbdmagic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "flags" / Int16ub,
)  # 18 bytes

ClientFlags = Struct("flags" / Int32ub)

OptionHeader = Struct(
    "magic" / Const(IHAVEOPT, Int64ub),
    "option" / Int32ub,
    "length" / Int32ub,
)  # 16 bytes, followed by ``length`` bytes of option data

OptionReplyHeader = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "reply" / Int32ub,
    "length" / Int32ub,
)  # 20 bytes, followed by ``length`` bytes of reply data

# NBD_OPT_INFO / NBD_OPT_GO data: the export name and the info items wanted.
InfoRequest = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "requests" / PrefixedArray(Int16ub, Int16ub),
)

# NBD_REP_SERVER data (NBD_OPT_LIST): the name, then free text.
ServerEntry = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "description" / GreedyString("utf8"),
)

# NBD_REP_INFO data: a 16-bit info type, then a type-specific body.
InfoReply = Struct(
    "type" / Int16ub,
    "body" / Switch(
        this.type,
        {
            Info.EXPORT: Struct("size" / Int64ub, "flags" / Int16ub),
            Info.NAME: Struct("name" / GreedyString("utf8")),
            Info.DESCRIPTION: Struct("description" / GreedyString("utf8")),
            Info.BLOCK_SIZE: Struct(
                "minimum" / Int32ub, "preferred" / Int32ub, "maximum" / Int32ub
            ),
        },
        default=GreedyBytes,
    ),
)

# NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: an export name and queries.
MetaContextRequest = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "queries" / PrefixedArray(Int32ub, PascalString(Int32ub, "utf8")),
)

# NBD_REP_META_CONTEXT data: the context's id (used in BLOCK_STATUS replies), then its name.
MetaContextReply = Struct("context_id" / Int32ub, "name" / GreedyString("utf8"))

# The NBD_OPT_EXPORT_NAME reply (no option reply header), 124 zero bytes
# follow unless both sides set NO_ZEROES.
ExportNameReply = Struct("size" / Int64ub, "flags" / Int16ub)
EXPORT_NAME_ZEROES = 124
ExportNameZeroes = Bytes(EXPORT_NAME_ZEROES)

# -- transmission ---------------------------------------------------------------
Request = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "handle" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)  # 28 bytes, followed by ``length`` bytes of data for NBD_CMD_WRITE

SimpleReply = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "handle" / Int64ub,
)  # 16 bytes, followed by the data of a successful NBD_CMD_READ

StructuredReplyHeader = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "handle" / Int64ub,
    "length" / Int32ub,
)  # 20 bytes, followed by ``length`` bytes of chunk payload

OffsetDataChunk = Struct("offset" / Int64ub)  # then the data
OffsetHoleChunk = Struct("offset" / Int64ub, "length" / Int32ub)
# NBD_REPLY_TYPE_BLOCK_STATUS payload: the context id, then (length, flags) descriptors.
BlockDescriptor = Struct("length" / Int32ub, "flags" / Int32ub)
BlockStatusChunk = Struct("context_id" / Int32ub, "descriptors" / GreedyRange(BlockDescriptor))
ErrorChunk = Struct(
    "error" / Int32ub,
    "message" / PascalString(Int16ub, "utf8"),
)


CLIENT_FLAGS = fast_struct(ClientFlags)
REQUEST = fast_struct(Request)  # (magic, flags, type, handle, offset, length)
SIMPLE_REPLY = fast_struct(SimpleReply)  # (magic, error, handle)
STRUCTURED_REPLY = fast_struct(StructuredReplyHeader)  # (magic, flags, type, handle, length)
OPTION_HEADER = fast_struct(OptionHeader)
OPTION_REPLY_HEADER = fast_struct(OptionReplyHeader)

REQUEST_SIZE = REQUEST.size  # 28
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
STRUCTURED_REPLY_SIZE = STRUCTURED_REPLY.size  # 20


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One option reply: header plus data."""
    return OptionReplyHeader.build(dict(option=option, reply=reply, length=len(data))) + data


def info_reply(option: int, info_type: int, **body) -> bytes:
    return option_reply(option, Reply.INFO, InfoReply.build(dict(type=info_type, body=body)))
