"""The console command set on its own (firmware/console.py): every command,
its --json schema, the errors, and fuzzing that no line escapes as an
exception or changes the controller."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from console_fakes import FAKE_POINT, FakePrimary
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from firmware.console import MAX_LINE_CHARS, CommandSet, Reply
from firmware.events import EventBus


def run(cs: CommandSet, line: str) -> Reply:
    return asyncio.run(cs.execute(line))


def jrun(cs: CommandSet, line: str) -> dict:
    reply = run(cs, line + " --json")
    assert "\n" not in reply.text, "a JSON reply is one line"
    doc = json.loads(reply.text)
    assert doc["ok"] is reply.ok
    if doc["ok"]:
        assert set(doc) == {"ok", "command", "data"}
        assert isinstance(doc["data"], dict)
    else:
        assert set(doc) == {"ok", "command", "error"}
        assert doc["error"]
    return doc


def controller_state(fake: FakePrimary) -> tuple:
    return (list(fake.calls), fake.params.as_dict(), dict(fake.crashpoints.armed), fake.copy_state,
            fake.cg_seq, {n: b.to01() for n, b in fake.oos.items()})


@pytest.fixture
def fake() -> FakePrimary:
    return FakePrimary()


@pytest.fixture
def cs(fake) -> CommandSet:
    return CommandSet(fake, role="primary", allow_faults=True)


# ---- the table and help ----------------------------------------------------

def test_help_lists_every_primary_command_from_the_table(cs):
    text = run(cs, "help").text
    for command in cs.commands:
        assert command.usage() in text
        assert command.help in text
    doc = jrun(cs, "help")
    assert [c["name"] for c in doc["data"]["commands"]] == [c.name for c in cs.commands]
    assert len(cs.commands) == 26  # the 22 from before the table held its handlers, auth, power cut, session recover|failover


def test_help_for_a_group_and_one_command(cs):
    names = [c["name"] for c in jrun(cs, "help cg")["data"]["commands"]]
    assert names == ["cg start", "cg pause", "cg resume", "cg run", "cg fail"]
    assert [c["name"] for c in jrun(cs, "help bitmap show")["data"]["commands"]] == ["bitmap show"]
    assert "bitmap show oos|cr VOLUME [START[-END]]" in run(cs, "help bitmap").text
    assert jrun(cs, "help nosuch")["ok"] is False


def test_secondary_role_offers_only_its_commands():
    cs = CommandSet(FakeSecondary(), role="secondary")
    names = {c["name"] for c in jrun(cs, "help")["data"]["commands"]}
    assert "cg start" not in names and "status" in names and "events" in names
    reply = run(cs, "cg start")
    assert not reply.ok and "primary command" in reply.text
    assert cs.prompt == "mirrorfw-sec> "
    data = jrun(cs, "status")["data"]
    assert data["role"] == "secondary" and data["committed_cg"] == 7
    assert "exists session name:default role:secondary committed_cg:7" in run(cs, "events --now").text


class FakeSecondary:
    events = None
    crashpoints = None

    def status(self) -> dict:
        return {"committed_cg": 7, "last_commit_time": 1_700_000_000.5, "volumes": ["vol0"],
                "role": "secondary"}


# ---- each command ----------------------------------------------------------

STATUS_SCHEMA = {"copy_state", "fatal_reason", "last_cg_time", "data_exposure_s", "total_successful_cgs",
                 "total_failed_cgs", "cg_interval_s", "max_coord_ms", "max_drain_s", "oos_tracks",
                 "cr_tracks", "recoverable", "severity", "cache", "link"}


def test_status_speaks_the_csm_vocabulary(cs, fake):
    fake.dirty("vol0", 3, 9)
    doc = jrun(cs, "status")
    assert doc["command"] == "status"
    data = doc["data"]
    assert STATUS_SCHEMA <= set(data)
    assert data["copy_state"] == "Running" and data["oos_tracks"] == 6 and data["severity"] == "Normal"
    assert data["cache"]["slots"] == 1024 and data["link"] == "up"
    text = run(cs, "status").text
    for key in ("copy_state", "data_exposure_s", "total_successful_cgs", "severity", "cache", "link"):
        assert any(line.split()[0] == key for line in text.splitlines()), key
    assert "10/1024 slots used" in text


@pytest.mark.parametrize("line, method, state", [
    ("cg start", "cg_start", "Running"), ("cg pause", "cg_pause", "Paused"),
    ("pause", "cg_pause", "Paused"), ("cg resume", "cg_resume", "Running"),
    ("pair suspend", "suspend", "Suspended"), ("pair resume", "resume_pair", "Running"),
])
def test_cg_and_pair_commands_call_the_controller(cs, fake, line, method, state):
    doc = jrun(cs, line)
    assert doc["ok"] and fake.calls == [(method,)]
    assert doc["data"]["copy_state"] == state == fake.copy_state


def test_cg_run_forms_a_group_and_cg_fail_passes_its_reason(cs, fake):
    fake.dirty("vol1", 0, 10)
    assert jrun(cs, "cg run")["data"]["total_successful_cgs"] == 1
    assert jrun(cs, "run")["data"]["cg_seq"] == 2
    assert fake.oos["vol1"].count() == 0
    assert jrun(cs, "cg fail 'link lost' now")["data"]["reason"] == "link lost now"
    assert fake.calls[-1] == ("cg_fail", "link lost now")
    run(cs, "cg fail")
    assert fake.calls[-1] == ("cg_fail", "operator")


def test_volume_list_and_show(cs):
    vols = jrun(cs, "volume list")["data"]["volumes"]
    assert [v["name"] for v in vols] == ["vol0", "vol1"]
    assert "vol1" in run(cs, "volume list").text.splitlines()[2]
    shown = jrun(cs, "volume show vol1")["data"]["volume"]
    assert shown["tracks"] == 100
    err = jrun(cs, "volume show nope")
    assert "no volume 'nope'; volumes: vol0, vol1" in err["error"]


def test_bitmap_counts_runs_and_map(cs, fake):
    fake.dirty("vol0", 0, 64)  # the first quarter: 16 full cells of 4 tracks
    fake.dirty("vol0", 130, 131)  # one track: a partial cell
    doc = jrun(cs, "bitmap show oos vol0")["data"]
    assert doc["count"] == 65 and doc["tracks"] == 256
    assert doc["runs"] == [[0, 64], [130, 131]]
    assert doc["map"] == "#" * 16 + "." * 16 + "+" + "." * 31
    part = jrun(cs, "bitmap show oos vol0 60-70")["data"]
    assert (part["start_track"], part["end_track"], part["count"], part["map"]) == (60, 70, 4, "####......")
    assert jrun(cs, "bitmap show cr vol1 10-")["data"]["count"] == 0
    text = run(cs, "bitmap show oos vol0").text
    assert "65 of 256 set" in text and "runs: 0-64 130-131" in text


@pytest.mark.parametrize("line, message", [
    ("bitmap show xx vol0", "expected one of oos, cr"),
    ("bitmap show oos", "missing VOLUME"),
    ("bitmap show oos nope", "no volume 'nope'"),
    ("bitmap show oos vol0 5-5", "END must be greater"),
    ("bitmap show oos vol0 300", "has tracks 0..255"),
    ("bitmap show oos vol0 0-257", "has tracks 0..255"),
    ("bitmap show oos vol0 a-b", "expected START or START-END"),
    ("bitmap show oos vol0 1 2", "unexpected argument '2'"),
])
def test_bitmap_argument_errors(cs, line, message):
    assert message in jrun(cs, line)["error"]


def test_cache_stats_and_link_status(cs, fake):
    cache = jrun(cs, "cache stats")["data"]
    assert cache["hit_rate"] == pytest.approx(0.75) and cache["dirty"] == 5
    assert "75.0%" in run(cs, "cache stats").text
    fake.link = "down"
    assert jrun(cs, "link status")["data"]["link"] == "down"


def test_set_changes_a_parameter_and_refuses_bad_values(cs, fake):
    assert jrun(cs, "set cg_interval_s 2.5")["data"] == {"parameter": "cg_interval_s", "value": 2.5}
    assert fake.params.cg_interval_s == 2.5
    assert run(cs, "set collision_policy send-first").text == "collision_policy = send-first"
    before = fake.params.as_dict()
    assert "max_coord_ms" in jrun(cs, "set max_coord_ms -3")["error"]
    assert "expected one of cg_interval_s" in jrun(cs, "set track_bytes 4096")["error"]
    assert "missing VALUE" in jrun(cs, "set max_drain_s")["error"]
    assert fake.params.as_dict() == before


def test_fault_commands_arm_and_fire(cs, fake):
    assert FAKE_POINT in {p["name"] for p in jrun(cs, "fault list")["data"]["crashpoints"]}
    assert jrun(cs, f"fault arm {FAKE_POINT} after 1")["data"] == {"crashpoint": FAKE_POINT, "after": 1}
    listed = {p["name"]: p for p in jrun(cs, "fault list")["data"]["crashpoints"]}
    assert listed[FAKE_POINT]["armed"] and listed[FAKE_POINT]["after"] == 1
    run(cs, "cg run")
    assert fake.fired == []
    run(cs, "cg run")
    assert fake.fired == [FAKE_POINT]
    run(cs, f"fault arm {FAKE_POINT}")
    assert jrun(cs, f"fault disarm {FAKE_POINT}")["data"]["was_armed"] is True
    assert "unknown crash point 'no.such'" in jrun(cs, "fault arm no.such")["error"]
    assert "whole number" in jrun(cs, f"fault arm {FAKE_POINT} after -1")["error"]


def test_faults_are_refused_unless_allowed(fake):
    cs = CommandSet(fake, allow_faults=False)
    for line in (f"fault arm {FAKE_POINT}", "fault list", f"fault disarm {FAKE_POINT}"):
        assert "fault injection is disabled" in jrun(cs, line)["error"]
    assert fake.crashpoints.armed == {}


def test_log_level_sets_and_shows(cs):
    name = "firmware.console_test_logger"
    try:
        assert jrun(cs, f"log level debug {name}")["data"] == {"logger": name, "level": "debug"}
        assert logging.getLogger(name).level == logging.DEBUG
        assert jrun(cs, f"log level {name}")["ok"] is False  # LEVEL must come first
        assert "expected one of debug" in jrun(cs, "log level loud")["error"]
        assert "dotted module name" in jrun(cs, "log level info a/b")["error"]
    finally:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_events_now_is_an_events2_snapshot(cs, fake):
    fake.dirty("vol0", 0, 3)
    lines = run(cs, "events --now").text.splitlines()
    assert lines[0].startswith("exists session name:fake role:primary copy_state:Running")
    assert "exists volume name:vol0 oos_tracks:3 cr_tracks:0" in lines
    assert "exists link state:up" in lines
    assert lines[-1] == "exists -"
    assert all(line.split()[0] == "exists" for line in lines)
    stats = run(cs, "events --now --statistics").text
    assert "total_successful_cgs:0" in stats and "held_ack_ms_p99:1.5" in stats and "hits:30" in stats
    events = jrun(cs, "events --now")["data"]["events"]
    assert events[-1] == {"action": "exists", "object": "-", "fields": {}}
    assert run(cs, "events --now").stream is None


def test_events_without_now_streams_what_the_bus_emits(cs, fake):
    async def scenario():
        reply = await cs.execute("events")
        assert reply.ok and reply.text.endswith("exists -") and reply.stream is not None
        await cs.execute("cg run")
        got = [await reply.stream.next_line() for _ in range(3)]
        reply.stream.close()
        return got

    got = asyncio.run(scenario())
    assert got == ["create cg seq:1", "change cg seq:1 phase:draining", "destroy cg seq:1 result:committed"]


def test_event_stream_overflow_is_reported_not_blocking(fake):
    bus = EventBus()
    cs = CommandSet(fake, events=bus)

    async def scenario():
        reply = await cs.execute("events --json")
        for i in range(5000):
            bus.emit("change", "cg", seq=i)
        first = await reply.stream.next_line()
        second = await reply.stream.next_line()
        reply.stream.close()
        return json.loads(first), json.loads(second)

    first, second = asyncio.run(scenario())
    assert first["event"]["object"] == "overflow" and first["event"]["fields"]["dropped"] == 5000 - 4096
    assert second["event"] == {"action": "change", "object": "cg", "fields": {"seq": 0}}


# ---- parsing and errors ----------------------------------------------------

@pytest.mark.parametrize("line", ["status\r\n", "status\n", "status\r", "\tstatus\t", "  STATUS  ",
                                  "status # a comment", "'status'"])
def test_line_variants_are_tolerated(cs, line):
    reply = run(cs, line)
    assert reply.ok and reply.command == "status"


@pytest.mark.parametrize("line, message", [
    ("frobnicate", "unknown command 'frobnicate'; type help"),
    ("cg", "cg: unknown or missing subcommand; expected one of: start, pause, resume, run, fail"),
    ("cg explode", "cg: unknown or missing subcommand 'explode'"),
    ("status extra", "unexpected argument 'extra'; usage: status [--json]"),
    ("status --verbose", "status: unknown option --verbose; options: --json"),
    ("volume show", "missing NAME; usage: volume show NAME [--json]"),
    ("fault arm", "missing CRASHPOINT"),
    ("fault arm x after", "after needs N"),
    ("cg fail 'unbalanced", "cannot parse the line: No closing quotation"),
    ("status\x00", "binary data (U+0000 at column 7)"),
    ("\x1b[Astatus", "binary data (U+001B at column 1)"),
    ("st\ufffdtus", "binary data (U+FFFD at column 3)"),
    ("x" * (MAX_LINE_CHARS + 1), f"line too long (more than {MAX_LINE_CHARS} characters)"),
])
def test_bad_lines_get_a_clear_error_and_change_nothing(cs, fake, line, message):
    before = controller_state(fake)
    reply = run(cs, line)
    assert not reply.ok and reply.text.startswith("error: ")
    assert message in reply.text
    assert controller_state(fake) == before


def test_a_lone_json_flag_is_a_json_error(cs):
    assert jrun(cs, "")["error"] == "--json needs a command, e.g. status --json"


def test_blank_and_comment_lines_are_quiet(cs):
    for line in ("", "   ", "\r\n", "# just a note"):
        reply = run(cs, line)
        assert reply.ok and reply.text == "" and reply.command is None


def test_a_controller_exception_becomes_an_error_reply(fake):
    async def broken():
        raise RuntimeError("drain stuck\nsecond line")

    fake.run = broken
    cs = CommandSet(fake)
    reply = run(cs, "cg run")
    assert not reply.ok and reply.text == "error: cg run failed: RuntimeError: drain stuck"
    assert jrun(cs, "cg run")["command"] == "cg run"


def test_json_never_carries_nan(fake):
    fake.status = lambda: {"data_exposure_s": float("nan"), "copy_state": "Running"}
    doc = json.loads(run(CommandSet(fake), "status --json").text)
    assert doc["data"]["data_exposure_s"] is None


def test_every_table_command_holds_a_handler_bound_to_its_command_set(cs):
    for command in cs.commands:
        assert callable(command.run) and command.run.__self__ is cs, command.name
    assert cs._by_name["run"].run == cs._by_name["cg run"].run  # the alias runs the same handler
    secondary = CommandSet(FakeSecondary(), role="secondary")
    shared = {c.name for c in secondary.commands if not c.name.startswith("snapshot ")}
    assert shared < {c.name for c in cs.commands}  # snapshots are the secondary's own
    assert {c.name for c in secondary.commands} - shared == {"snapshot create", "snapshot delete", "snapshot list"}


def test_cg_run_help_says_what_run_does_and_claims_no_drain(cs):
    about = jrun(cs, "help cg run")["data"]["commands"][0]["help"]
    assert "change recording" in about and "held acks" in about and "resume forming CGs" in about
    assert "and drain" not in about


# ---- fuzz ------------------------------------------------------------------

WORDS = st.sampled_from(["status", "cg", "start", "run", "fail", "bitmap", "show", "oos", "cr", "vol0",
                         "set", "cg_interval_s", "collision_policy", "--json", "--now", "fault", "arm",
                         "help", "0-5", "-1", "'", '"', "\\", "#", "after", "volume", "events"])
READ_ONLY = {"status", "help", "volume list", "volume show", "bitmap show", "cache stats", "link status",
             "events"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.one_of(st.text(max_size=200), st.lists(WORDS, max_size=6).map(" ".join),
                      st.binary(max_size=100).map(lambda b: b.decode("utf-8", errors="replace"))))
@example(line="# --json")  # found by the fuzz: a comment line answered "" although --json was on it
def test_fuzz_no_line_raises_and_refused_lines_change_nothing(line):
    fake = FakePrimary()
    cs = CommandSet(fake, allow_faults=True)
    before = controller_state(fake)
    reply = asyncio.run(cs.execute(line))
    assert isinstance(reply, Reply) and isinstance(reply.text, str)
    if reply.stream is not None:
        reply.stream.close()
    if not reply.ok or reply.command in READ_ONLY or reply.command is None:
        assert controller_state(fake) == before, line
    if "--json" in line.split() and len(line) <= MAX_LINE_CHARS:
        json.loads(reply.text)


def test_a_refused_command_is_one_line_not_a_traceback(caplog):
    """The console fuzz found `cg pause` on a Suspended primary logging a
    traceback (InvalidTransition through the catch-all): a refusal by the
    controller is an error reply, and the log holds no traceback."""
    import asyncio

    from firmware_doubles import make_rig

    from firmware.console import CommandSet

    async def main():
        rig = await make_rig(start=False)
        reply = await CommandSet(rig.primary).execute("cg pause")
        return reply

    with caplog.at_level("WARNING"):
        reply = asyncio.run(main())
    assert not reply.ok and "Suspended" in reply.text and "nothing to pause" in reply.text, reply.text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
