"""The session control link in one process: frames and their seal, the
handshake, ControlRemote -> ControlService -> a fake MemberPort over an
in-memory Link, and a tap between the two ends that replays, reorders and
rewrites frames (each refused, with a log line, and the connection closed)."""

from __future__ import annotations

import asyncio
import logging
import random
import re

import crc32c
import pytest

from drivers import memlink
from drivers.memlink import MemLink
from firmware import control_protocol as cp
from firmware import protocol as p
from firmware.control_channel import ControlRefused, accept_subordinate, open_master
from firmware.control_remote import ControlRemote
from firmware.control_service import MASTER_GONE, ControlService
from firmware.events import EventBus
from firmware.link_handshake import auth_mac
from firmware.member import MemberError, MemberPort, MemberState
from hal.link import Link, LinkDown

pytestmark = pytest.mark.timeout(30)

SECRET = b"the session's shared secret"
KEY = bytes(range(32))


def mem_pair(n: int) -> tuple[MemLink, MemLink]:
    return memlink.mem_pair(f"master#{n}", f"subordinate#{n}")


class FakeMember(MemberPort):
    """Records each call; ``raises`` names a method that fails, ``blocks`` one
    that waits until its event is set."""

    def __init__(self, name: str = "sub1") -> None:
        self.name = name
        self.calls: list[tuple] = []
        self.raises: dict[str, Exception] = {}
        self.blocks: dict[str, asyncio.Event] = {}

    async def _note(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name in self.blocks:
            await self.blocks[name].wait()
        if name in self.raises:
            raise self.raises[name]

    def state(self) -> MemberState:
        return MemberState(name=self.name, session_id="test", copy_state="duplex", phase="idle", link="up",
                           committed_seq=7, oos_tracks=3, cr_tracks=1, held_ack_ms={"p50": 0.5, "max": 2.0},
                           last_cg_time=12.5, cg_seq=8, in_doubt_seq=8)

    async def hello(self, session_id):
        await self._note("hello", session_id)
        return self.state()

    async def status(self):
        await self._note("status")
        return self.state()

    async def start(self, seq):
        await self._note("start", seq)

    async def run(self, seq):
        await self._note("run", seq)

    async def drain(self, seq):
        await self._note("drain", seq)

    async def prepare(self, seq):
        await self._note("prepare", seq)

    async def commit(self, seq):
        await self._note("commit", seq)

    async def fail(self, seq, reason):
        await self._note("fail", seq, reason)


class Session:
    """A ControlService in front of a FakeMember, and ControlRemotes that dial it."""

    def __init__(self, secret: bytes = SECRET) -> None:
        self.member = FakeMember()
        self.service_events = EventBus()
        self.service = ControlService(self.member, secret, "test", random_bytes=random.Random(7).randbytes,
                                      events=self.service_events)
        self.links: list[MemLink] = []  # the master's ends, newest last
        self.serving: list[asyncio.Task] = []
        self.tap = None
        self.master_side = changes(self.service_events, "master")

    async def dial(self) -> Link:
        mine, theirs = mem_pair(len(self.links))
        mine.tap = self.tap
        self.links.append(mine)
        self.serving.append(asyncio.ensure_future(self.service.serve(theirs)))
        return mine

    def remote(self, secret: bytes = SECRET, **kw) -> tuple[ControlRemote, list[str]]:
        events = EventBus()
        kw.setdefault("backoff_s", (0.01, 0.05))
        remote = ControlRemote("sub1", self.dial, secret, session_id=kw.pop("session_id", "test"),
                               random_bytes=random.Random(len(self.links)).randbytes, events=events, **kw)
        return remote, changes(events, "member")

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        await asyncio.gather(*self.serving)


def changes(events: EventBus, obj: str) -> list[str]:
    seen: list[str] = []
    events.subscribe(lambda e: seen.append(e.fields["link"]) if (e.action, e.obj) == ("change", obj) else None)
    return seen


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


# -- frames -------------------------------------------------------------------------

EVERY_FRAME = [
    cp.ControlHello(seq=0, version=cp.CONTROL_VERSION, session_id="s", name="master"),
    p.AuthChallenge(nonce=b"n" * 32),
    p.AuthResponse(mac=b"m" * 32, challenge=b"c" * 32),
    p.Error(code=p.ErrorCode.AUTH, message="no"),
    cp.MemberHello(seq=1, session_id="s"),
    cp.MemberStatus(seq=2),
    cp.MemberStart(seq=3, cg_seq=10),
    cp.MemberRun(seq=4, cg_seq=10),
    cp.MemberDrain(seq=5, cg_seq=10),
    cp.MemberPrepare(seq=6, cg_seq=10),
    cp.MemberCommit(seq=7, cg_seq=10),
    cp.MemberFail(seq=8, cg_seq=10, reason="member sub2 timed out"),
    cp.MemberAck(seq=9, acked=3, status=p.AckStatus.REFUSED, message="not idle"),
    cp.MemberReport(seq=10, acked=2, state=FakeMember().state()),
    cp.MemberReport(seq=11, acked=2, state=MemberState(name="x", session_id="s")),
]


@pytest.mark.parametrize("frame", EVERY_FRAME, ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_every_frame_round_trips_plain_and_sealed(frame, key):
    raw = cp.encode(frame, key=key, role=cp.MASTER)
    assert p.rest_length(raw[: p.HEADER_BYTES]) == len(raw) - p.HEADER_BYTES  # the TCP driver's framing
    assert cp.decode(raw, key=key, role=cp.MASTER) == frame


def test_a_sealed_frame_matches_a_hand_made_fixture():
    raw = cp.encode(cp.MemberStart(seq=5, cg_seq=258), key=KEY, role=cp.MASTER)
    header = b"MFWL" + bytes([p.PROTOCOL_VERSION, 42]) + b"\0\0" + (5).to_bytes(8, "big") + (8 + 32).to_bytes(4, "big")
    fields = (258).to_bytes(8, "big")
    import hashlib
    import hmac
    mac = hmac.new(KEY, b"master\0" + (5).to_bytes(8, "big") + header + fields, hashlib.sha256).digest()
    crc = crc32c.crc32c(header + fields + mac).to_bytes(4, "big")
    assert raw == header + fields + mac + crc


def test_the_session_key_is_rfc5869_hkdf():
    # RFC 5869 test case 1, first 32 bytes of OKM (HKDF-SHA256).
    import hashlib
    import hmac
    prk = hmac.new(bytes(range(13)), b"\x0b" * 22, hashlib.sha256).digest()
    okm = hmac.new(prk, bytes(range(0xF0, 0xFA)) + b"\x01", hashlib.sha256).digest()
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
    # session_key is the same construction with the nonces as the salt.
    a = cp.session_key(SECRET, b"m" * 32, b"s" * 32, "test")
    info = b"mirrorfw-control-v1 session key\0test\x01"
    prk = hmac.new(b"m" * 32 + b"s" * 32, SECRET, hashlib.sha256).digest()
    assert a == hmac.new(prk, info, hashlib.sha256).digest()
    assert a != cp.session_key(SECRET, b"m" * 32, b"t" * 32, "test")
    assert a != cp.session_key(SECRET, b"m" * 32, b"s" * 32, "other")


@pytest.mark.parametrize("how", ["other key", "other role", "unsealed", "rewritten seq", "rewritten body"])
def test_a_sealed_frame_that_was_tampered_with_is_refused(how):
    frame = cp.MemberCommit(seq=4, cg_seq=9)
    if how == "other key":
        raw = cp.encode(frame, key=bytes(32), role=cp.MASTER)
    elif how == "other role":  # a frame reflected back at its sender
        raw = cp.encode(frame, key=KEY, role=cp.SUBORDINATE)
    elif how == "unsealed":
        raw = cp.encode(frame)
    else:
        raw = bytearray(cp.encode(frame, key=KEY, role=cp.MASTER))
        at = 15 if how == "rewritten seq" else p.HEADER_BYTES + 7
        raw[at] ^= 1
        raw[-4:] = crc32c.crc32c(bytes(raw[:-4])).to_bytes(4, "big")  # an attacker fixes the CRC
        raw = bytes(raw)
    with pytest.raises(cp.BadMac):
        cp.decode(raw, key=KEY, role=cp.MASTER)


def test_a_data_link_frame_is_not_a_control_frame():
    with pytest.raises(p.BadKind):
        cp.decode(p.encode(p.Commit(seq=1, cg_seq=2)))
    with pytest.raises(p.BadKind):
        cp.encode(p.Commit(seq=1, cg_seq=2))


# -- calls ---------------------------------------------------------------------------


def test_every_call_reaches_its_member_method_and_answers():
    async def main():
        s = Session()
        remote, _ = s.remote()
        state = await remote.hello("test")
        assert state == s.member.state()
        await remote.start(5)
        await remote.run(5)
        await remote.drain(5)
        await remote.prepare(5)
        await remote.commit(5)
        await remote.fail(6, "sub2 unreachable")
        assert await remote.status() == s.member.state()
        assert s.member.calls == [("hello", "test"), ("start", 5), ("run", 5), ("drain", 5), ("prepare", 5),
                                  ("commit", 5), ("fail", 6, "sub2 unreachable"), ("status",)]
        await remote.close()
        await s.close()

    asyncio.run(main())


@pytest.mark.parametrize("error, word", [(MemberError("not in a CG"), "refused"),
                                         (OSError(5, "device error"), "failed")], ids=["refused", "failed"])
def test_a_refusing_or_failing_member_raises_member_error_and_the_link_stays(error, word):
    async def main():
        s = Session()
        remote, _ = s.remote()
        await remote.hello("test")
        s.member.raises["start"] = error
        with pytest.raises(MemberError, match=f"sub1 {word} MEMBER_START: .*{re.escape(str(error))}"):
            await remote.start(3)
        s.member.raises.clear()
        await remote.start(4)
        assert remote.link_up and s.service.link_up
        await remote.close()
        await s.close()

    asyncio.run(main())


def test_a_call_times_out_and_the_next_one_works():
    async def main():
        s = Session()
        remote, _ = s.remote(call_timeout_s=0.1)
        await remote.hello("test")
        s.member.blocks["start"] = asyncio.Event()
        with pytest.raises(TimeoutError, match="MEMBER_START"):
            await remote.start(1)
        assert remote.stats["timeouts"] == 1 and remote.link_up
        s.member.blocks["start"].set()  # its late reply is dropped quietly
        await remote.fail(1, "timed out")
        assert s.member.calls[-1] == ("fail", 1, "timed out")
        await remote.close()
        await s.close()

    asyncio.run(main())


def test_status_is_answered_while_a_drain_runs():
    async def main():
        s = Session()
        remote, _ = s.remote()
        await remote.hello("test")
        s.member.blocks["drain"] = asyncio.Event()
        drain = asyncio.ensure_future(remote.drain(2))
        await until(lambda: ("drain", 2) in s.member.calls)
        assert (await remote.status()).committed_seq == 7
        assert not drain.done()
        s.member.blocks["drain"].set()
        await drain
        await remote.close()
        await s.close()

    asyncio.run(main())


# -- link state, reconnect ----------------------------------------------------------------


def test_each_side_says_up_and_down_once_per_change_and_a_drop_fails_fast_then_reconnects():
    async def main():
        s = Session()
        remote, master_side = s.remote()
        await remote.connect()
        assert remote.link_up and s.service.link_up
        assert master_side == ["up"] and s.master_side == ["up"]
        await s.links[-1].close()
        await until(lambda: master_side[-1:] == ["down"] and s.master_side == ["up", "down"])
        # A member that is down is not waited for: the CG fails at once.
        if not remote.link_up:
            with pytest.raises(ConnectionError, match="sub1"):
                await remote.start(9)
        await until(lambda: remote.link_up and s.service.link_up)
        assert master_side == ["up", "down", "up"] and s.master_side == ["up", "down", "up"]
        await remote.start(10)
        await remote.close()
        await until(lambda: not s.service.link_up)
        assert master_side == ["up", "down", "up", "down"]
        assert s.master_side == ["up", "down", "up", "down"]
        await s.close()

    asyncio.run(main())


def test_an_unreachable_member_raises_connection_error_and_is_retried_with_backoff():
    async def main():
        s = Session()
        attempts = []

        async def nobody() -> Link:
            attempts.append(asyncio.get_running_loop().time())
            if len(attempts) < 4:
                raise LinkDown("connection refused")
            return await s.dial()

        events = EventBus()
        seen = changes(events, "member")
        remote = ControlRemote("sub1", nobody, SECRET, session_id="test", random_bytes=random.Random(1).randbytes,
                               backoff_s=(0.02, 0.5), events=events)
        with pytest.raises(ConnectionError, match="connection refused"):
            await remote.hello("test")
        with pytest.raises(ConnectionError, match="sub1 unreachable"):
            await remote.start(1)
        await until(lambda: remote.link_up)
        gaps = [b - a for a, b in zip(attempts[1:], attempts[2:], strict=False)]
        assert len(attempts) == 4 and gaps[1] > gaps[0] * 1.5  # backoff grows
        assert seen == ["up"]
        await remote.start(2)
        await remote.close()
        await s.close()

    asyncio.run(main())


def test_a_new_master_link_replaces_the_old_one_down_then_up():
    async def main():
        s = Session()
        first, first_side = s.remote(backoff_s=(60.0, 60.0))
        await first.connect()
        second, _ = s.remote()
        await second.connect()
        await until(lambda: first_side == ["up", "down"])
        assert s.master_side == ["up", "down", "up"]
        await second.start(1)
        await first.close()
        await second.close()
        await s.close()

    asyncio.run(main())


@pytest.mark.parametrize("last, failed", [("start", True), ("run", True), ("drain", True),
                                          ("prepare", False), ("commit", False)])
def test_a_cg_the_master_left_before_prepare_is_failed_at_the_subordinate(last, failed):
    async def main():
        s = Session()
        remote, _ = s.remote(backoff_s=(60.0, 60.0))
        await remote.hello("test")
        for step in ("start", "run", "drain", "prepare", "commit"):
            await getattr(remote, step)(4)
            if step == last:
                break
        await s.links[-1].close()
        await until(lambda: not s.service.link_up)
        await asyncio.gather(*s.serving)
        assert (("fail", 4, MASTER_GONE) in s.member.calls) == failed
        await remote.close()
        await s.close()

    asyncio.run(main())


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["wrong secret", "other session"])
def test_a_refused_pairing_changes_no_link_state(case):
    async def main():
        s = Session()
        kw = {"session_id": "other"} if case == "other session" else {}
        remote, seen = s.remote(secret=b"wrong" if case == "wrong secret" else SECRET, **kw)
        with pytest.raises(ControlRefused):
            await remote.hello("test")
        await remote.close()
        await s.close()
        assert seen == [] and s.master_side == [] and s.member.calls == []
        assert ("authentication failed" if case == "wrong secret" else "session 'other'") in s.service.rejected[0]

    asyncio.run(main())


def test_a_subordinate_with_another_secret_is_refused_by_the_master():
    async def main():
        s = Session(secret=b"another secret")
        link = await s.dial()
        with pytest.raises(ControlRefused, match="refused the control link"):
            await open_master(link, SECRET, "test", "master", random.Random(1).randbytes)
        await s.close()

    asyncio.run(main())


def test_a_replayed_handshake_is_refused_because_the_nonce_is_fresh():
    async def main():
        s = Session()
        remote, _ = s.remote()
        await remote.hello("test")
        recorded = list(s.links[-1].sent[:2])  # the master's CONTROL_HELLO and AUTH_RESPONSE
        await remote.close()
        link = await s.dial()
        for raw in recorded:
            await link.send(raw)
        reply = [cp.decode(await link.recv()) for _ in range(2)]
        assert isinstance(reply[0], p.AuthChallenge) and isinstance(reply[1], p.Error)
        assert reply[1].code == p.ErrorCode.AUTH
        await until(lambda: len(s.service.rejected) == 1)
        assert "authentication failed" in s.service.rejected[0]
        assert s.member.calls == [("hello", "test")]
        await s.close()

    asyncio.run(main())


def tamper(how: str):
    """A tap on the master's end that spoils its third sealed frame."""
    count = 0
    held: list[bytes] = []

    def tap(raw: bytes) -> list[bytes]:
        nonlocal count
        frame_seq = int.from_bytes(raw[8:16], "big")
        is_sealed = raw[5] >= 40
        if not is_sealed:
            return [raw]
        count += 1
        if how == "replay" and count == 3:
            return [raw, raw]
        if how == "reorder" and count == 3:
            held.append(raw)
            return []
        if how == "reorder" and count == 4:
            return [raw, held.pop()]
        if how == "rewrite" and count == 3:
            spoiled = bytearray(raw)
            spoiled[p.HEADER_BYTES + 7] ^= 0x01  # cg_seq 3 becomes 2
            spoiled[-4:] = crc32c.crc32c(bytes(spoiled[:-4])).to_bytes(4, "big")
            return [bytes(spoiled)]
        assert frame_seq == count
        return [raw]

    return tap


@pytest.mark.parametrize("how, message", [("replay", "seq 3 where 4 was due: replayed"),
                                          ("reorder", "seq 4 where 3 was due: out of order"),
                                          ("rewrite", "MAC mismatch")])
def test_a_replayed_reordered_or_rewritten_frame_is_refused_and_the_link_closed(how, message, caplog):
    async def main():
        s = Session()
        s.tap = tamper(how)
        remote, master_side = s.remote(backoff_s=(60.0, 60.0), call_timeout_s=1.0)
        await remote.hello("test")  # sealed frame 1
        await remote.start(2)  # 2
        # 3 is spoiled (for the reorder: held until 4 is sent, then sent after it).
        results = await asyncio.gather(remote.start(3), remote.run(3), return_exceptions=True)
        assert any(isinstance(r, ConnectionError) for r in results), results
        await until(lambda: not s.service.link_up and not remote.link_up)
        assert message in s.service.rejected[-1]
        assert s.master_side == ["up", "down"] and master_side == ["up", "down"]
        # Only frames that passed reached the member: a replay's first copy, nothing spoiled.
        legit = [("hello", "test"), ("start", 2)] + ([("start", 3)] if how == "replay" else [])
        assert s.member.calls[: len(legit)] == legit
        assert s.member.calls[len(legit):] in ([], [("fail", 3 if how == "replay" else 2, MASTER_GONE)])
        await remote.close()
        await s.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert any(message in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


def test_a_frame_replayed_by_the_subordinate_is_refused_by_the_master():
    async def main():
        s = Session()
        remote, master_side = s.remote(backoff_s=(60.0, 60.0))
        await remote.hello("test")
        sub_end = s.links[-1].other
        first_reply = [raw for raw in sub_end.sent if raw[5] >= 40][0]
        await sub_end.send(first_reply)  # replay the hello's reply
        await until(lambda: not remote.link_up)
        assert "replayed" in remote.last_error and master_side == ["up", "down"]
        await remote.close()
        await s.close()

    asyncio.run(main())


def test_a_session_key_from_one_connection_is_worthless_on_the_next():
    async def main():
        s = Session()
        rng = random.Random(5).randbytes
        link = await s.dial()
        channel = await open_master(link, SECRET, "test", "master", rng)
        await channel.send(cp.MemberStatus())
        assert isinstance(await channel.recv(), cp.MemberReport)
        frame = link.sent[-1]  # a sealed STATUS request from connection 1
        link2 = await s.dial()
        channel2 = await open_master(link2, SECRET, "test", "master", rng)
        await link2.send(frame)  # seq 1 is due there, but the key is not this connection's
        await until(lambda: len(s.service.rejected) == 1)
        assert "MAC mismatch" in s.service.rejected[0]
        await channel.close()
        await channel2.close()
        await s.close()

    asyncio.run(main())


def test_the_handshake_is_mutual_by_hand():
    async def main():
        a, b = mem_pair(0)
        sub = asyncio.ensure_future(accept_subordinate(b, SECRET, "test", random.Random(2).randbytes))
        master = await open_master(a, SECRET, "test", "m1", random.Random(3).randbytes)
        subordinate = await sub
        assert subordinate.peer_name == "m1"
        await master.send(cp.MemberStart(cg_seq=8))
        got = await subordinate.recv()
        assert got == cp.MemberStart(seq=1, cg_seq=8)
        # A data link response does not pass for a control one (the roles differ).
        assert auth_mac(SECRET, "primary", b"n" * 32, "test") != auth_mac(SECRET, cp.MASTER, b"n" * 32, "test")

    asyncio.run(main())


def test_the_members_own_master_lost_and_joined_are_called():
    class Member(FakeMember):
        def master_lost(self, reason):
            self.calls.append(("master_lost", reason))

        def master_joined(self, master):
            self.calls.append(("master_joined", master))

    async def main():
        s = Session()
        s.member = Member()
        s.service = ControlService(s.member, SECRET, "test", random_bytes=random.Random(7).randbytes)
        remote, _ = s.remote(backoff_s=(60.0, 60.0))
        await remote.hello("test")
        await remote.start(4)
        await s.links[-1].close()
        await asyncio.gather(*s.serving)
        names = [c[0] for c in s.member.calls]
        assert s.member.calls[0][0] == "master_joined" and s.member.calls[0][1].startswith("master@")
        # its own word first, then the CG left before prepare is failed through the port
        assert names[-2:] == ["master_lost", "fail"] and s.member.calls[-2][1] == MASTER_GONE
        await remote.close()
        await s.close()

    asyncio.run(main())
