"""NBD ``base:allocation``: LIST/SET_META_CONTEXT and BLOCK_STATUS, so
``nbdinfo --map`` shows a volume's holes where its device knows them
(file:// by SEEK_DATA/SEEK_HOLE, mem:// by its unallocated chunks), and
"all data" where it does not."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_nbd_server import ServedTarget

from drivers import open_device
from drivers.file import _in_blocks
from drivers.nbd.protocol import (
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    BlockStatusChunk,
    Cmd,
    CmdFlag,
    MetaContextReply,
    MetaContextRequest,
    NbdErrno,
    Option,
    Reply,
    ReplyType,
)
from hal.host import HostTarget, HostVolume
from harness.hostport import DeviceTarget

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def need_nbdinfo() -> None:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo not installed (make deps installs libnbd-bin)")


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, length, type) of every extent nbdinfo --map reports."""
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out.stdout)]


# -- the wire layouts, from the specification's bytes --------------------------------
def test_meta_context_request_fixture():
    raw = bytes.fromhex("00000004" "766f6c30" "00000001" "0000000f") + b"base:allocation"
    assert MetaContextRequest.build(dict(name="vol0", queries=["base:allocation"])) == raw
    assert MetaContextRequest.parse(raw).queries == ["base:allocation"]


def test_block_status_chunk_fixture():
    raw = bytes.fromhex("00000001" "00001000" "00000000" "00200000" "00000003")
    chunk = BlockStatusChunk.parse(raw)
    assert chunk.context_id == 1
    assert [(d.length, d.flags) for d in chunk.descriptors] == [(4096, 0), (2 * MiB, 3)]
    assert BlockStatusChunk.build(chunk) == raw


def test_byte_runs_become_whole_blocks():
    # A block partly data is data; a hole shorter than a block vanishes into its neighbours.
    assert _in_blocks([(4096, True), (8192, False), (4096, True)], 4096) == [(1, True), (2, False), (1, True)]
    assert _in_blocks([(1024, True), (1024, False), (6144, True)], 4096) == [(1, False), (1, True)]
    assert _in_blocks([(512, False), (3584, True)], 4096) == [(1, False)]


# -- real nbdinfo --map ----------------------------------------------------------------
def test_nbdinfo_map_shows_the_holes_of_a_sparse_file_under_mirrorfw_serve(tmp_path):
    need_nbdinfo()
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(40 * MiB)
        f.write(os.urandom(4096))
    sock = tmp_path / "serve.sock"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", f"file://{img}", "--listen", "none",
                             "--socket", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parent.parent))
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.stderr.read()[-2000:]
        extents = nbdinfo_map(f"nbd+unix:///vol0?socket={sock}")
        listed = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"],
                                capture_output=True, text=True, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    hole = 3  # hole,zero
    assert extents == [(0, 10 * MiB, hole), (10 * MiB, 2 * MiB, 0), (12 * MiB, 28 * MiB, hole),
                       (40 * MiB, 4096, 0), (40 * MiB + 4096, 24 * MiB - 4096, hole)]
    assert json.loads(listed.stdout)["exports"][0]["contexts"] == ["base:allocation"]


def test_nbdinfo_map_of_mem_and_of_a_volume_that_knows_no_holes(tmp_path):
    need_nbdinfo()
    mem = open_device("mem://?size=8MiB")
    asyncio.run(mem.write(3 * MiB // 512, os.urandom(4096)))
    s = ServedTarget(AllDataTarget(DeviceTarget({"mem": mem}).volumes()["mem"]), str(tmp_path / "nbd.sock"))
    try:
        assert nbdinfo_map(s.unix("mem")) == [(0, 3 * MiB, 3), (3 * MiB, MiB, 0), (4 * MiB, 4 * MiB, 3)]
        assert nbdinfo_map(s.unix("plain")) == [(0, 8 * MiB, 0)]
    finally:
        s.stop()
        mem.close()


class PlainVolume(HostVolume):
    """Declares nothing about extents: the HostVolume default (all data)."""

    def __init__(self, inner: HostVolume) -> None:
        self.inner, self.name, self.size_bytes = inner, "plain", inner.size_bytes

    async def read(self, offset, length):
        return await self.inner.read(offset, length)

    async def write(self, offset, data, *, fua=False):
        await self.inner.write(offset, data, fua=fua)

    async def flush(self):
        await self.inner.flush()


class AllDataTarget(HostTarget):
    def __init__(self, vol: HostVolume) -> None:
        self._volumes = {"mem": vol, "plain": PlainVolume(vol)}

    def volumes(self):
        return self._volumes


# -- the protocol's edges, with a raw client --------------------------------------------
class RawClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.recv(18)  # greeting
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "server closed"
            data += chunk
        return data

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to ACK or an error."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply, length = struct.unpack(">QIII", self.recv(20))
            assert (magic, opt) == (OPTION_REPLY_MAGIC, option)
            replies.append((reply, self.recv(length)))
            if reply == Reply.ACK or reply & (1 << 31):
                return replies

    def go(self, name: str) -> None:
        replies = self.option(Option.GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        assert replies[-1][0] == Reply.ACK

    def request(self, cmd: int, offset: int, length: int, flags: int = 0) -> tuple[int, int, bytes]:
        """(reply type, error, payload) of a request answered with one structured chunk."""
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, 7, offset, length))
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic != STRUCTURED_REPLY_MAGIC:
            err, _ = struct.unpack(">IQ", self.recv(12))
            return -1, err, b""
        _flags, rtype, _handle, length = struct.unpack(">HHQI", self.recv(16))
        body = self.recv(length)
        return rtype, (struct.unpack(">I", body[:4])[0] if rtype == ReplyType.ERROR else 0), body

    def close(self) -> None:
        self.sock.close()


def meta(name: str, *queries: str) -> bytes:
    return MetaContextRequest.build(dict(name=name, queries=list(queries)))


@pytest.fixture
def raw(tmp_path):
    mem = open_device("mem://?size=4MiB")
    asyncio.run(mem.write(MiB // 512, bytes([1]) * MiB))
    s = ServedTarget(AllDataTarget(DeviceTarget({"mem": mem}).volumes()["mem"]), str(tmp_path / "nbd.sock"))
    clients: list[RawClient] = []

    def connect() -> RawClient:
        clients.append(RawClient(s.sock_path))
        return clients[-1]

    yield connect
    for c in clients:
        c.close()
    s.stop()
    mem.close()


def test_set_meta_context_needs_structured_replies_and_list_does_not(raw):
    c = raw()
    assert c.option(Option.SET_META_CONTEXT, meta("mem", "base:allocation"))[-1][0] == Reply.ERR_INVALID
    listed = c.option(Option.LIST_META_CONTEXT, meta("mem"))
    assert [r for r, _ in listed] == [Reply.META_CONTEXT, Reply.ACK]
    assert MetaContextReply.parse(listed[0][1]).name == "base:allocation"
    assert [r for r, _ in c.option(Option.LIST_META_CONTEXT, meta("mem", "base:"))] == [Reply.META_CONTEXT, Reply.ACK]
    assert [r for r, _ in c.option(Option.LIST_META_CONTEXT, meta("mem", "qemu:dirty-bitmap:x"))] == [Reply.ACK]
    assert c.option(Option.LIST_META_CONTEXT, meta("nope"))[-1][0] == Reply.ERR_UNKNOWN
    assert c.option(Option.LIST_META_CONTEXT, b"\x00\x00")[-1][0] == Reply.ERR_INVALID


def test_block_status_answers_the_context_set_for_the_export(raw):
    c = raw()
    assert c.option(Option.STRUCTURED_REPLY)[-1][0] == Reply.ACK
    replies = c.option(Option.SET_META_CONTEXT, meta("mem", "base:allocation"))
    assert [r for r, _ in replies] == [Reply.META_CONTEXT, Reply.ACK]
    context_id = MetaContextReply.parse(replies[0][1]).context_id
    c.go("mem")
    rtype, err, body = c.request(Cmd.BLOCK_STATUS, 0, 4 * MiB)
    assert (rtype, err) == (ReplyType.BLOCK_STATUS, 0)
    chunk = BlockStatusChunk.parse(body)
    assert chunk.context_id == context_id
    assert [(d.length, d.flags) for d in chunk.descriptors] == [(MiB, 3), (MiB, 0), (2 * MiB, 3)]
    # REQ_ONE: one descriptor; an unaligned range is answered for exactly its bytes.
    _, _, body = c.request(Cmd.BLOCK_STATUS, MiB, 2 * MiB, flags=CmdFlag.REQ_ONE)
    assert [(d.length, d.flags) for d in BlockStatusChunk.parse(body).descriptors] == [(MiB, 0)]
    _, _, body = c.request(Cmd.BLOCK_STATUS, 0, 1000)
    assert [(d.length, d.flags) for d in BlockStatusChunk.parse(body).descriptors] == [(1000, 3)]
    _, _, body = c.request(Cmd.BLOCK_STATUS, MiB - 100, 300)
    assert [(d.length, d.flags) for d in BlockStatusChunk.parse(body).descriptors] == [(100, 3), (200, 0)]
    # Past the end, or empty: EINVAL in a structured error chunk.
    assert c.request(Cmd.BLOCK_STATUS, 3 * MiB, 2 * MiB)[:2] == (ReplyType.ERROR, NbdErrno.EINVAL)
    assert c.request(Cmd.BLOCK_STATUS, 0, 0)[:2] == (ReplyType.ERROR, NbdErrno.EINVAL)


def test_block_status_without_a_context_is_refused(raw):
    c = raw()
    assert c.option(Option.STRUCTURED_REPLY)[-1][0] == Reply.ACK
    # Set for another export name: it does not carry over to the export GO picks.
    assert c.option(Option.SET_META_CONTEXT, meta("plain", "base:allocation"))[-1][0] == Reply.ACK
    c.go("mem")
    assert c.request(Cmd.BLOCK_STATUS, 0, MiB)[:2] == (ReplyType.ERROR, NbdErrno.EINVAL)
    # Still serving: a read answers.
    rtype, err, body = c.request(Cmd.READ, MiB, 512)
    assert (rtype, err, body[8:]) == (ReplyType.OFFSET_DATA, 0, bytes([1]) * 512)
