"""NBD wire format: construct round trips plus hand-made byte fixtures from
the specification (doc/proto.md), so a symmetric mistake cannot pass."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.nbd import protocol as p


def test_server_greeting_fixture():
    raw = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert p.ServerGreeting.build(dict(flags=3)) == raw
    assert p.ServerGreeting.parse(raw).flags == p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES


def test_option_header_fixture():
    # NBD_OPT_GO (7) with 10 bytes of data
    raw = b"IHAVEOPT" + bytes.fromhex("00000007 0000000a")
    assert p.OptionHeader.build(dict(option=p.Option.GO, length=10)) == raw
    assert p.OPTION_HEADER.unpack(raw) == (p.IHAVEOPT, 7, 10)


def test_option_reply_fixture():
    raw = bytes.fromhex("0003e889045565a9 00000007 00000001 00000000")
    assert p.option_reply(p.Option.GO, p.Reply.ACK) == raw
    err = p.OptionReplyHeader.parse(bytes.fromhex("0003e889045565a9 00000003 80000001 00000000"))
    assert p.Reply(err.reply) is p.Reply.ERR_UNSUP and p.Reply(err.reply).is_error


def test_info_request_fixture():
    # GO for export "vol0" asking for NBD_INFO_BLOCK_SIZE
    raw = bytes.fromhex("00000004") + b"vol0" + bytes.fromhex("0001 0003")
    assert p.InfoRequest.build(dict(name="vol0", requests=[p.Info.BLOCK_SIZE])) == raw
    parsed = p.InfoRequest.parse(raw)
    assert parsed.name == "vol0" and list(parsed.requests) == [3]


@pytest.mark.parametrize(
    "info_type, body, raw_hex",
    [
        (p.Info.EXPORT, dict(size=1 << 30, flags=0x016D), "0000 0000000040000000 016d"),
        (p.Info.BLOCK_SIZE, dict(minimum=512, preferred=4096, maximum=32 << 20),
         "0003 00000200 00001000 02000000"),
        (p.Info.NAME, dict(name="vol0"), "0001 766f6c30"),
    ],
)
def test_info_reply_fixtures(info_type, body, raw_hex):
    raw = bytes.fromhex(raw_hex)
    assert p.InfoReply.build(dict(type=info_type, body=body)) == raw
    parsed = p.InfoReply.parse(raw)
    assert parsed.type == info_type
    for key, value in body.items():
        assert parsed.body[key] == value


def test_server_entry_fixture():
    raw = bytes.fromhex("00000004") + b"vol1" + b"desc"
    assert p.ServerEntry.build(dict(name="vol1", description="desc")) == raw
    assert p.ServerEntry.parse(raw).name == "vol1"


def test_export_name_reply_fixture():
    raw = bytes.fromhex("0000000000100000 0003")
    assert p.ExportNameReply.build(dict(size=1 << 20, flags=3)) == raw
    assert p.EXPORT_NAME_ZEROES == 124


def test_request_fixture_is_28_bytes():
    # READ, handle 0x0102030405060708, offset 4096, length 512
    raw = bytes.fromhex("25609513 0000 0000 0102030405060708 0000000000001000 00000200")
    assert len(raw) == p.REQUEST_SIZE == 28
    built = p.Request.build(dict(flags=0, type=p.Cmd.READ, handle=0x0102030405060708, offset=4096, length=512))
    assert built == raw
    assert p.REQUEST.pack(p.REQUEST_MAGIC, 0, 0, 0x0102030405060708, 4096, 512) == raw
    # WRITE with FUA
    raw_w = bytes.fromhex("25609513 0001 0001 0000000000000009 0000000000000000 00001000")
    assert p.REQUEST.unpack(raw_w) == (p.REQUEST_MAGIC, p.CmdFlag.FUA, p.Cmd.WRITE, 9, 0, 4096)


def test_simple_reply_fixture_is_16_bytes():
    raw = bytes.fromhex("67446698 00000016 000000000000002a")  # EINVAL for handle 42
    assert len(raw) == p.SIMPLE_REPLY_SIZE == 16
    assert p.SimpleReply.build(dict(error=22, handle=42)) == raw
    assert p.SIMPLE_REPLY.unpack(raw) == (p.SIMPLE_REPLY_MAGIC, p.NbdErrno.EINVAL, 42)


def test_structured_reply_fixture():
    raw = bytes.fromhex("668e33ef 0001 0001 0000000000000007 00000208")
    assert p.StructuredReplyHeader.build(
        dict(flags=p.REPLY_FLAG_DONE, type=p.ReplyType.OFFSET_DATA, handle=7, length=520)) == raw
    assert p.STRUCTURED_REPLY.unpack(raw) == (p.STRUCTURED_REPLY_MAGIC, 1, 1, 7, 520)
    assert p.ErrorChunk.build(dict(error=5, message="x")) == bytes.fromhex("00000005 0001 78")


def test_bad_magic_is_refused_by_the_declaration():
    from construct import ConstError

    with pytest.raises(ConstError):
        p.Request.parse(bytes(28))
    with pytest.raises(ConstError):
        p.ServerGreeting.parse(b"NBDMAGIC" + b"XXXXXXXX" + b"\x00\x01")


def test_fast_struct_refuses_variable_layouts():
    from hal.wire import fast_struct

    with pytest.raises(TypeError):
        fast_struct(p.InfoRequest)


def test_errno_mapping():
    import errno

    assert p.nbd_errno(errno.EROFS) == p.NbdErrno.EPERM
    assert p.nbd_errno(errno.ENOSPC) == p.NbdErrno.ENOSPC
    assert p.nbd_errno(errno.EOPNOTSUPP) == p.NbdErrno.ENOTSUP
    assert p.nbd_errno(errno.ENOENT) == p.NbdErrno.EIO
    assert p.nbd_errno(None) == p.NbdErrno.EIO


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=60, deadline=None)
@given(flags=u16, cmd=u16, handle=u64, offset=u64, length=u32)
def test_request_round_trip_matches_fast_path(flags, cmd, handle, offset, length):
    value = dict(flags=flags, type=cmd, handle=handle, offset=offset, length=length)
    raw = p.Request.build(value)
    assert raw == p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length)
    parsed = p.Request.parse(raw)
    assert {k: parsed[k] for k in value} == value


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=40), requests=st.lists(u16, max_size=5))
def test_info_request_round_trip(name, requests):
    raw = p.InfoRequest.build(dict(name=name, requests=requests))
    parsed = p.InfoRequest.parse(raw)
    assert parsed.name == name and list(parsed.requests) == requests


@settings(max_examples=60, deadline=None)
@given(option=u32, reply=st.sampled_from(list(p.Reply)), data=st.binary(max_size=64))
def test_option_reply_round_trip(option, reply, data):
    raw = p.option_reply(option, reply, data)
    magic, opt, rep, length = p.OPTION_REPLY_HEADER.unpack(raw[:20])
    assert (magic, opt, rep, length) == (p.OPTION_REPLY_MAGIC, option, reply, len(data))
    assert raw[20:] == data
