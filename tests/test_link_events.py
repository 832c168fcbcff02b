"""Who says the link is up: LinkRemote on the primary's side and
ReplicationService on the secondary's, each once per real change; and the
service's dispatch of request frames to a typed SecondaryPort.

In one process, over an in-memory Link pair, against a fake secondary whose
methods are coroutines like the real one's."""

from __future__ import annotations

import asyncio
import random

import pytest

from drivers import memlink
from drivers.memlink import MemLink
from firmware import protocol as p
from firmware.events import EventBus
from firmware.link_handshake import auth_mac
from firmware.link_primary import LinkRemote
from firmware.link_secondary import ReplicationService
from firmware.remote import RemoteError, RemotePort, RemoteState, SecondaryPort, VolumeGeometry
from hal.link import Link, LinkDown

pytestmark = pytest.mark.timeout(30)

SECRET = b"correct horse battery staple"
GEOMETRY = [VolumeGeometry("vol0", 1 << 20, 65536), VolumeGeometry("vol1", 1 << 19, 65536)]


def mem_pair(n: int) -> tuple[MemLink, MemLink]:
    return memlink.mem_pair(f"primary#{n}", f"secondary#{n}")


class FakeSecondary:
    """A SecondaryPort that records every call; ``raises`` names a method
    that fails with the given exception."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.raises: dict[str, Exception] = {}

    def _note(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name in self.raises:
            raise self.raises[name]

    async def hello(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        self._note("hello", session_id)
        return RemoteState(session_id=session_id, committed_cg=0, new=False, volumes=list(volumes))

    async def receive_track(self, volume: str, track: int, cg_seq: int, data: bytes) -> None:
        await asyncio.sleep(0)
        self._note("receive_track", volume, track, cg_seq, data)

    async def sync(self, cg_seq: int) -> None:
        self._note("sync", cg_seq)

    async def drain_done(self, cg_seq: int) -> None:
        self._note("drain_done", cg_seq)

    async def prepare(self, cg_seq: int) -> None:
        self._note("prepare", cg_seq)

    async def commit(self, cg_seq: int) -> None:
        self._note("commit", cg_seq)

    async def abort(self, cg_seq: int) -> None:
        self._note("abort", cg_seq)


class Pair:
    """A ReplicationService in front of a FakeSecondary, and a way to dial it."""

    def __init__(self) -> None:
        self.secondary = FakeSecondary()
        port: SecondaryPort = self.secondary
        self.service_events = EventBus()
        self.service = ReplicationService(port, SECRET, "test", random_bytes=random.Random(7).randbytes,
                                          events=self.service_events)
        self.links: list[MemLink] = []  # the primary's ends, newest last
        self.serving: list[asyncio.Task] = []
        self.service_changes = changes(self.service_events)

    async def dial(self) -> Link:
        mine, theirs = mem_pair(len(self.links))
        self.links.append(mine)
        self.serving.append(asyncio.ensure_future(self.service.serve(theirs)))
        return mine

    def remote(self, **kw) -> tuple[LinkRemote, list[str]]:
        events = EventBus()
        kw.setdefault("backoff_s", (0.01, 0.05))
        remote = LinkRemote(self.dial, SECRET, random_bytes=random.Random(3).randbytes, events=events, **kw)
        return remote, changes(events)

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        await asyncio.gather(*self.serving)


def changes(events: EventBus) -> list[str]:
    """The link states the bus announces, in order."""
    seen: list[str] = []
    events.subscribe(lambda e: seen.append(e.fields["state"]) if (e.action, e.obj) == ("change", "link") else None)
    return seen


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


async def one_cg(remote: LinkRemote, cg: int) -> None:
    await remote.send_track("vol0", 1, cg, b"x" * 512)
    for step in (remote.drain_done, remote.prepare, remote.commit):
        await step(cg)


def test_each_side_says_up_and_down_once_per_change_over_connect_drop_reconnect():
    async def main():
        pair = Pair()
        remote, primary_side = pair.remote()
        assert not remote.link_up
        await remote.connect("test", GEOMETRY)
        assert remote.link_up and pair.service.link_up
        assert primary_side == ["up"] and pair.service_changes == ["up"]

        await one_cg(remote, 1)
        await pair.links[-1].close()  # the connection breaks under both
        await until(lambda: primary_side == ["up", "down"] and pair.service_changes == ["up", "down"])

        # The background reconnect pairs again: down then up, once each.
        await until(lambda: remote.link_up)
        await until(lambda: pair.service.link_up)
        assert primary_side == ["up", "down", "up"]
        assert pair.service_changes == ["up", "down", "up"]
        await one_cg(remote, 2)

        # Another drop, this time noticed first by a call in flight.
        await pair.links[-1].close()
        with pytest.raises(LinkDown):
            await remote.send_track("vol0", 2, 3, b"y" * 512)
        await until(lambda: remote.link_up and pair.service.link_up)
        await one_cg(remote, 3)

        await remote.close()
        await until(lambda: not pair.service.link_up)
        assert not remote.link_up
        assert primary_side == ["up", "down", "up", "down", "up", "down"]
        assert pair.service_changes == ["up", "down", "up", "down", "up", "down"]
        assert len(pair.links) == 3 and remote.stats["handshakes"] == 3
        await pair.close()

    asyncio.run(main())


def test_a_new_hello_on_a_live_link_is_down_then_up():
    async def main():
        pair = Pair()
        remote, primary_side = pair.remote()
        await remote.connect("test", GEOMETRY)
        await remote.connect("test", GEOMETRY[:1])  # new geometry: pair again
        await until(lambda: pair.service_changes == ["up", "down", "up"])
        assert primary_side == ["up", "down", "up"]
        await remote.close()
        await pair.close()

    asyncio.run(main())


def test_a_link_that_replaces_a_live_one_is_down_then_up_at_the_service():
    async def main():
        pair = Pair()
        first, first_side = pair.remote(backoff_s=(60.0, 60.0))  # it must not come back during the test
        await first.connect("test", GEOMETRY)
        second, second_side = pair.remote()
        await second.connect("test", GEOMETRY)
        await until(lambda: first_side == ["up", "down"])
        assert pair.service_changes == ["up", "down", "up"]
        assert second_side == ["up"] and second.link_up and not first.link_up
        await one_cg(second, 1)
        await first.close()
        await second.close()
        await until(lambda: pair.service_changes == ["up", "down", "up", "down"])
        await pair.close()

    asyncio.run(main())


def test_a_refused_peer_changes_no_link_state():
    async def main():
        pair = Pair()
        events = EventBus()
        remote = LinkRemote(pair.dial, b"wrong secret", random_bytes=random.Random(3).randbytes, events=events)
        seen = changes(events)
        with pytest.raises(RemoteError):
            await remote.connect("test", GEOMETRY)
        await remote.close()
        await pair.close()
        assert seen == [] and pair.service_changes == []
        assert pair.service.rejected

    asyncio.run(main())


def test_every_request_frame_reaches_its_secondary_method():
    async def main():
        pair = Pair()
        remote, _ = pair.remote()
        await remote.connect("test", GEOMETRY)
        await remote.send_track("vol1", 7, 4, b"z" * 100)
        await remote.drain_done(4)
        await remote.prepare(4)
        await remote.commit(4)
        await remote.abort(5)
        assert pair.secondary.calls == [
            ("hello", "test"),
            ("receive_track", "vol1", 7, 4, b"z" * 100),
            ("drain_done", 4),
            ("prepare", 4),
            ("commit", 4),
            ("abort", 5),
        ]
        assert pair.service.stats["data_frames"] == 1 and pair.service.stats["data_bytes"] == 100
        await remote.close()
        await pair.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", ["receive_track", "drain_done", "prepare", "commit", "abort"])
@pytest.mark.parametrize("error, status", [(RemoteError("not now"), p.AckStatus.REFUSED),
                                           (OSError(5, "device error"), p.AckStatus.FAILED)],
                         ids=["refused", "failed"])
def test_a_failing_secondary_call_is_answered_and_the_link_stays(method, error, status):
    async def main():
        pair = Pair()
        pair.secondary.raises[method] = error
        link = await pair.dial()
        # The handshake by hand, so the raw ACK can be read.
        await link.send(p.encode(p.Hello(seq=1, version=p.PROTOCOL_VERSION, session_id="test",
                                         volumes=[(v.name, v.size_bytes, v.track_bytes) for v in GEOMETRY])))
        challenge = p.decode(await link.recv())
        nonce = b"n" * 32
        await link.send(p.encode(p.AuthResponse(seq=2, mac=auth_mac(SECRET, "primary", challenge.nonce, "test"),
                                                challenge=nonce)))
        assert isinstance(p.decode(await link.recv()), p.AuthResponse)
        # From here on sealed, each side numbering its frames from 1.
        sealing = p.Sealing.derive(SECRET, nonce, challenge.nonce, "test", "primary", "secondary")
        assert isinstance(sealing.open(await link.recv()), p.Status)
        request = {
            "receive_track": p.Data(seq=1, volume=0, track=1, cg_seq=2, payload=b"d"),
            "drain_done": p.DrainDone(seq=1, cg_seq=2),
            "prepare": p.Prepare(seq=1, cg_seq=2),
            "commit": p.Commit(seq=1, cg_seq=2),
            "abort": p.Abort(seq=1, cg_seq=2),
        }[method]
        await link.send(sealing.seal(request))
        ack = sealing.open(await link.recv())
        assert isinstance(ack, p.Ack) and ack.acked == 1 and ack.status == status
        assert str(error) in ack.message
        assert pair.secondary.calls[-1][0] == method
        # The link is still served: the next request is answered OK.
        pair.secondary.raises.clear()
        await link.send(sealing.seal(p.Commit(seq=2, cg_seq=9)))
        ack = sealing.open(await link.recv())
        assert ack.acked == 2 and ack.status == p.AckStatus.OK
        assert pair.service.link_up
        await pair.close()

    asyncio.run(main())


def test_a_handshake_frame_after_the_handshake_is_refused_and_closes_the_link():
    async def main():
        pair = Pair()
        remote, _ = pair.remote(backoff_s=(60.0, 60.0))
        await remote.connect("test", GEOMETRY)
        # Unsealed, as a stranger would send it: refused before it is parsed.
        await pair.links[-1].send(p.encode(p.Hello(seq=99, version=p.PROTOCOL_VERSION, session_id="test")))
        await until(lambda: not pair.service.link_up)
        assert "HELLO seq 99: not sealed" in pair.service.rejected[-1]
        assert pair.service_changes == ["up", "down"]
        await remote.close()
        await pair.close()

    asyncio.run(main())


def test_an_in_process_remote_is_up_by_default():
    class InProcess(RemotePort):
        async def connect(self, session_id, volumes, generation=0):
            raise NotImplementedError

        async def send_track(self, volume, track, cg_seq, data): ...
        async def sync(self, cg_seq): ...
        async def drain_done(self, cg_seq): ...
        async def prepare(self, cg_seq): ...
        async def commit(self, cg_seq): ...
        async def abort(self, cg_seq): ...

    assert InProcess().link_up is True
