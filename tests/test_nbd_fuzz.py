"""Malformed and hostile input to the NBD server over raw sockets. Every case
must end in an error reply or a clean disconnect; afterwards the server
still serves a fresh client and the data on the device is unchanged."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_nbd_server import OneVolume, ServedTarget

from drivers import open_device
from drivers.nbd import protocol as p
from drivers.nbd.client import NbdClient
from hal.host import HostVolume
from harness.hostport import DeviceTarget

pytestmark = pytest.mark.timeout(120)

SIZE = 4 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nbdfuzz")
    dev = open_device("mem://?size=4MiB")
    ro = open_device("mem://?size=4MiB")

    async def fill():
        await dev.write(0, bytes(range(256)) * (SIZE // 256))
        await ro.write(0, b"\x5a" * SIZE)

    asyncio.run(fill())
    rw = ServedTarget(DeviceTarget({"vol0": dev}), str(tmp / "rw.sock"))
    rot = ServedTarget(DeviceTarget({"ro": ro}), str(tmp / "ro.sock"), read_only=True)
    yield rw, rot
    rw.stop()
    rot.stop()


def connect(s: ServedTarget) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server hangs up (after any replies still queued)."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def handshake(s: ServedTarget, name: str = "vol0") -> socket.socket:
    sock = connect(s)
    greeting = p.ServerGreeting.parse(recv_exact(sock, 18))
    assert greeting.flags & p.HandshakeFlag.FIXED_NEWSTYLE
    sock.sendall(p.ClientFlags.build(dict(flags=3)))
    data = p.InfoRequest.build(dict(name=name, requests=[p.Info.BLOCK_SIZE]))
    sock.sendall(p.OptionHeader.build(dict(option=p.Option.GO, length=len(data))) + data)
    while True:
        _m, _o, reply, length = p.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))
        recv_exact(sock, length)
        if reply == p.Reply.ACK:
            return sock
        assert not reply & (1 << 31), hex(reply)


def request(sock, cmd, offset, length, payload=b"", flags=0, handle=1, magic=p.REQUEST_MAGIC) -> None:
    sock.sendall(struct.pack(">LHHQQL", magic, flags, cmd, handle, offset, length) + payload)


def simple_reply(sock) -> tuple[int, int]:
    magic, err, handle = p.SIMPLE_REPLY.unpack(recv_exact(sock, 16))
    assert magic == p.SIMPLE_REPLY_MAGIC
    return err, handle


def assert_healthy(s: ServedTarget, name: str, digest: str) -> None:
    async def probe():
        c = await NbdClient.connect(s.tcp(name))
        assert len(await c.read(0, 4096)) == 4096
        await c.close()

    asyncio.run(probe())
    assert s.digest(name) == digest


@pytest.fixture
def rw(served):
    s = served[0]
    before = s.digest("vol0")
    yield s
    assert_healthy(s, "vol0", before)


# -- negotiation ------------------------------------------------------------------
def test_unknown_client_flags_disconnect(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 0x80))
    assert closed_by_server(sock)


def test_bad_option_magic_disconnects(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 1) + b"IHAVEOPX" + struct.pack(">LL", 7, 0))
    assert closed_by_server(sock)


def test_huge_option_length_disconnects(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 1) + p.OptionHeader.build(dict(option=p.Option.GO, length=0xFFFFFFF0)))
    assert closed_by_server(sock)


def test_option_errors_keep_negotiating(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 1))

    def opt(option, data=b""):
        sock.sendall(p.OptionHeader.build(dict(option=option, length=len(data))) + data)
        _m, o, reply, length = p.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))
        recv_exact(sock, length)
        assert o == option
        return reply

    assert opt(999) == p.Reply.ERR_UNSUP
    assert opt(p.Option.STARTTLS) == p.Reply.ERR_UNSUP
    assert opt(p.Option.GO, b"\x00\x00\x00\x09vo") == p.Reply.ERR_INVALID  # truncated name
    assert opt(p.Option.GO, p.InfoRequest.build(dict(name="vol0", requests=[])) + b"junk") == p.Reply.ERR_INVALID
    assert opt(p.Option.INFO, p.InfoRequest.build(dict(name="nope", requests=[]))) == p.Reply.ERR_UNKNOWN
    assert opt(p.Option.LIST, b"x") == p.Reply.ERR_INVALID
    assert opt(p.Option.ABORT) == p.Reply.ACK
    assert closed_by_server(sock)


def test_export_name_unknown_disconnects(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 1) + p.OptionHeader.build(dict(option=p.Option.EXPORT_NAME, length=4)) + b"nope")
    assert closed_by_server(sock)


def test_export_name_enters_transmission(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 1) + p.OptionHeader.build(dict(option=p.Option.EXPORT_NAME, length=4)) + b"vol0")
    reply = p.ExportNameReply.parse(recv_exact(sock, 10 + 124))
    assert reply.size == SIZE and reply.flags & p.TransmissionFlag.HAS_FLAGS
    request(sock, p.Cmd.READ, 0, 512)
    assert simple_reply(sock) == (0, 1)
    assert recv_exact(sock, 512) == bytes(range(256)) * 2
    request(sock, p.Cmd.DISC, 0, 0)
    assert closed_by_server(sock)


def test_truncated_handshake_then_vanish(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(b"\x00\x00")
    sock.close()


# -- transmission -----------------------------------------------------------------
def test_bad_request_magic_disconnects(rw):
    sock = handshake(rw)
    request(sock, p.Cmd.WRITE, 0, 512, b"\xff" * 512, magic=0x12345678)
    assert closed_by_server(sock)


@pytest.mark.parametrize("cmd, offset, length, payload, flags, want", [
    (p.Cmd.READ, SIZE, 512, b"", 0, p.NbdErrno.EINVAL),             # offset past the end
    (p.Cmd.READ, (1 << 64) - 512, 512, b"", 0, p.NbdErrno.EINVAL),  # offset wraps
    (p.Cmd.READ, 0, 64 << 20, b"", 0, p.NbdErrno.EOVERFLOW),        # over the maximum
    (p.Cmd.READ, 3, 512, b"", 0, p.NbdErrno.EINVAL),                # misaligned offset
    (p.Cmd.WRITE, SIZE - 512, 1024, b"\xee" * 1024, 0, p.NbdErrno.ENOSPC),  # length past the end
    (p.Cmd.WRITE, 0, 100, b"\xee" * 100, 0, p.NbdErrno.EINVAL),     # misaligned length
    (p.Cmd.WRITE, 0, 512, b"\xee" * 512, 0x40, p.NbdErrno.EINVAL),  # unknown flag
    (p.Cmd.TRIM, 0, SIZE + 512, b"", 0, p.NbdErrno.EINVAL),
    (p.Cmd.WRITE_ZEROES, 512, 7, b"", 0, p.NbdErrno.EINVAL),
    (p.Cmd.CACHE, 0, 512, b"", 0, p.NbdErrno.EINVAL),               # not advertised
    (200, 0, 0, b"", 0, p.NbdErrno.EINVAL),                         # unknown command
])
def test_bad_request_gets_error_reply_and_connection_continues(rw, cmd, offset, length, payload, flags, want):
    sock = handshake(rw)
    request(sock, cmd, offset, length, payload, flags=flags, handle=77)
    assert simple_reply(sock) == (want, 77)
    request(sock, p.Cmd.READ, 512, 512, handle=78)
    assert simple_reply(sock) == (0, 78)
    recv_exact(sock, 512)
    sock.close()


def test_oversized_write_payload_is_drained(rw):
    sock = handshake(rw)
    request(sock, p.Cmd.WRITE, 0, (32 << 20) + 512, b"\xee" * ((32 << 20) + 512), handle=5)
    assert simple_reply(sock) == (p.NbdErrno.EINVAL, 5)
    request(sock, p.Cmd.FLUSH, 0, 0, handle=6)
    assert simple_reply(sock) == (0, 6)
    sock.close()


def test_absurd_write_length_disconnects(rw):
    sock = handshake(rw)
    request(sock, p.Cmd.WRITE, 0, 0xFFFFFE00, b"\xee" * 4096)
    assert closed_by_server(sock)


def go_flags(s: ServedTarget, name: str) -> tuple[socket.socket, int]:
    """Negotiate ``name`` with GO; the socket in transmission and the export's flags."""
    sock = connect(s)
    recv_exact(sock, 18)
    sock.sendall(p.ClientFlags.build(dict(flags=3)))
    data = p.InfoRequest.build(dict(name=name, requests=[]))
    sock.sendall(p.OptionHeader.build(dict(option=p.Option.GO, length=len(data))) + data)
    flags = None
    while True:
        _m, _o, reply, length = p.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))
        body = recv_exact(sock, length)
        assert not reply & (1 << 31), hex(reply)
        if reply == p.Reply.INFO and struct.unpack_from(">H", body)[0] == p.Info.EXPORT:
            _type, _size, flags = struct.unpack(">HQH", body)
        if reply == p.Reply.ACK:
            return sock, flags


TF = p.TransmissionFlag
# What the exports advertised before the volumes declared their capabilities (pinned, not derived).
PLAIN_RW_FLAGS = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.CAN_MULTI_CONN
PLAIN_RO_FLAGS = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.CAN_MULTI_CONN


def test_plain_devices_advertise_what_they_always_did(served):
    for s, name, want in ((served[0], "vol0", PLAIN_RW_FLAGS), (served[1], "ro", PLAIN_RO_FLAGS)):
        sock, flags = go_flags(s, name)
        assert flags == want == {"vol0": 365, "ro": 263}[name], (name, TF(flags))
        sock.close()


class DeclaringVolume(HostVolume):
    """A volume that declares capabilities and records every call that reaches it."""

    def __init__(self, name: str, *, read_only: bool = False, caps: frozenset = frozenset()) -> None:
        self.name = name
        self.size_bytes = 1 << 20
        self.read_only = read_only
        self.caps = caps  # the can_* names that answer False
        self.calls: list[tuple] = []

    def can_flush(self) -> bool:
        return "flush" not in self.caps

    def can_fua(self) -> bool:
        return "fua" not in self.caps

    def can_trim(self) -> bool:
        return "trim" not in self.caps

    def can_zero(self) -> bool:
        return "zero" not in self.caps

    def can_multi_conn(self) -> bool:
        return "multi_conn" not in self.caps

    async def read(self, offset, length):
        return bytes(length)

    async def write(self, offset, data, *, fua=False):
        self.calls.append(("write", fua))

    async def flush(self):
        self.calls.append(("flush",))

    async def trim(self, offset, length):
        self.calls.append(("trim",))

    async def write_zeroes(self, offset, length, *, fua=False):
        self.calls.append(("zero", fua))


def test_an_export_offers_and_accepts_only_what_its_volume_declares(tmp_path):
    vol = DeclaringVolume("lim", caps=frozenset({"flush", "fua", "trim", "zero", "multi_conn"}))
    s = ServedTarget(OneVolume(vol), str(tmp_path / "lim.sock"))
    try:
        sock, flags = go_flags(s, "lim")
        assert flags == TF.HAS_FLAGS, TF(flags)  # writable, nothing else
        for h, (cmd, flag, payload) in enumerate([(p.Cmd.FLUSH, 0, b""), (p.Cmd.TRIM, 0, b""),
                                                  (p.Cmd.WRITE_ZEROES, 0, b""),
                                                  (p.Cmd.WRITE, p.CmdFlag.FUA, b"\x01" * 512)]):
            request(sock, cmd, 0, 0 if cmd == p.Cmd.FLUSH else 512, payload, flags=flag, handle=h)
            assert simple_reply(sock) == (p.NbdErrno.EINVAL, h), p.Cmd(cmd).name
        request(sock, p.Cmd.WRITE, 0, 512, b"\x01" * 512, handle=9)
        assert simple_reply(sock) == (0, 9)
        sock.close()
        assert vol.calls == [("write", False)]  # nothing refused reached the volume
    finally:
        s.stop()


def test_a_volume_that_is_read_only_is_exported_read_only(tmp_path):
    """The secondary's C copy: the volume says read_only, the server was not told."""
    vol = DeclaringVolume("c", read_only=True)
    s = ServedTarget(OneVolume(vol), str(tmp_path / "c.sock"))
    try:
        sock, flags = go_flags(s, "c")
        assert flags == PLAIN_RO_FLAGS, TF(flags)
        for h, (cmd, payload) in enumerate([(p.Cmd.WRITE, b"\x00" * 512), (p.Cmd.TRIM, b""),
                                            (p.Cmd.WRITE_ZEROES, b"")]):
            request(sock, cmd, 0, 512, payload, handle=h)
            assert simple_reply(sock) == (p.NbdErrno.EPERM, h)
        request(sock, p.Cmd.FLUSH, 0, 0, handle=7)
        assert simple_reply(sock) == (0, 7)
        request(sock, p.Cmd.READ, 0, 512, flags=p.CmdFlag.FUA, handle=8)  # ignored on reads, as always
        assert simple_reply(sock) == (0, 8)
        recv_exact(sock, 512)
        sock.close()
        assert vol.calls == [("flush",)]
    finally:
        s.stop()


def test_read_only_refuses_every_write(served):
    s = served[1]
    before = s.digest("ro")
    sock = handshake(s, "ro")
    for h, (cmd, payload) in enumerate([(p.Cmd.WRITE, b"\x00" * 512), (p.Cmd.TRIM, b""), (p.Cmd.WRITE_ZEROES, b"")]):
        request(sock, cmd, 0, 512, payload, handle=h)
        assert simple_reply(sock) == (p.NbdErrno.EPERM, h)
    sock.close()
    assert_healthy(s, "ro", before)


@pytest.mark.parametrize("cut", [5, 27, 28 + 100])
def test_truncated_request_then_vanish(rw, cut):
    sock = handshake(rw)
    frame = struct.pack(">LHHQQL", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 4096) + b"\xee" * 4096
    sock.sendall(frame[:cut])
    sock.close()


def test_vanish_with_reads_in_flight(rw):
    sock = handshake(rw)
    for h in range(64):
        request(sock, p.Cmd.READ, 0, 1 << 20, handle=h)
    sock.close()


def test_structured_read_errors(rw):
    sock = connect(rw)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">L", 1) + p.OptionHeader.build(dict(option=p.Option.STRUCTURED_REPLY, length=0)))
    assert p.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))[2] == p.Reply.ACK
    data = p.InfoRequest.build(dict(name="vol0", requests=[]))
    sock.sendall(p.OptionHeader.build(dict(option=p.Option.GO, length=len(data))) + data)
    while True:
        _m, _o, reply, length = p.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))
        recv_exact(sock, length)
        if reply == p.Reply.ACK:
            break
    request(sock, p.Cmd.READ, SIZE, 512, handle=9)
    magic, flags, typ, handle, length = p.STRUCTURED_REPLY.unpack(recv_exact(sock, 20))
    assert (magic, flags, typ, handle) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.ReplyType.ERROR, 9)
    assert p.ErrorChunk.parse(recv_exact(sock, length)).error == p.NbdErrno.EINVAL
    request(sock, p.Cmd.READ, 512, 512, handle=10)
    magic, flags, typ, handle, length = p.STRUCTURED_REPLY.unpack(recv_exact(sock, 20))
    assert (typ, handle, length) == (p.ReplyType.OFFSET_DATA, 10, 8 + 512)
    body = recv_exact(sock, length)
    assert int.from_bytes(body[:8], "big") == 512 and body[8:] == bytes(range(256)) * 2
    sock.close()


# -- random input (hypothesis) --------------------------------------------------------
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _drain(sock: socket.socket) -> None:
    """Half-close, then read until the server hangs up: it must, promptly."""
    sock.settimeout(10)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server hung up already
    assert closed_by_server(sock)
    sock.close()


@FUZZ
@given(blob=st.binary(min_size=1, max_size=300))
def test_random_bytes_as_handshake(served, blob):
    s = served[0]
    before = s.digest("vol0")
    sock = connect(s)
    recv_exact(sock, 18)
    sock.sendall(blob)
    _drain(sock)
    assert_healthy(s, "vol0", before)


@FUZZ
@given(blob=st.binary(min_size=1, max_size=600))
def test_random_bytes_in_transmission(served, blob):
    assume(struct.pack(">L", p.REQUEST_MAGIC) not in blob)  # a valid write could legally change data
    s = served[0]
    before = s.digest("vol0")
    sock = handshake(s)
    sock.sendall(blob)
    _drain(sock)
    assert_healthy(s, "vol0", before)


@FUZZ
@given(cmd=st.integers(0, 0xFFFF), flags=st.integers(0, 0xFFFF), offset=st.integers(0, (1 << 64) - 1),
       length=st.integers(0, 1 << 22), extra=st.binary(max_size=64))
def test_random_requests_on_read_only_export(served, cmd, flags, offset, length, extra):
    s = served[1]
    before = s.digest("ro")
    sock = handshake(s, "ro")
    payload = b"\x00" * length if cmd == p.Cmd.WRITE else b""
    request(sock, cmd, offset, length, payload + extra, flags=flags, handle=3)
    sock.settimeout(5)
    if cmd != p.Cmd.DISC:
        try:
            err, handle = simple_reply(sock)
        except ConnectionError:
            err, handle = None, 3  # a clean disconnect is also an answer
        assert handle == 3
        if cmd in (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES):
            assert err != 0
    _drain(sock)
    assert_healthy(s, "ro", before)
