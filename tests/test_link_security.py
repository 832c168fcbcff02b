"""The replication link against an attacker without the secret (issue 16):
after the handshake a rewritten, replayed or sniffed frame gets nothing;
before it, a stranger cannot make the secondary buffer a long frame, parse
a huge HELLO, or crowd out a real pair.

In one process over real TCP on 127.0.0.1: a Primary and LinkRemote against
a ReplicationService in front of a real Secondary (tests/test_link_service.py's
Site). The attacker sits on the primary's connection as a Link wrapper: it
sees and rewrites the bytes on the wire, as a proxy would."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time

import crc32c
import pytest

from drivers import open_device, open_nvram
from drivers.link import Framing, connect_link, listen_links
from firmware import primary as primary_mod
from firmware import protocol as p
from firmware.link_primary import HandshakeRefused, LinkRemote
from firmware.params import SessionParams
from firmware.remote import VolumeGeometry
from hal.clock import AsyncioClock
from hal.link import Link, LinkDown
from harness.config import load_config
from harness.controller import connect_replication_link
from harness.errors import ConfigError
from tests.test_config import PRIMARY, SECONDARY, write
from tests.test_link_service import SECRET, Site, wait_until

pytestmark = pytest.mark.timeout(120)

TRACK = 65536
TRACKS = 16
GEOMETRY = [VolumeGeometry("vol0", TRACKS * TRACK, TRACK)]
# The replication link's framing with the pre-auth cap, as the controllers should wire it.
SEALED_FRAMING = Framing(p.HEADER_BYTES, p.rest_length, preauth_bytes=p.PREAUTH_FRAME_BYTES, opens=p.is_sealed)
MARK = b"PLAINTEXT-MARK-7f3a"  # a known pattern in every payload, for the sniffer


def recrc(raw: bytes | bytearray) -> bytes:
    raw = bytes(raw)
    return raw[:-4] + crc32c.crc32c(raw[:-4]).to_bytes(4, "big")


def is_data(raw: bytes | bytearray) -> bool:
    return len(raw) > 5 and raw[5] == p.Kind.DATA


class Wiretap(Link):
    """The attacker on the primary's connection: keeps every byte sent
    (``sniffed``), and rewrites or replays DATA frames when told to."""

    def __init__(self, inner: Link, spy: Spy) -> None:
        self.inner = inner
        self.spy = spy

    @property
    def peer(self) -> str:
        return self.inner.peer

    async def send(self, frame: bytes) -> None:
        spy = self.spy
        raw = bytes(frame)
        if is_data(raw):
            spy.data_frames.append(raw)
            if spy.flip:
                spy.flip -= 1
                b = bytearray(raw)
                b[-40] ^= 0x01  # a payload byte; then the CRC fixed up, as any proxy can
                raw = recrc(b)
                spy.done["flip"] += 1
            elif spy.replay:
                spy.replay -= 1
                await self.inner.send(spy.data_frames[0])  # an old frame of this connection, sent again
                spy.done["replay"] += 1
        spy.sniffed += raw
        await self.inner.send(raw)

    async def recv(self) -> bytes:
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()


class Spy:
    def __init__(self) -> None:
        self.sniffed = bytearray()
        self.data_frames: list[bytes] = []
        self.flip = 0
        self.replay = 0
        self.done = {"flip": 0, "replay": 0}


class Pair:
    """A Primary on mem:// A replicating to Site through a Wiretap."""

    def __init__(self, tmp_path, *, encrypt: bool = True, service_encrypt: bool | None = None) -> None:
        self.tmp_path = tmp_path
        self.encrypt = encrypt
        self.service_encrypt = encrypt if service_encrypt is None else service_encrypt
        self.spy = Spy()

    async def start(self) -> Pair:
        self.site = Site(self.tmp_path, geometry=GEOMETRY)
        await self.site.start()
        # The service as the controller makes it, with this pair's encrypt setting.
        self.site.service.encrypt = self.service_encrypt

        async def factory():
            link = await connect_replication_link("127.0.0.1", self.site.port, timeout_s=2)
            return Wiretap(link, self.spy)

        self.remote = LinkRemote(factory, SECRET, random_bytes=random.Random(3).randbytes, backoff_s=(0.01, 0.05),
                                 encrypt=self.encrypt)
        self.a = open_device(f"mem://?size={TRACKS * TRACK}")
        self.nvram = open_nvram(f"nvram://{self.tmp_path}/p.nvram?size=16MiB")
        self.primary = primary_mod.Primary({"vol0": self.a}, self.nvram, AsyncioClock(),
                                           SessionParams(track_bytes=TRACK), self.remote, session_id="test")
        await self.primary.open(format=True)
        await self.primary.start()
        await wait_until(lambda: self.primary.status()["total_successful_cgs"] >= 1)
        return self

    def status(self) -> dict:
        return self.primary.status()

    async def write_marked(self, seed: int) -> None:
        for t in range(0, TRACKS, 2):
            await self.primary.write("vol0", t * TRACK, (MARK + bytes([seed, t])) * (TRACK // (len(MARK) + 2))
                                     + bytes(TRACK % (len(MARK) + 2)))

    async def c_equals_a(self) -> bool:
        return (await self.site.secondary.read_c("vol0", 0, TRACKS * TRACK)
                == await self.a.read(0, TRACKS * TRACK // 512))

    async def caught_up(self) -> None:
        """Wait until a CG started after now has committed, then pause CGs."""
        ok = self.status()["total_successful_cgs"]
        await wait_until(lambda: self.status()["total_successful_cgs"] > ok + 1, 30)
        await self.primary.cg_pause()
        await wait_until(lambda: self.status()["copy_state"] == "Paused")

    async def close(self) -> None:
        await self.primary.stop(clean=True)
        await self.remote.close()
        await self.site.close()
        self.nvram.close()


def run(coro):
    return asyncio.run(coro)


# -- after the handshake ----------------------------------------------------------------


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypted", "clear"])
def test_a_payload_byte_rewritten_with_its_crc_fixed_is_refused_and_the_next_cg_commits(tmp_path, encrypt):
    # Before sealing the secondary wrote the rewritten track into B and
    # committed it: C silently differed from A.
    async def main():
        pair = await Pair(tmp_path, encrypt=encrypt).start()
        await pair.primary.cg_pause()
        await wait_until(lambda: pair.status()["copy_state"] == "Paused")
        await pair.write_marked(1)
        failed = pair.status()["total_failed_cgs"]
        c_before = await pair.site.secondary.read_c("vol0", 0, TRACKS * TRACK)
        pair.spy.flip = 1
        await pair.primary.cg_resume()
        await wait_until(lambda: pair.status()["total_failed_cgs"] > failed)
        assert pair.spy.done["flip"] == 1
        assert pair.site.service.stats["bad_frames"] == 1
        assert any("DATA seq" in line and "tag mismatch" in line for line in pair.site.service.rejected)
        # The CG that carried it failed whole: C is where it was or a later committed CG, never torn.
        c_now = await pair.site.secondary.read_c("vol0", 0, TRACKS * TRACK)
        assert c_now == c_before or await pair.c_equals_a()
        # The link comes back by itself and the next CG commits: C is A.
        await pair.caught_up()
        assert await pair.c_equals_a()
        assert pair.remote.stats["handshakes"] >= 2
        await pair.close()

    run(main())


def test_a_data_frame_replayed_later_on_the_same_connection_is_refused(tmp_path):
    async def main():
        pair = await Pair(tmp_path).start()
        await pair.primary.cg_pause()
        await wait_until(lambda: pair.status()["copy_state"] == "Paused")
        handshakes = pair.remote.stats["handshakes"]
        await pair.write_marked(2)
        pair.spy.replay = 1
        failed = pair.status()["total_failed_cgs"]
        await pair.primary.cg_resume()
        await wait_until(lambda: pair.status()["total_failed_cgs"] > failed)
        assert pair.spy.done["replay"] == 1
        assert any("replayed" in line for line in pair.site.service.rejected)
        await pair.caught_up()
        assert await pair.c_equals_a() and pair.remote.stats["handshakes"] > handshakes
        await pair.close()

    run(main())


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypted", "clear"])
def test_a_sniffer_sees_no_payload_unless_encryption_is_off(tmp_path, encrypt):
    async def main():
        pair = await Pair(tmp_path, encrypt=encrypt).start()
        start = len(pair.spy.sniffed)
        await pair.write_marked(3)
        await pair.caught_up()
        assert await pair.c_equals_a()  # the marked tracks did cross
        wire = bytes(pair.spy.sniffed[start:])
        assert len(wire) > 8 * TRACK
        if encrypt:
            assert MARK not in wire
        else:
            assert wire.count(MARK) > 1000  # in clear, as asked ([link] encrypt = false) ...
            # ... and still sealed: every DATA frame carries its tag.
            assert all(f[6:8] == struct.pack(">H", p.FLAG_SEALED | p.FLAG_CLEAR) for f in pair.spy.data_frames)
        await pair.close()

    run(main())


def test_a_primary_sending_in_clear_is_refused_where_encryption_is_required(tmp_path):
    async def main():
        site = await Site(tmp_path, geometry=GEOMETRY).start()
        remote = LinkRemote(lambda: connect_replication_link("127.0.0.1", site.port, timeout_s=2), SECRET,
                            random_bytes=os.urandom, encrypt=False)
        with pytest.raises(HandshakeRefused, match="requires encryption"):
            await remote.connect("test", GEOMETRY)
        await remote.close()
        await site.close()

    run(main())


# -- before the handshake ---------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def stream_long_frame(port: int, announced: int, send_bytes: int) -> int:
    """A stranger: a DATA header announcing ``announced`` body bytes, then up
    to ``send_bytes`` of them; how many were accepted before the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.Kind.DATA, 0, 1, announced)
    chunk = bytes(1 << 20)
    sent = 0
    try:
        writer.write(header)
        while sent < send_bytes:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 5)
            sent += len(chunk)
    except (ConnectionError, OSError, TimeoutError):
        pass
    writer.transport.abort()
    return sent


@pytest.mark.slow
def test_a_64_mib_frame_header_before_the_handshake_is_refused_unread(tmp_path):
    # Before: the driver read the whole 64 MiB body of each such connection
    # into memory (issue 16: 12 connections, 97 -> 706 MiB).
    async def main():
        site = Site(tmp_path, geometry=GEOMETRY)
        await site.secondary.open(format=True)
        from firmware.link_secondary import ReplicationService

        links = []

        async def serve(link):
            links.append(link)
            await site.service.serve(link)

        site.service = ReplicationService(site.secondary, SECRET, "test", random_bytes=os.urandom)
        server = await listen_links("127.0.0.1", 0, serve, framing=SEALED_FRAMING)
        port = server.sockets[0].getsockname()[1]
        before = rss_bytes()
        sent = await asyncio.gather(*(stream_long_frame(port, p.MAX_BODY_BYTES, 64 << 20) for _ in range(12)))
        grew = rss_bytes() - before
        print(f"\n12 strangers announcing 64 MiB frames: RSS +{grew >> 20} MiB, {sum(sent) >> 20} MiB accepted")
        assert all(link.refused_frames == 1 for link in links) and len(links) == 12
        assert sum(sent) < 12 * (16 << 20), sent  # the peer was hung up on, not read to the end
        assert grew < 64 << 20, f"RSS grew {grew >> 20} MiB"
        # A real primary over the same framing still pairs and sends 1 MiB tracks (the cap lifted).
        big = [VolumeGeometry("vol0", 4 << 20, 1 << 20)]
        site2 = Site(tmp_path, geometry=big)
        await site2.secondary.open(format=True)
        site2.service = ReplicationService(site2.secondary, SECRET, "test", random_bytes=os.urandom)
        server2 = await listen_links("127.0.0.1", 0, site2.service.serve, framing=SEALED_FRAMING)
        port2 = server2.sockets[0].getsockname()[1]
        remote = LinkRemote(lambda: connect_link("127.0.0.1", port2, framing=SEALED_FRAMING), SECRET,
                            random_bytes=os.urandom)
        await remote.connect("test", big)
        await remote.send_track("vol0", 1, 1, b"\x42" * (1 << 20))
        for step in (remote.drain_done, remote.prepare, remote.commit):
            await step(1)
        assert await site2.secondary.read_c("vol0", 1 << 20, 1 << 20) == b"\x42" * (1 << 20)
        await remote.close()
        for srv in (server, server2):
            srv.close()
            await srv.wait_closed()
        await site.secondary.close()
        await site2.secondary.close()
        site.nvram.close()
        site2.nvram.close()

    run(main())


def huge_hello(volumes: int = 65535) -> bytes:
    body = (struct.pack(">H", p.PROTOCOL_VERSION) + struct.pack(">H", 4) + b"test" + struct.pack(">H", volumes)
            + (struct.pack(">H", 4) + b"vol0" + struct.pack(">QI", 1 << 20, 65536)) * volumes + bytes(8))
    header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.Kind.HELLO, 0, 1, len(body))
    return recrc(header + body + bytes(4))


def test_a_hello_of_65535_volumes_is_refused_fast(tmp_path):
    # Before: parsed whole on the event loop, 0.6 s each. Now the controllers'
    # framing refuses a pre-auth frame over PREAUTH_FRAME_BYTES unread (the
    # connection closes); a HELLO under that cap with more volumes than a
    # region holds gets the service's ERROR frame before any entry is parsed.
    async def main():
        site = await Site(tmp_path, geometry=GEOMETRY).start()
        for volumes in (65535, 1000):
            raw = huge_hello(volumes)
            link = await connect_replication_link("127.0.0.1", site.port)
            start = time.perf_counter()
            await link.send(raw)
            try:
                answer = p.decode(await asyncio.wait_for(link.recv(), 5))
            except LinkDown:
                answer = None
            took = time.perf_counter() - start
            if len(raw) > p.PREAUTH_FRAME_BYTES:
                assert answer is None, answer  # refused unread
            else:
                assert isinstance(answer, p.Error) and f"more than {p.MAX_VOLUMES} volumes" in answer.message
            assert took < 0.3, took
            await link.close()
        await site.close()

    run(main())


def test_twenty_strangers_do_not_stop_cgs(tmp_path):
    async def main():
        pair = await Pair(tmp_path).start()
        pair.site.service.handshake_timeout_s = 1.0

        async def cgs_in(seconds: float) -> int:
            ok = pair.status()["total_successful_cgs"]
            await asyncio.sleep(seconds)
            return pair.status()["total_successful_cgs"] - ok

        quiet = await cgs_in(1.5)
        strangers = []
        stop = asyncio.Event()

        async def stranger(i: int) -> None:
            # Half say nothing, half send a HELLO of 65,535 volumes, again and again.
            while not stop.is_set():
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", pair.site.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                if i % 2:
                    writer.write(huge_hello())
                try:
                    await asyncio.wait_for(reader.read(), 3)
                except (TimeoutError, ConnectionError):
                    pass
                writer.transport.abort()

        strangers = [asyncio.ensure_future(stranger(i)) for i in range(20)]
        await asyncio.sleep(0.3)
        attacked = await cgs_in(3.0)
        stop.set()
        await asyncio.gather(*strangers, return_exceptions=True)
        print(f"\nCGs per s: {quiet / 1.5:.1f} quiet, {attacked / 3.0:.1f} with 20 strangers")
        assert pair.primary.status()["link"] == "up"
        assert attacked / 3.0 >= 0.3 * quiet / 1.5, (quiet, attacked)
        assert pair.site.service.stats["rejected"] > 0
        await pair.close()

    run(main())


def test_the_busy_refusal_bounds_waiting_strangers(tmp_path):
    async def main():
        site = await Site(tmp_path, geometry=GEOMETRY).start()
        service = site.service
        idle = []
        for _ in range(service.max_handshakes * 4 + 5):
            idle.append(await asyncio.open_connection("127.0.0.1", site.port))
        await wait_until(lambda: service.stats["busy"] == 5, 5)
        assert service._unpaired == service.max_handshakes * 4
        for _, writer in idle:
            writer.transport.abort()
        await site.close()

    run(main())


# -- config -------------------------------------------------------------------------------


def test_link_encrypt_and_handshake_keys(tmp_path):
    cfg = load_config(write(tmp_path, PRIMARY))
    assert cfg.link_encrypt is True
    cfg = load_config(write(tmp_path, PRIMARY.replace('[link]\n', '[link]\nencrypt = false\n')))
    assert cfg.link_encrypt is False
    cfg = load_config(write(tmp_path, SECONDARY.replace(
        '[link]\n', '[link]\nencrypt = false\nmax_handshakes = 2\nhandshake_timeout_s = 2.5\n')))
    assert (cfg.link_encrypt, cfg.link_max_handshakes, cfg.link_handshake_timeout_s) == (False, 2, 2.5)
    for bad, key in [('encrypt = "no"', "link.encrypt"), ("max_handshakes = 0", "link.max_handshakes"),
                     ("handshake_timeout_s = inf", "link.handshake_timeout_s")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(write(tmp_path, SECONDARY.replace("[link]\n", f"[link]\n{bad}\n")))
    with pytest.raises(ConfigError, match="max_handshakes"):  # a primary has no listener
        load_config(write(tmp_path, PRIMARY.replace("[link]\n", "[link]\nmax_handshakes = 2\n")))


def test_link_down_is_what_a_closed_wiretap_says():
    # The wrapper forwards LinkDown as is (the primary's drop path sees the real cause).
    class Dead(Link):
        async def send(self, frame):
            raise LinkDown("gone")

        async def recv(self):
            raise LinkDown("gone")

        async def close(self):
            pass

    async def main():
        with pytest.raises(LinkDown):
            await Wiretap(Dead(), Spy()).send(b"x")

    run(main())
