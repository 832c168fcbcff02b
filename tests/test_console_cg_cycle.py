"""A CG cycle driven entirely from the console, on the real firmware Primary
(mem:// volume, in-memory NVRAM), through a real pty and a real TCP socket
with pyserial on the other end. The remote is the real Secondary through
LocalRemote when firmware/secondary.py exists, and always a recording
RemotePort double (so the Primary's side runs even before it does)."""

from __future__ import annotations

import json
import re
import time

import pytest
from console_fakes import LoopThread, MemNvram, RecordingRemote

from drivers import open_device
from firmware import primary as primary_mod
from firmware import secondary as sec_mod
from firmware.local_remote import LocalRemote
from harness.console_client import ConsoleClient
from harness.console_session import start_console

pytestmark = pytest.mark.timeout(120)

TRACK = 65536
TRACKS = 32
BLOCK = 512


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


class Site:
    """A Primary with its console; the remote is a double or a real Secondary."""

    def __init__(self, loop: LoopThread, tmp_path, transport: str, remote_kind: str) -> None:
        from firmware.params import SessionParams
        from hal.clock import AsyncioClock

        self.loop = loop
        self.remote_kind = remote_kind
        self.hits: list[str] = []

        async def build():
            self.a = open_device(f"mem://?size={TRACKS * TRACK}")
            self.secondary = None
            if remote_kind == "secondary":
                b = open_device(f"mem://?size={TRACKS * TRACK}")
                c = open_device(f"mem://?size={TRACKS * TRACK}")
                self.secondary = sec_mod.Secondary({"vol0": (b, c)}, MemNvram(16 << 20), AsyncioClock(),
                                                   session_id="console")
                await self.secondary.open(format=True)
                self.remote = LocalRemote(self.secondary)
            else:
                self.remote = RecordingRemote()
            self.primary = primary_mod.Primary({"vol0": self.a}, MemNvram(16 << 20), AsyncioClock(),
                                               SessionParams(track_bytes=TRACK, cg_interval_s=0.05),
                                               self.remote, session_id="console")
            self.primary.crashpoints.on_hit = self.hits.append  # the harness would SIGKILL here
            await self.primary.open(format=True)
            url = f"pty://{tmp_path}/console" if transport == "pty" else "socket://127.0.0.1:0"
            self.server = await start_console(url, self.primary, allow_faults=True)

        loop.run(build())
        self.url = self.server.url
        self.log_path = tmp_path / "console.log"

    def write(self, track: int, fill: int) -> bytes:
        data = bytes([fill]) * 4096
        self.loop.run(self.primary.write("vol0", track * TRACK + BLOCK, data))
        return data

    def remote_track(self, track: int) -> bytes:
        if self.secondary is not None:
            return self.loop.run(self.secondary.read_c("vol0", track * TRACK, TRACK))
        return self.remote.c[("vol0", track)]

    def primary_track(self, track: int) -> bytes:
        return self.loop.run(self.primary.read("vol0", track * TRACK, TRACK))

    def close(self) -> None:
        async def stop():
            await self.server.close()
            await self.primary.stop(clean=True)
            if self.secondary is not None:
                await self.secondary.close()

        self.loop.run(stop())


def wait_status(client: ConsoleClient, ok, timeout_s: float = 30.0) -> dict:
    """Poll `status --json` until ``ok(data)``; the console is the only window."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = client.run_json("status")["data"]
        if ok(data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"status never reached the condition; last: {data}")
        time.sleep(0.05)


@pytest.mark.parametrize("remote_kind", ["recording", "secondary"])
@pytest.mark.parametrize("transport", ["pty", "socket"])
def test_cg_cycle_from_the_console(loop, tmp_path, transport, remote_kind):
    site = Site(loop, tmp_path, transport, remote_kind)
    try:
        with ConsoleClient(site.url, log_path=site.log_path) as con:
            before = con.run_json("status")["data"]
            assert before["copy_state"] == "Suspended" and before["total_successful_cgs"] == 0
            first = site.write(3, 0x11)

            # Start: connect the remote; a new pair drains every track (initial copy).
            con.run_check("set cg_interval_s 0.05")
            con.run_check("cg start")
            status = wait_status(con, lambda d: d["total_successful_cgs"] >= 1 and d["oos_tracks"] == 0)
            assert status["copy_state"] == "Running" and status["link"] == "up"
            assert status["last_cg_time"] is not None and status["severity"] in ("Normal", "Warning")
            assert site.remote_track(3)[BLOCK:BLOCK + 4096] == first

            # Pause, write, watch OOS fill and the bitmap show it.
            con.run_check("cg pause")
            assert wait_status(con, lambda d: d["copy_state"] == "Paused")["phase"] == "idle"
            written = {t: site.write(t, 0x40 + t) for t in (0, 1, 2, 9, 31)}
            bitmap = con.run_json("bitmap show oos vol0")["data"]
            assert bitmap["count"] == 5 and bitmap["runs"] == [[0, 3], [9, 10], [31, 32]]
            assert bitmap["map"] == "###" + "." * 6 + "#" + "." * 21 + "#"
            vol = con.run_json("volume show vol0")["data"]["volume"]
            assert vol["oos_tracks"] == 5 and vol["tracks"] == TRACKS
            assert con.run_json("cache stats")["data"]["used"] >= 1

            # A crash point armed from the console fires in the next commit.
            con.run_check("fault arm primary.before_commit")
            done = con.run_json("status")["data"]["total_successful_cgs"]
            con.run_check("cg resume")
            status = wait_status(con, lambda d: d["total_successful_cgs"] > done and d["oos_tracks"] == 0)
            assert site.hits == ["primary.before_commit"]
            assert con.run_json("bitmap show oos vol0")["data"]["count"] == 0
            for track, data in written.items():
                assert site.remote_track(track) == site.primary_track(track)
                assert site.remote_track(track)[BLOCK:BLOCK + 4096] == data

            # Live parameter change, refused bad values, and the link view.
            con.run_check("set max_coord_ms 200")
            assert con.run_json("status")["data"]["max_coord_ms"] == 200.0
            with pytest.raises(Exception, match="max_coord_ms"):
                con.run_check("set max_coord_ms 0")
            assert con.run_json("link status")["data"]["link"] == "up"
            lines = con.run_check("events --now --statistics")
            assert lines[0].startswith("exists session name:console role:primary")
            assert "exists volume name:vol0 oos_tracks:0 cr_tracks:0" in " ".join(lines) or \
                any(line.startswith("exists volume name:vol0") for line in lines)
            assert lines[-1] == "exists -"
            con.run_check("cg pause")
            paused = wait_status(con, lambda d: d["copy_state"] == "Paused")
            assert paused["total_failed_cgs"] == status["total_failed_cgs"]
    finally:
        site.close()
    assert site.log_path.read_bytes().count(b"mirrorfw> ") > 10


def test_events_stream_shows_cgs_forming_live(loop, tmp_path):
    """Two TCP clients: one streams events2 lines while the other drives."""
    site = Site(loop, tmp_path, "socket", "recording")
    try:
        with ConsoleClient(site.url) as watcher, ConsoleClient(site.url) as con:
            watcher.sendline("events")
            watcher.expect("exists -\r\n")
            site.write(5, 0x55)
            con.run_check("cg start")
            watcher.expect(r"create cg seq:(\d+) phase:quiescing")
            seq = int(watcher.match.group(1))
            watcher.expect(rf"change cg seq:{seq} phase:draining held_ms:\S+ oos_tracks:{TRACKS}")
            watcher.expect(rf"change cg seq:{seq} phase:committing")
            watcher.expect(rf"destroy cg seq:{seq} result:committed tracks:{TRACKS}")
            con.run_check("cg pause")
            watcher.expect("change session copy_state:Paused")
            watcher.sendline("")
            watcher.expect("mirrorfw> ")
            doc = watcher.run_json("events --now")
            assert doc["data"]["events"][0]["fields"]["copy_state"] == "Paused"
            assert json.loads(json.dumps(doc)) == doc
    finally:
        site.close()


def test_cg_commands_refused_by_the_primary_leave_it_unchanged(loop, tmp_path):
    site = Site(loop, tmp_path, "socket", "recording")
    try:
        with ConsoleClient(site.url) as con:
            before = con.run_json("status")["data"]
            lines, status = con.run("cg fail")  # no CG in flight
            assert status == 1 and re.match(r"error: cg fail: event 'fail' is not allowed in phase 'idle'", lines[0])
            assert con.run_json("status")["data"] == before
    finally:
        site.close()


def test_secondary_console_reports_the_committed_cg(loop, tmp_path):
    site = Site(loop, tmp_path, "socket", "secondary")
    try:
        sec_server = loop.run(start_console("socket://127.0.0.1:0", site.secondary, role="secondary"))
        try:
            with ConsoleClient(site.url) as con, ConsoleClient(sec_server.url) as sec:
                assert sec.run_json("status")["data"]["committed_cg"] == 0
                con.run_check("cg start")
                wait_status(con, lambda d: d["total_successful_cgs"] >= 1)
                con.run_check("cg pause")
                data = sec.run_json("status")["data"]
                assert data["role"] == "secondary" and data["committed_cg"] >= 1
                assert data["last_commit_time"] is not None
                assert [v["name"] for v in sec.run_json("volume list")["data"]["volumes"]] == ["vol0"]
                lines = sec.run_check("events --now")
                assert lines[0].startswith(f"exists session name:console role:secondary "
                                           f"committed_cg:{data['committed_cg']}")
                lines, status = sec.run("cg start")
                assert status == 1 and "primary command" in lines[0]
        finally:
            loop.run(sec_server.close())
    finally:
        site.close()
