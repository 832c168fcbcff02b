"""The console's event stream (firmware/console_events.py): empty CGs
counted instead of flooding, --all-cgs, --timestamps, and
``mirrorfw console URL events --json`` as a real process (it printed
nothing and exited 2: it waited for an ``exists -`` line a JSON reply has
not)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from console_fakes import FakePrimary, LoopThread, ctrl_c_as_in_a_terminal

from firmware import console_events
from firmware.console import CommandSet
from firmware.console_events import EventStream
from firmware.events import EventBus
from harness.console_session import start_console

pytestmark = pytest.mark.timeout(60)

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d"


def empty_cg(bus: EventBus, seq: int) -> None:
    """The events of a primary's CG that drained nothing (firmware/cgcycle.py)."""
    bus.emit("create", "cg", seq=seq, phase="quiescing")
    bus.emit("change", "cg", seq=seq, phase="draining", held_ms=0.2, oos_tracks=0)
    bus.emit("change", "cg", seq=seq, phase="committing")
    bus.emit("destroy", "cg", seq=seq, result="committed", tracks=0, cycle_s=0.001)


def full_cg(bus: EventBus, seq: int, tracks: int = 3) -> None:
    bus.emit("create", "cg", seq=seq, phase="quiescing")
    bus.emit("change", "cg", seq=seq, phase="draining", held_ms=0.2, oos_tracks=tracks)
    bus.emit("change", "cg", seq=seq, phase="committing")
    bus.emit("destroy", "cg", seq=seq, result="committed", tracks=tracks, cycle_s=0.01)


async def lines(stream: EventStream, n: int, timeout_s: float = 5.0) -> list[str]:
    return [await asyncio.wait_for(stream.next_line(), timeout_s) for _ in range(n)]


def test_empty_cgs_are_one_count_before_the_next_cg_with_tracks():
    async def scenario():
        bus = EventBus()
        stream = EventStream(bus, as_json=False)
        for seq in (1, 2, 3):
            empty_cg(bus, seq)
        full_cg(bus, 4)
        bus.emit("change", "session", copy_state="Paused")
        got = await lines(stream, 6)
        stream.close()
        return got

    assert asyncio.run(scenario()) == [
        "call cg empty:yes count:3 first_seq:1 last_seq:3",
        "create cg seq:4 phase:quiescing",
        "change cg seq:4 phase:draining held_ms:0.2 oos_tracks:3",
        "change cg seq:4 phase:committing",
        "destroy cg seq:4 result:committed tracks:3 cycle_s:0.01",
        "change session copy_state:Paused",
    ]


def test_the_count_comes_on_its_own_after_the_interval(monkeypatch):
    monkeypatch.setattr(console_events, "EMPTY_CG_REPORT_S", 0.2)

    async def scenario():
        bus = EventBus()
        stream = EventStream(bus, as_json=True)
        for seq in range(10, 15):
            empty_cg(bus, seq)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await lines(stream, 1)
        waited = loop.time() - t0
        for seq in range(15, 17):
            empty_cg(bus, seq)
        second = await lines(stream, 1)
        stream.close()
        return [json.loads(x)["event"] for x in first + second], waited

    (first, second), waited = asyncio.run(scenario())
    assert first == {"action": "call", "object": "cg",
                     "fields": {"empty": True, "count": 5, "first_seq": 10, "last_seq": 14}}
    assert second["fields"] == {"empty": True, "count": 2, "first_seq": 15, "last_seq": 16}
    assert 0.1 < waited < 2.0


def test_a_failed_cg_and_a_held_cg_are_shown_whole():
    async def scenario():
        bus = EventBus()
        stream = EventStream(bus, as_json=False)
        bus.emit("create", "cg", seq=5, phase="quiescing")
        bus.emit("change", "cg", seq=5, phase="draining", held_ms=0.2, oos_tracks=0)
        bus.emit("destroy", "cg", seq=5, result="failed", reason="link down")
        # A session master's CG events carry no track count: never withheld.
        bus.emit("create", "cg", seq=6, phase="quiescing", role="master", members=2)
        got = await lines(stream, 4)
        stream.close()
        return got

    assert asyncio.run(scenario()) == [
        "create cg seq:5 phase:quiescing",
        "change cg seq:5 phase:draining held_ms:0.2 oos_tracks:0",
        "destroy cg seq:5 result:failed reason:link_down",
        "create cg seq:6 phase:quiescing role:master members:2",
    ]


def test_all_cgs_and_timestamps():
    async def scenario():
        fake = FakePrimary()
        cs = CommandSet(fake)
        reply = await cs.execute("events --all-cgs --timestamps")
        assert reply.ok and reply.stream is not None
        snapshot = reply.text.splitlines()
        empty_cg(fake.events, 1)
        got = await lines(reply.stream, 4)
        reply.stream.close()
        as_json = await cs.execute("events --now --timestamps --json")
        return snapshot, got, json.loads(as_json.text)

    snapshot, got, doc = asyncio.run(scenario())
    assert all(re.match(STAMP + " exists ", line) for line in snapshot) and snapshot[-1].endswith("exists -")
    assert [line.split(" ", 1)[1] for line in got] == [
        "create cg seq:1 phase:quiescing", "change cg seq:1 phase:draining held_ms:0.2 oos_tracks:0",
        "change cg seq:1 phase:committing", "destroy cg seq:1 result:committed tracks:0 cycle_s:0.001"]
    assert all(re.fullmatch(STAMP, line.split(" ", 1)[0]) for line in got)
    assert all(re.fullmatch(STAMP, e["timestamp"]) for e in doc["data"]["events"])


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def test_cli_events_json_streams_through_mirrorfw_console(loop):
    fake = loop.call(FakePrimary)
    server = loop.run(start_console("socket://127.0.0.1:0", fake))
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "console", server.url, "events", "--json",
                             "--timestamps"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["ok"] and first["command"] == "events"
        assert first["data"]["events"][-1]["object"] == "-"
        loop.run(fake.run())  # a CG: create, draining, destroy (no track counts: shown as they are)
        events = [json.loads(proc.stdout.readline())["event"] for _ in range(3)]
        assert [(e["action"], e["object"], e["fields"]["seq"]) for e in events] == [
            ("create", "cg", 1), ("change", "cg", 1), ("destroy", "cg", 1)]
        assert all(re.fullmatch(STAMP, e["timestamp"]) for e in events)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        # An error reply is one JSON line and exit 1, not a hang.
        bad = subprocess.run([sys.executable, "-m", "harness.cli", "console", server.url, "events", "--json",
                              "--bogus"], capture_output=True, text=True, timeout=30,
                             cwd=Path(__file__).parent.parent)
        assert bad.returncode == 1 and json.loads(bad.stdout.strip().splitlines()[-1])["ok"] is False
    finally:
        proc.kill()
        proc.wait()
        loop.run(server.close())
