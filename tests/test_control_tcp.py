"""The session control link over real TCP on 127.0.0.1: ControlRemote to a
ControlService through drivers/link.py with the protocol's framing; a raw
socket that replays a sealed frame, and one that replays a recorded
handshake, are refused and closed; a restarted subordinate is reconnected."""

from __future__ import annotations

import asyncio
import random

import pytest

from drivers.link import connect_link, listen_links
from firmware import control_protocol as cp
from firmware import protocol as p
from firmware.control_channel import open_master
from firmware.control_remote import ControlRemote
from firmware.control_service import ControlService
from firmware.events import EventBus
from harness.controller import LINK_FRAMING
from tests.test_control_link import SECRET, FakeMember, changes, until

pytestmark = pytest.mark.timeout(60)


async def serve(member: FakeMember, port: int = 0):
    service = ControlService(member, SECRET, "test", random_bytes=random.Random(11).randbytes)
    server = await listen_links("127.0.0.1", port, service.serve, framing=LINK_FRAMING)
    return service, server, server.sockets[0].getsockname()[1]


def dialer(port: int):
    async def dial():
        return await connect_link("127.0.0.1", port, timeout_s=2.0, framing=LINK_FRAMING)
    return dial


async def read_frame(reader: asyncio.StreamReader, key: bytes | None = None, role: str = "") -> p.Frame:
    header = await reader.readexactly(p.HEADER_BYTES)
    rest = await reader.readexactly(p.rest_length(header))
    return cp.decode(header + rest, key=key, role=role)


async def raw_handshake(reader, writer, rng) -> tuple[bytes, list[bytes]]:
    """The master's side by hand: the session key and the bytes it sent."""
    sent = [cp.encode(cp.ControlHello(version=cp.CONTROL_VERSION, session_id="test", name="raw"))]
    writer.write(sent[-1])
    challenge = await read_frame(reader)
    nonce = rng(32)
    from firmware.link_handshake import auth_mac

    sent.append(cp.encode(p.AuthResponse(mac=auth_mac(SECRET, cp.MASTER, challenge.nonce, "test"), challenge=nonce)))
    writer.write(sent[-1])
    assert isinstance(await read_frame(reader), p.AuthResponse)
    return cp.session_key(SECRET, nonce, challenge.nonce, "test"), sent


def test_calls_over_tcp_and_a_restarted_subordinate_is_reconnected():
    async def main():
        member = FakeMember()
        service, server, port = await serve(member)
        events = EventBus()
        seen = changes(events, "member")
        remote = ControlRemote("sub1", dialer(port), SECRET, session_id="test",
                               random_bytes=random.Random(1).randbytes, backoff_s=(0.02, 0.2), events=events)
        assert (await remote.hello("test")).committed_seq == 7
        for step in ("start", "run", "drain", "prepare", "commit"):
            await getattr(remote, step)(1)
        assert member.calls[-1] == ("commit", 1)

        # The subordinate goes away: calls fail at once, then it comes back on the same port.
        server.close()
        await service.close()
        await server.wait_closed()
        await until(lambda: not remote.link_up)
        with pytest.raises(ConnectionError):
            await remote.start(2)
        service, server, _ = await serve(member, port)
        await until(lambda: remote.link_up, 10.0)
        await remote.start(3)
        assert seen == ["up", "down", "up"]
        await remote.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_raw_socket_replaying_a_sealed_frame_is_refused_and_closed():
    async def main():
        member = FakeMember()
        service, server, port = await serve(member)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key, _ = await raw_handshake(reader, writer, random.Random(2).randbytes)
        start = cp.encode(cp.MemberStart(seq=1, cg_seq=5), key=key, role=cp.MASTER)
        writer.write(start)
        ack = await read_frame(reader, key, cp.SUBORDINATE)
        assert isinstance(ack, cp.MemberAck) and ack.acked == 1 and ack.status == p.AckStatus.OK
        writer.write(start)  # the same bytes again
        error = await read_frame(reader, key, cp.SUBORDINATE)
        assert isinstance(error, p.Error) and "replayed" in error.message
        assert await reader.read() == b""  # closed
        await until(lambda: len(member.calls) == 2)
        assert member.calls == [("start", 5), ("fail", 5, "the master's control link went down")]
        assert "replayed" in service.rejected[-1]
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_recorded_handshake_replayed_on_a_new_connection_is_refused():
    async def main():
        member = FakeMember()
        service, server, port = await serve(member)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, recorded = await raw_handshake(reader, writer, random.Random(3).randbytes)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(recorded[0])
        assert isinstance(await read_frame(reader), p.AuthChallenge)  # a fresh nonce
        writer.write(recorded[1])  # answers the old one
        error = await read_frame(reader)
        assert isinstance(error, p.Error) and error.code == p.ErrorCode.AUTH
        assert await reader.read() == b""
        assert member.calls == [] and "authentication failed" in service.rejected[-1]
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_open_master_over_tcp_with_the_wrong_secret_is_refused():
    async def main():
        member = FakeMember()
        service, server, port = await serve(member)
        link = await dialer(port)()
        with pytest.raises(ConnectionError, match="authentication failed"):
            await open_master(link, b"not the secret", "test", "m", random.Random(4).randbytes)
        await link.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
