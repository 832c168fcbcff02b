"""The replication link end to end, in one process over real TCP on 127.0.0.1:
LinkRemote (the primary's side) against ReplicationService in front of a
real Secondary on mem:// B and C volumes, with faults injected by
FaultyLink. Refused peers leave B and C untouched; a link dropped
mid-drain fails the CG and the resync sends only OOS ∪ CR."""

from __future__ import annotations

import asyncio
import random
import struct

import crc32c
import pytest

from drivers import open_device, open_nvram
from firmware import primary as primary_mod
from firmware import protocol as p
from firmware import secondary as secondary_mod
from firmware.events import EventBus
from firmware.link_primary import HandshakeRefused, LinkRemote
from firmware.link_secondary import ReplicationService
from firmware.remote import VolumeGeometry
from hal.link import LinkDown
from harness.controller import connect_replication_link, listen_replication_links
from harness.faults import DeviceFaultPlan, FaultyDevice, FaultyLink, LinkFaultPlan

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple"
TRACK = 65536
SIZE = 16 * TRACK
GEOMETRY = [VolumeGeometry("vol0", SIZE, TRACK), VolumeGeometry("vol1", SIZE // 2, TRACK)]


def is_data(frame: bytes) -> bool:
    return len(frame) > 5 and frame[5] == p.Kind.DATA


class Site:
    """A secondary behind a ReplicationService, listening on 127.0.0.1:0."""

    def __init__(self, tmp_path, *, session_id="test", geometry=GEOMETRY) -> None:
        self.devices = {
            v.name: (open_device(f"mem://?size={v.size_bytes}"), open_device(f"mem://?size={v.size_bytes}"))
            for v in geometry
        }
        self.nvram = open_nvram(f"nvram://{tmp_path}/s-{id(self)}.nvram?size=16MiB")
        self.events = EventBus()  # one bus for the secondary and its service, as the controller wires them
        self.secondary = secondary_mod.Secondary(self.devices, self.nvram, _clock(), session_id=session_id,
                                                 events=self.events)
        self.session_id = session_id

    async def start(self, secret=SECRET):
        await self.secondary.open(format=True)
        self.service = ReplicationService(self.secondary, secret, self.session_id,
                                          random_bytes=random.Random(7).randbytes, events=self.events)
        self.server = await listen_replication_links("127.0.0.1", 0, self.service.serve)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def image(self) -> bytes:
        """Every byte of every B and C, to prove nothing changed."""
        out = b""
        for b, c in self.devices.values():
            out += await b.read(0, b.info.num_blocks) + await c.read(0, c.info.num_blocks)
        return out

    def remote(self, *, secret=SECRET, plan: LinkFaultPlan | None = None, **kw) -> LinkRemote:
        async def factory():
            link = await connect_replication_link("127.0.0.1", self.port, timeout_s=2)
            return FaultyLink(link, plan) if plan is not None else link

        kw.setdefault("backoff_s", (0.01, 0.05))
        return LinkRemote(factory, secret, random_bytes=random.Random(3).randbytes, **kw)

    async def close(self):
        self.server.close()
        await self.server.wait_closed()
        await self.secondary.close()
        self.nvram.close()


def _clock():
    from hal.clock import AsyncioClock

    return AsyncioClock()


def pattern(volume: int, track: int, cg: int) -> bytes:
    return bytes([(volume * 31 + track * 7 + cg) % 251 or 1]) * TRACK


async def send_cg(remote: LinkRemote, cg: int, tracks) -> None:
    await asyncio.gather(*(remote.send_track(GEOMETRY[v].name, t, cg, pattern(v, t, cg)) for v, t in tracks))
    await remote.drain_done(cg)
    await remote.prepare(cg)
    await remote.commit(cg)


def run(coro):
    return asyncio.run(coro)


def test_happy_path_commits_into_c(tmp_path):
    async def main():
        site = await Site(tmp_path).start()
        remote = site.remote()
        state = await remote.connect("test", GEOMETRY)
        assert state.new and state.committed_cg == 0
        tracks = [(0, t) for t in range(16)] + [(1, t) for t in range(8)]
        await send_cg(remote, 1, tracks)
        for v, t in tracks:
            data = await site.secondary.read_c(GEOMETRY[v].name, t * TRACK, TRACK)
            assert data == pattern(v, t, 1)
        assert remote.stats["data_bytes"] == len(tracks) * TRACK
        assert site.service.stats["data_frames"] == len(tracks)
        await remote.close()
        # The secondary remembers: a new pairing is not "new" and knows the CG.
        again = site.remote()
        state = await again.connect("test", GEOMETRY)
        assert not state.new and state.committed_cg == 1
        await again.close()
        await site.close()

    run(main())


@pytest.mark.parametrize("case", ["secret", "session", "geometry"])
def test_refused_peer_leaves_b_and_c_untouched_and_service_keeps_running(tmp_path, case):
    async def main():
        site = await Site(tmp_path).start()
        good = site.remote()
        await good.connect("test", GEOMETRY)
        await send_cg(good, 1, [(0, 0), (0, 5)])
        await good.close()
        before = await site.image()

        session, geometry, secret = "test", GEOMETRY, SECRET
        if case == "secret":
            secret = b"wrong secret"
        elif case == "session":
            session = "other"
        else:
            geometry = [VolumeGeometry("vol0", SIZE * 2, TRACK), GEOMETRY[1]]
        bad = site.remote(secret=secret)
        with pytest.raises(HandshakeRefused) as info:
            await bad.connect(session, geometry)
        await bad.close()
        want = {"secret": "AUTH", "session": "SESSION", "geometry": "GEOMETRY"}[case]
        assert want in str(info.value)
        assert len(site.service.rejected) == 1 and "refused" in site.service.rejected[0]
        assert await site.image() == before

        # The same service still pairs with the right primary.
        good = site.remote()
        state = await good.connect("test", GEOMETRY)
        assert state.committed_cg == 1
        await good.close()
        await site.close()

    run(main())


async def raw_exchange(port: int, frames: list[bytes]) -> list[p.Frame | Exception]:
    """Send raw frames on a fresh link; collect what comes back until it closes."""
    link = await connect_replication_link("127.0.0.1", port)
    for f in frames:
        await link.send(f)
    got: list[p.Frame | Exception] = []
    try:
        while True:
            raw = await asyncio.wait_for(link.recv(), 5)
            try:
                got.append(p.decode(raw))
            except p.ProtocolError as e:
                got.append(e)
    except LinkDown:
        pass
    await link.close()
    return got


def with_header_version(raw: bytes, version: int) -> bytes:
    b = bytearray(raw)
    b[4] = version
    return bytes(b[:-4]) + struct.pack(">I", crc32c.crc32c(bytes(b[:-4])))


@pytest.mark.parametrize(
    "frames, code",
    [
        ([with_header_version(p.encode(p.Hello(version=1, session_id="test")), 9)], p.ErrorCode.VERSION),
        ([p.encode(p.Hello(version=p.PROTOCOL_VERSION + 1, session_id="test"))], p.ErrorCode.VERSION),
        ([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], p.ErrorCode.BAD_FRAME),
        ([p.encode(p.Hello(version=1, session_id="test"))[:-1] + b"\0"], p.ErrorCode.BAD_FRAME),  # CRC
        # a small DATA: one over the pre-auth frame cap is dropped unread (tests/test_link_security.py)
        ([p.encode(p.Data(volume=0, track=0, cg_seq=1, payload=b"x" * 512))], p.ErrorCode.STATE),
    ],
    ids=["header-version", "hello-version", "not-ours", "bad-crc", "data-before-hello"],
)
def test_bad_handshake_frames_get_an_error_frame_and_close(tmp_path, frames, code):
    async def main():
        site = await Site(tmp_path).start()
        before = await site.image()
        got = await raw_exchange(site.port, frames)
        assert got and isinstance(got[-1], p.Error), got
        assert got[-1].code == code
        assert site.service.rejected
        assert await site.image() == before
        await site.close()

    run(main())


def test_corrupt_data_frame_is_refused_before_it_reaches_b(tmp_path):
    async def main():
        site = await Site(tmp_path).start()
        plan = LinkFaultPlan(match=is_data)
        remote = site.remote(plan=plan, down_wait_s=2.0)
        await remote.connect("test", GEOMETRY)
        await send_cg(remote, 1, [(0, 1)])
        before = await site.image()
        plan.corrupt = 1.0
        with pytest.raises(LinkDown, match="BAD_FRAME"):
            await remote.send_track("vol0", 2, 2, pattern(0, 2, 2))
        assert plan.done["corrupt"] == 1
        assert site.service.stats["bad_frames"] == 1
        assert await site.image() == before
        # The primary's link comes back by itself and the next CG goes through.
        plan.corrupt = 0.0
        await send_cg(remote, 2, [(0, 2)])
        assert await site.secondary.read_c("vol0", 2 * TRACK, TRACK) == pattern(0, 2, 2)
        assert remote.stats["handshakes"] == 2
        await remote.close()
        await site.close()

    run(main())


@pytest.mark.parametrize("fault", ["duplicate", "reorder"])
def test_duplicated_or_reordered_frames_are_refused_then_the_next_cg_commits(tmp_path, fault):
    # Sealed frames carry the sender's sequence number under the MAC: a frame
    # seen twice is a replay and one overtaken is out of order. Either way the
    # secondary refuses it and drops the link before it reaches B; the CG
    # fails, the link comes back, and the next CG commits the right data.
    async def main():
        site = await Site(tmp_path).start()
        plan = LinkFaultPlan(seed=5)
        remote = site.remote(plan=plan, down_wait_s=2.0)
        await remote.connect("test", GEOMETRY)
        await send_cg(remote, 1, [(0, 0)])
        c_before = await site.secondary.read_c("vol0", 0, SIZE)
        plan.match = is_data
        setattr(plan, fault, 1.0)
        with pytest.raises(LinkDown, match="replayed" if fault == "duplicate" else "out of order"):
            await send_cg(remote, 2, [(0, t) for t in range(4)])
        assert plan.done[fault] >= 1 and site.service.stats["bad_frames"] == 1
        assert await site.secondary.read_c("vol0", 0, SIZE) == c_before  # C never moved
        setattr(plan, fault, 0.0)
        await remote.abort(2)
        tracks = [(0, t) for t in range(16)]
        await send_cg(remote, 3, tracks)
        for v, t in tracks:
            assert await site.secondary.read_c("vol0", t * TRACK, TRACK) == pattern(v, t, 3)
        assert remote.stats["handshakes"] == 2
        await remote.close()
        await site.close()

    run(main())


def test_drop_mid_drain_fails_the_calls_in_flight_then_reconnects(tmp_path):
    async def main():
        site = await Site(tmp_path).start()
        plan = LinkFaultPlan(match=is_data, drop_after=4)
        remote = site.remote(plan=plan, window=8)
        await remote.connect("test", GEOMETRY)
        await send_cg(remote, 1, [(0, 0)])
        c_before = await site.secondary.read_c("vol0", 0, SIZE)
        plan.seen = 0
        results = await asyncio.gather(
            *(remote.send_track("vol0", t, 2, pattern(0, t, 2)) for t in range(16)), return_exceptions=True)
        assert any(isinstance(r, LinkDown) for r in results)
        assert plan.done["drop"] >= 1  # calls queued behind the window may meet the fault on a new link too
        # C never moved: the failed CG did not commit.
        assert await site.secondary.read_c("vol0", 0, SIZE) == c_before
        plan.drop_after = None
        await remote.abort(2)
        await send_cg(remote, 3, [(0, t) for t in range(16)])
        assert await site.secondary.read_c("vol0", 0, TRACK) == pattern(0, 0, 3)
        assert remote.stats["drops"] >= 1 and remote.stats["handshakes"] >= 2
        await remote.close()
        await site.close()

    run(main())


def test_window_bounds_frames_in_flight(tmp_path):
    async def main():
        site = Site(tmp_path)
        in_flight = 0
        peak = 0
        inner_receive = site.secondary.receive_track

        async def slow_receive(*args):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.002)
            in_flight -= 1
            return await inner_receive(*args)

        site.secondary.receive_track = slow_receive  # before the service takes its bound methods
        await site.start()
        remote = site.remote(window=3)
        await remote.connect("test", GEOMETRY)
        await send_cg(remote, 1, [(0, t) for t in range(16)])
        assert 1 <= peak <= 3
        await remote.close()
        await site.close()

    run(main())


def test_sync_does_not_wait_for_data_still_being_written_nor_stop_data_after_it(tmp_path):
    """A SYNC covers what was acknowledged before it: it is answered while a
    DATA frame sent before it is still being written, and DATA frames after
    it are written while its flush runs (the pipeline does not drain at
    every sync). Before, the service read nothing more until every earlier
    DATA frame was written and the flush done."""

    async def main():
        site = Site(tmp_path)
        release_track = asyncio.Event()
        release_flush = asyncio.Event()
        inner_receive, inner_sync = site.secondary.receive_track, site.secondary.sync

        async def held_receive(volume, track, cg_seq, data, *args):
            if track == 0:
                await release_track.wait()
            return await inner_receive(volume, track, cg_seq, data, *args)

        async def held_sync(cg_seq):
            await release_flush.wait()
            return await inner_sync(cg_seq)

        site.secondary.receive_track = held_receive  # before the service takes its bound methods
        site.secondary.sync = held_sync
        await site.start()
        remote = site.remote()
        await remote.connect("test", GEOMETRY)
        held = asyncio.ensure_future(remote.send_track("vol0", 0, 1, pattern(0, 0, 1)))
        await remote.send_track("vol0", 1, 1, pattern(0, 1, 1))
        sync = asyncio.ensure_future(remote.sync(1))
        # The flush is held: a track sent after the SYNC is still written and acknowledged.
        await asyncio.wait_for(remote.send_track("vol0", 2, 1, pattern(0, 2, 1)), 5)
        assert not sync.done() and not held.done()
        release_flush.set()
        await asyncio.wait_for(sync, 5)  # answered with track 0 still being written
        assert not held.done()
        release_track.set()
        await held
        await remote.drain_done(1)
        await remote.prepare(1)
        await remote.commit(1)
        for t in range(3):
            assert await site.secondary.read_c("vol0", t * TRACK, TRACK) == pattern(0, t, 1)
        await remote.close()
        await site.close()

    run(main())


def test_faulty_device_fails_the_ops_its_plan_names():
    async def main():
        inner = open_device("mem://?size=1MiB")
        dev = FaultyDevice(inner, DeviceFaultPlan(ops=frozenset({"write"}), fail_after=2, fail_count=1))
        await dev.write(0, b"a" * 512)
        await dev.write(1, b"b" * 512)
        with pytest.raises(OSError, match="injected"):
            await dev.write(2, b"c" * 512)
        await dev.write(2, b"d" * 512)  # fail_count=1: the next one passes
        assert await dev.read(0, 3) == b"a" * 512 + b"b" * 512 + b"d" * 512
        assert dev.plan.done["fail"] == 1 and dev.info is inner.info

    run(main())


def wait_until(predicate, timeout_s: float = 20.0):
    async def poll():
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("timed out")
            await asyncio.sleep(0.01)

    return poll()


RESYNC = {}


def test_resync_after_drop_sends_only_oos_and_cr(tmp_path):
    """A Primary replicating through a link that drops mid-drain: the CG
    fails, the link comes back, and the bytes sent afterwards are the
    OOS ∪ CR tracks only, never a full copy."""
    from firmware.params import SessionParams
    from hal.clock import AsyncioClock

    volume_tracks = 64

    async def main():
        site = Site(tmp_path, geometry=[VolumeGeometry("vol0", volume_tracks * TRACK, TRACK)])
        await site.start()

        plan = LinkFaultPlan(match=is_data)
        remote = site.remote(plan=plan, window=4)
        a = open_device(f"mem://?size={volume_tracks * TRACK}")
        nvram = open_nvram(f"nvram://{tmp_path}/p.nvram?size=16MiB")
        params = SessionParams(track_bytes=TRACK)
        primary = primary_mod.Primary({"vol0": a}, nvram, AsyncioClock(), params, remote, session_id="test")
        await primary.open(format=True)
        await primary.start()
        await wait_until(lambda: primary.status()["total_successful_cgs"] >= 1)
        # The first CG is the initial copy of a new secondary: all tracks.
        full_copy_bytes = remote.stats["data_bytes"]

        await primary.cg_pause()
        await wait_until(lambda: primary.status()["copy_state"] == "Paused")
        dirty = list(range(0, volume_tracks, 4))  # 16 tracks
        for t in dirty:
            await primary.write("vol0", t * TRACK + 512, b"\xab" * 4096)
        oos_bytes = (primary.status()["oos_tracks"] + primary.status()["cr_tracks"]) * TRACK
        assert oos_bytes == len(dirty) * TRACK
        failed_before = primary.status()["total_failed_cgs"]
        ok_before = primary.status()["total_successful_cgs"]
        sent_before = remote.stats["data_bytes"]
        plan.seen = 0
        plan.drop_after = 6  # the link dies while the drain is under way
        await primary.cg_resume()
        await wait_until(lambda: primary.status()["total_failed_cgs"] > failed_before)
        sent_at_drop = remote.stats["data_bytes"]
        plan.drop_after = None
        await wait_until(lambda: primary.status()["total_successful_cgs"] > ok_before, 30)
        resent = remote.stats["data_bytes"] - sent_at_drop
        total = remote.stats["data_bytes"] - sent_before
        for t in dirty:
            c = await site.secondary.read_c("vol0", t * TRACK, TRACK)
            assert c == await a.read(t * TRACK // 512, TRACK // 512) or c[512:4608] == b"\xab" * 4096
        RESYNC.update(oos_bytes=oos_bytes, sent_before_drop=sent_at_drop - sent_before, resent_after_drop=resent,
                      total=total, full_copy=full_copy_bytes)
        print(f"\nresync: OOS-marked {oos_bytes} B; sent before the drop {sent_at_drop - sent_before} B; "
              f"resent after it {resent} B; full copy would be {full_copy_bytes} B")
        assert resent <= oos_bytes  # never more than OOS ∪ CR
        assert total < full_copy_bytes
        await primary.stop(clean=True)
        await remote.close()
        await site.close()
        nvram.close()

    run(main())


def link_changes(events: EventBus) -> list[str]:
    seen: list[str] = []
    events.subscribe(lambda e: seen.append(e.fields["state"]) if (e.action, e.obj) == ("change", "link") else None)
    return seen


def test_link_changes_are_said_once_per_change_on_each_side(tmp_path):
    """Primary and LinkRemote on one bus, Secondary and ReplicationService on
    another (as the controllers wire them): across a drop and a reconnect each
    bus says up and down alternately, never the same state twice in a row."""
    from firmware.params import SessionParams
    from hal.clock import AsyncioClock

    async def main():
        site = Site(tmp_path, geometry=[VolumeGeometry("vol0", 16 * TRACK, TRACK)])
        secondary_side = link_changes(site.events)
        await site.start()
        plan = LinkFaultPlan()
        primary_events = EventBus()
        primary_side = link_changes(primary_events)
        remote = site.remote(plan=plan, events=primary_events)
        a = open_device(f"mem://?size={16 * TRACK}")
        nvram = open_nvram(f"nvram://{tmp_path}/p.nvram?size=16MiB")
        primary = primary_mod.Primary({"vol0": a}, nvram, AsyncioClock(), SessionParams(track_bytes=TRACK), remote,
                                      session_id="test", events=primary_events)
        await primary.open(format=True)
        await primary.start()
        await wait_until(lambda: primary.status()["total_successful_cgs"] >= 1)
        assert primary_side == ["up"] and secondary_side == ["up"]

        plan.seen, plan.drop_after = 0, 0  # the next frame either way breaks the link
        await wait_until(lambda: primary_side[-1:] == ["down"] and secondary_side[-1:] == ["down"])
        plan.drop_after = None
        ok = primary.status()["total_successful_cgs"]
        await wait_until(lambda: primary.status()["total_successful_cgs"] > ok, 30)
        assert primary.status()["link"] == "up" and remote.link_up and site.service.link_up
        await primary.stop(clean=True)
        await remote.close()
        await wait_until(lambda: not site.service.link_up)
        for seen in (primary_side, secondary_side):
            assert seen[0] == "up" and seen[-1] == "down" and len(seen) >= 4, seen
            assert all(a != b for a, b in zip(seen, seen[1:], strict=False)), seen
        await site.close()
        nvram.close()

    run(main())
