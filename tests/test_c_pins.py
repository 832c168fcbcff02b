"""Reads of C are a point in time (issue 12, hole 5): an NBD connection to C
reads the CG committed when it connected, across all its requests, while
later CGs commit; named snapshots pin one CG of every volume; the memory a
pin keeps is bounded. In-process (tests/firmware_doubles.py), through the
real NBD server and client where a connection matters."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from firmware_doubles import BlockDevice, jitter_rig, make_rig, settle

from drivers.nbd.client import NbdClient, open_async
from drivers.nbd.server import NbdServer
from firmware.pins import PinLost, SnapshotError

pytestmark = pytest.mark.timeout(120)
T = 65536  # track = grain
TRACKS = 64  # 4 MiB volumes
STAMP = struct.Struct(">4sIQ")  # volume, CG, track: 16 bytes


def stamp(vol: str, cg: int, track: int) -> bytes:
    return STAMP.pack(vol.encode()[:4].ljust(4), cg, track) * (4096 // STAMP.size)


def shown(grain: bytes) -> tuple[int, int]:
    """(CG, track) a grain of C shows; (0, 0) for a never-written one."""
    if not any(grain[:4096]):
        return (0, 0)
    head = grain[: STAMP.size]
    assert grain[:4096] == head * (4096 // STAMP.size), "a torn grain"
    _, cg, track = STAMP.unpack(head)
    return (cg, track)


class Model:
    """What each committed CG holds: per volume, the (CG, track) of each grain."""

    def __init__(self, volumes) -> None:
        self.now = {v: [(0, 0)] * TRACKS for v in volumes}
        self.at: dict[int, dict[str, list]] = {}

    async def cg(self, rig, writes: dict[str, list[int]]) -> int:
        """Write ``writes`` (volume -> tracks) stamped with the next CG, form the CG, record it."""
        seq = rig.secondary.committed_cg + 1
        for vol, tracks in writes.items():
            for t in tracks:
                await rig.primary.write(vol, t * T, stamp(vol, seq, t))
                self.now[vol][t] = (seq, t)
        self.at[seq] = {v: list(g) for v, g in self.now.items()}
        assert await rig.primary.form_cg()
        assert rig.secondary.committed_cg == seq
        return seq


async def steady_rig(volumes=("vol0",), **kw):
    rig = await make_rig(volumes=volumes, **kw)
    assert await rig.primary.form_cg()  # the initial copy (all zeros)
    return rig


def grains_of(data: bytes) -> list[tuple[int, int]]:
    return [shown(data[i : i + T]) for i in range(0, len(data), T)]


async def served(rig) -> tuple[NbdServer, int]:
    server = NbdServer(rig.secondary.host_target(), read_only=True)
    _, port = await server.start_tcp("127.0.0.1", 0)
    return server, port


def test_a_connection_reads_one_cg_while_later_cgs_commit():
    """Fails on b5857b4: the connection's second read showed the newest CG."""
    async def main():
        rig = await steady_rig()
        m = Model(["vol0"])
        k = await m.cg(rig, {"vol0": range(TRACKS)})
        server, port = await served(rig)
        dev = await open_async(f"nbd://127.0.0.1:{port}/vol0")  # connected: pinned at CG k
        try:
            assert shown(await dev.read(0, T // dev.info.block_size)) == (k, 0)
            for n in range(4):  # several CGs, each over many grains (the same ones, twice, too)
                await m.cg(rig, {"vol0": [t for t in range(TRACKS) if t % (n + 2) != 1]})
            whole = await dev.read(0, TRACKS * T // dev.info.block_size)
            assert grains_of(whole) == m.at[k]["vol0"]
            for t in random.Random(5).sample(range(TRACKS), 16):  # one grain at a time, too
                assert shown(await dev.read(t * T // 512, T // 512)) == m.at[k]["vol0"][t]
            # A new connection reads the newest CG; read_c is the live C.
            latest = max(m.at)
            fresh = await open_async(f"nbd://127.0.0.1:{port}/vol0")
            assert grains_of(await fresh.read(0, TRACKS * T // 512)) == m.at[latest]["vol0"]
            fresh.close()
            assert grains_of(await rig.secondary.read_c("vol0", 0, TRACKS * T)) == m.at[latest]["vol0"]
            assert rig.secondary.status()["pins"]["pinned_bytes"] > 0
        finally:
            dev.close()
            await settle()
            await server.close()
        pins = rig.secondary.status()["pins"]
        assert pins["pins"] == 0 and pins["pinned_bytes"] == 0, "a closed connection keeps its pin"
    asyncio.run(main())


def test_connections_pinned_at_different_cgs_each_read_their_own():
    async def main():
        rig = await steady_rig()
        m = Model(["vol0"])
        k1 = await m.cg(rig, {"vol0": range(0, TRACKS, 2)})
        target = rig.secondary.host_target()
        first = target.open("vol0")
        await m.cg(rig, {"vol0": range(0, TRACKS, 3)})
        k3 = await m.cg(rig, {"vol0": range(TRACKS)})
        second = target.open("vol0")
        for _ in range(3):
            await m.cg(rig, {"vol0": range(1, TRACKS, 2)})
        assert first.pin.seq == k1 and second.pin.seq == k3
        assert grains_of(await first.read(0, TRACKS * T)) == m.at[k1]["vol0"]
        assert grains_of(await second.read(0, TRACKS * T)) == m.at[k3]["vol0"]
        assert not first.can_multi_conn() and not first.can_write()
        first.close()
        with pytest.raises(PinLost, match="connection closed"):
            await first.read(0, T)
        assert grains_of(await second.read(0, TRACKS * T)) == m.at[k3]["vol0"]
        second.close()
        assert rig.secondary.status()["pins"]["pinned_bytes"] == 0
    asyncio.run(main())


def test_a_snapshot_pins_one_cg_across_volumes_and_is_exported_read_only():
    async def main():
        rig = await steady_rig(volumes=("v0", "v1"))
        s = rig.secondary
        m = Model(["v0", "v1"])
        k = await m.cg(rig, {"v0": range(TRACKS), "v1": range(0, TRACKS, 2)})
        assert s.snapshot_create("before-upgrade") == {"name": "before-upgrade", "cg": k,
                                                         "exports": ["v0@before-upgrade", "v1@before-upgrade"]}
        for n in range(3):
            await m.cg(rig, {"v0": range(n, TRACKS, 2), "v1": range(TRACKS)})
        target = s.host_target()
        assert {"v0@before-upgrade", "v1@before-upgrade"} <= set(target.volumes())
        server, port = await served(rig)
        try:
            assert "v1@before-upgrade" in await NbdClient.list_exports(f"nbd://127.0.0.1:{port}/")
            for vol in ("v0", "v1"):
                dev = await open_async(f"nbd://127.0.0.1:{port}/{vol}@before-upgrade")
                assert dev.info.read_only
                assert grains_of(await dev.read(0, TRACKS * T // 512)) == m.at[k][vol]
                with pytest.raises(OSError):
                    await dev.write(0, bytes(4096))
                dev.close()
        finally:
            await server.close()
        # Errors: one line each, nothing changed.
        for bad in ("", "a b", "x@y", "-lead", "a" * 65, "ü"):
            with pytest.raises(SnapshotError, match="bad snapshot name"):
                s.snapshot_create(bad)
        with pytest.raises(SnapshotError, match="exists"):
            s.snapshot_create("before-upgrade")
        with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
            s.snapshot_delete("nope")
        assert [e["name"] for e in s.snapshot_list()] == ["before-upgrade"]
        view = target.open("v1@before-upgrade")
        assert s.snapshot_delete("before-upgrade") == {"name": "before-upgrade", "cg": k}
        with pytest.raises(PinLost, match="snapshot before-upgrade was deleted"):
            await view.read(0, T)
        assert target.open("v1@before-upgrade") is None and s.snapshot_list() == []
        assert s.status()["pins"]["pinned_bytes"] == 0
    asyncio.run(main())


def test_over_budget_a_pin_is_dropped_with_a_clear_error_and_the_cgs_go_on():
    async def main():
        rig = await steady_rig()
        s = rig.secondary
        s.fc.pins.max_bytes = 3 * T
        m = Model(["vol0"])
        k = await m.cg(rig, {"vol0": range(8)})
        target = s.host_target()
        small = target.open("vol0")  # will need 2 grains
        big = target.open("vol0")  # will need 5 more
        # The first overwrite after the pin costs no memory (the pin follows
        # its grains into C); the next one of the same grains keeps C's copy.
        await m.cg(rig, {"vol0": range(5)})
        assert s.status()["pins"]["pinned_bytes"] == 0
        await m.cg(rig, {"vol0": range(2)})
        assert s.status()["pins"]["pinned_bytes"] == 2 * T  # both pins keep the same two grains, once
        latest = await m.cg(rig, {"vol0": range(5)})
        # Three more grains for both: past 3 grains, so the pin that asks first is dropped,
        # and the other one too (it needs the same bytes, which did not fit).
        assert s.status()["pins"]["pins_dropped_over_budget"] >= 1
        for view in (small, big):
            if view.pin.lost is None:
                assert grains_of(await view.read(0, 8 * T)) == m.at[k]["vol0"]
            else:
                with pytest.raises(PinLost, match=r"pin #\d+ \(a connection to vol0, CG \d+\) was dropped: "
                                                  r"keeping the grains it reads would pass max_pinned_bytes "
                                                  r"\(196608 bytes\)"):
                    await view.read(0, T)
        assert s.status()["pins"]["pinned_bytes"] <= 3 * T
        # The CG stream never noticed: C is the newest CG.
        assert s.committed_cg == latest
        assert grains_of(await s.read_c("vol0", 0, TRACKS * T)) == m.at[latest]["vol0"]
        small.close()
        big.close()
        assert s.status()["pins"] == {"pins": 0, "pinned_bytes": 0, "max_pinned_bytes": 3 * T,
                                      "pins_dropped_over_budget": s.fc.pins.dropped_over_budget,
                                      "snapshots": []}
    asyncio.run(main())


class GatedDevice(BlockDevice):
    """Holds every write until ``gate`` opens (a B write in flight)."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner.info)
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def _read(self, lba, count):
        return await self.inner.read(lba, count)

    async def _write(self, lba, data, fua):
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        await self.inner.write(lba, data, fua=fua)

    async def _flush(self):
        await self.inner.flush()


def test_a_pin_taken_while_a_track_is_being_written_reads_the_committed_cg():
    """The grain is locked (copy-on-write done, B write in flight) when the
    connection opens: the pin decides that grain at its unlock."""
    async def main():
        rig = await steady_rig()
        s = rig.secondary
        m = Model(["vol0"])
        k = await m.cg(rig, {"vol0": range(4)})
        gated = GatedDevice(s.b[0])
        s.b[0] = s.fc.b[0] = gated
        gated.gate.clear()
        await s.hello(s.session_id, rig.primary.geometry())
        writing = asyncio.ensure_future(s.receive_track("vol0", 2, k + 1, stamp("vol0", k + 1, 2) + bytes(T - 4096)))
        await gated.waiting.wait()  # the B write of track 2 is in flight
        view = s.host_target().open("vol0")
        reading = asyncio.ensure_future(view.read(0, 4 * T))
        await settle()
        assert not reading.done(), "the read must wait for the grain the pin has not decided"
        gated.gate.set()
        await writing
        assert grains_of(await reading) == m.at[k]["vol0"][:4]
        assert grains_of(await view.read(0, 4 * T)) == m.at[k]["vol0"][:4]
        view.close()
    asyncio.run(main())


@pytest.mark.parametrize("seed", range(6))
def test_pinned_readers_racing_cg_commits_always_see_their_cg(seed):
    """Devices and link yield at random (seeded) around every call: readers
    open, read random ranges over many awaits and close, while CGs commit."""
    async def main():
        rig = await make_rig(volumes=("v0", "v1"), start=False)
        rng = random.Random(seed)
        jitter_rig(rig, rng)
        await rig.primary.start(form_cgs=False, destage=False)
        assert await rig.primary.form_cg()
        m = Model(["v0", "v1"])
        await m.cg(rig, {"v0": range(TRACKS), "v1": range(TRACKS)})
        target = rig.secondary.host_target()
        done = asyncio.Event()
        checked = [0]

        async def writer():
            for _ in range(12):
                await m.cg(rig, {v: rng.sample(range(TRACKS), rng.randint(1, 24)) for v in ("v0", "v1")})
                if rng.random() < 0.3:
                    rig.secondary.snapshot_create(f"s{rig.secondary.committed_cg}")
            done.set()

        async def reader(vol):
            while not done.is_set():
                view = target.open(vol)
                want = m.at[view.pin.seq][vol]
                for _ in range(rng.randint(1, 6)):
                    first = rng.randrange(TRACKS)
                    n = rng.randint(1, min(8, TRACKS - first))
                    got = grains_of(await view.read(first * T, n * T))
                    assert got == want[first : first + n], f"{view.pin.name} showed another CG"
                    checked[0] += 1
                view.close()

        await asyncio.gather(writer(), reader("v0"), reader("v1"), reader("v1"))
        for snap in rig.secondary.snapshots.names():
            seq = rig.secondary.snapshots.get(snap).seq
            for vol in ("v0", "v1"):
                got = grains_of(await target.open(f"{vol}@{snap}").read(0, TRACKS * T))
                assert got == m.at[seq][vol]
        assert checked[0] > 20
    asyncio.run(main())


# -- real processes, real clients ------------------------------------------------------


def _console(console_url: str, line: str) -> dict:
    from harness.console_client import ConsoleClient

    with ConsoleClient(console_url, timeout_s=10) as con:
        return con.run_json(line)["data"]


def _secondary_cg(console_url: str) -> int:
    return _console(console_url, "status")["committed_cg"]


@pytest.mark.slow
def test_qemu_img_and_nbdcopy_of_c_while_cgs_commit_are_consistent_cuts(tmp_path):
    """The pair as real processes, a stamped workload replayed into the
    primary, and C copied by qemu-img convert and nbdcopy while CGs keep
    committing (no pause), and a snapshot taken mid-workload copied after it:
    ``mirrorfw check`` finds every copy a consistent cut. (On cf85b73
    qemu-img's copy was not one.)"""
    import shutil
    import subprocess
    import sys
    import time

    from harness.supervise import start_controller, write_pair_configs

    missing = [t for t in ("qemu-img", "nbdcopy") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make deps installs qemu-utils libnbd-bin)")
    mirrorfw = [sys.executable, "-m", "harness.cli"]
    configs = write_pair_configs(tmp_path, size="64MiB", console=True, session={"max_pinned_bytes": "128MiB"})
    procs = [start_controller(configs.secondary, format=True), start_controller(configs.primary, format=True)]
    sec, pri = procs
    replay = None
    try:
        trace = tmp_path / "w.iolog"
        subprocess.run(mirrorfw + ["trace", "generate", str(trace), "--seed", "7", "--duration-s", "10",
                                   "--iops", "500", "--devices", "1", "--span", "64MiB", "--write-ratio", "1.0"],
                       check=True, capture_output=True, timeout=60)
        replay = subprocess.Popen(mirrorfw + ["replay", str(trace), "--target", f"nbd://{pri.ready['nbd']}/vol0",
                                              "--timing", "original", "--log", str(tmp_path / "replay.log"),
                                              "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while _secondary_cg(sec.ready["console"]) < 4:  # past the initial copy: CGs of the workload
            assert time.monotonic() < deadline and replay.poll() is None, "no CG committed"
            time.sleep(0.2)
        made = _console(sec.ready["console"], "snapshot create mid")
        assert made["exports"] == ["vol0@mid"]
        c_url = f"nbd://{sec.ready['nbd']}/vol0"
        copies = []
        for i in range(4):
            out = tmp_path / f"copy{i}.img"
            cmd = (["qemu-img", "convert", "-f", "raw", "-O", "raw", c_url, str(out)] if i % 2 == 0
                   else ["nbdcopy", c_url, str(out)])
            before = _secondary_cg(sec.ready["console"])
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, f"{cmd[0]}: {run.stderr}"
            copies.append((cmd[0], out, _secondary_cg(sec.ready["console"]) - before))
        assert replay.wait(timeout=60) == 0, replay.stderr.read()
        assert any(n > 0 for _, _, n in copies), f"no copy overlapped a commit, so nothing was tested: {copies}"
        snap = tmp_path / "snapshot.img"
        run = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd://{sec.ready['nbd']}/vol0@mid",
                              str(snap)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        listed = _console(sec.ready["console"], "snapshot list")
        assert listed["max_pinned_bytes"] == 128 << 20 and listed["snapshots"][0]["lost"] is None, listed
        copies.append(("snapshot", snap, _secondary_cg(sec.ready["console"]) - made["cg"]))
        for tool, out, commits in copies:
            check = subprocess.run(mirrorfw + ["check", "--log", str(tmp_path / "replay.log"), "--copy",
                                               f"file://{out}"], capture_output=True, text=True, timeout=120)
            assert check.returncode == 0 and check.stdout.startswith("CONSISTENT"), \
                f"{tool} copy ({commits} commits while it copied):\n{check.stdout}{check.stderr}"
            assert " 0 writes shown" not in check.stdout, "an empty copy proves nothing"
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
        for p in procs:
            if p.alive():
                p.stop()


def test_snapshot_console_commands_on_the_secondary():
    from firmware.console import CommandSet

    async def main():
        rig = await steady_rig(volumes=("v0", "v1"))
        m = Model(["v0", "v1"])
        k = await m.cg(rig, {"v0": range(4), "v1": range(4)})
        cs = CommandSet(rig.secondary, role="secondary")

        async def run(line):
            return await cs.execute(line)

        assert "kept in memory while replication runs" in (await run("help snapshot create")).text
        made = await run("snapshot create before-upgrade")
        assert made.ok and made.text == (f"snapshot before-upgrade: CG {k}, exported as v0@before-upgrade, "
                                         f"v1@before-upgrade")
        for line, error in (("snapshot create before-upgrade", "exists"), ("snapshot create x@y", "bad snapshot name"),
                            ("snapshot delete nope", "no snapshot named 'nope'"), ("snapshot create", "missing NAME")):
            reply = await run(line)
            assert not reply.ok and error in reply.text and "\n" not in reply.text, reply.text
        await m.cg(rig, {"v0": range(2), "v1": range(3)})
        await m.cg(rig, {"v0": range(3), "v1": range(1)})
        listed = await run("snapshot list --json")
        import json

        doc = json.loads(listed.text)["data"]
        assert [(s["name"], s["cg"]) for s in doc["snapshots"]] == [("before-upgrade", k)]
        assert doc["pinned_bytes"] == sum(s["kept_bytes"] for s in doc["snapshots"]) > 0
        target = rig.secondary.host_target()
        for vol in ("v0", "v1"):
            assert grains_of(await target.open(f"{vol}@before-upgrade").read(0, 4 * T)) == m.at[k][vol][:4]
        assert (await run("snapshot delete before-upgrade")).text == f"snapshot before-upgrade (CG {k}) deleted"
        assert (await run("snapshot list")).text.startswith("no snapshots")
        primary = CommandSet(rig.primary, role="primary")
        assert "secondary command" in (await primary.execute("snapshot list")).text
    asyncio.run(main())
