"""The console over real transports: a pty, a TCP socket and RFC 2217, with
pyserial on the other end (harness/console_client.py), and the
`mirrorfw console` command as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
from console_fakes import FAKE_POINT, FakePrimary, LoopThread, ctrl_c_as_in_a_terminal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.console import LineAssembler, serve_console
from firmware.console import MAX_LINE_CHARS, CommandSet
from hal.url import UrlError
from harness.console_client import (
    ConsoleClient,
    ConsoleCommandError,
    ConsoleConnectionError,
    ConsoleTimeout,
)
from harness.console_session import start_console

pytestmark = pytest.mark.timeout(60)

TRANSPORTS = ["pty", "socket", "rfc2217"]


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


class Console:
    def __init__(self, loop: LoopThread, kind: str, tmp: Path, *, allow_faults: bool = True) -> None:
        self.loop = loop
        self.fake = loop.call(FakePrimary)
        url = {"pty": f"pty://{tmp}/console", "socket": "socket://127.0.0.1:0",
               "rfc2217": "rfc2217://127.0.0.1:0"}[kind]
        self.server = loop.run(start_console(url, self.fake, allow_faults=allow_faults))
        self.url = self.server.url
        self.log_path = tmp / f"console-{kind}.log"
        self._shared: ConsoleClient | None = None

    def client(self, **kw) -> ConsoleClient:
        return ConsoleClient(self.url, timeout_s=10, log_path=self.log_path, **kw)

    def state(self) -> tuple:
        f = self.fake
        return self.loop.call(lambda: (list(f.calls), f.params.as_dict(), dict(f.crashpoints.armed),
                                       f.copy_state, f.cg_seq))

    def shared_client(self) -> ConsoleClient:
        if self._shared is None:
            self._shared = self.client()
        return self._shared

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        self.loop.run(self.server.close())


@pytest.fixture(params=TRANSPORTS)
def console(request, loop, tmp_path):
    c = Console(loop, request.param, tmp_path)
    yield c
    c.close()


@pytest.fixture
def tcp_console(loop, tmp_path):
    c = Console(loop, "socket", tmp_path)
    yield c
    c.close()


# ---- every command through each transport ---------------------------------

BANNER = "mirrorfw primary console \N{EM DASH} type help\r\n".encode()


def test_banner_and_prompt(console):
    if console.server.scheme == "pty":
        # Opened the way picocom does (pyserial flushes its input on open): the
        # banner, written when the server started, waits in the pty.
        fd = os.open(console.url[len("pty://"):], os.O_RDWR | os.O_NOCTTY)
        try:
            seen = b""
            while not seen.endswith(b"mirrorfw> "):
                seen += os.read(fd, 4096)
        finally:
            os.close(fd)
        assert seen == BANNER + b"mirrorfw> "
        return
    # Raw TCP, the way telnet or nc connect (pyserial's rfc2217 client purges its input on open).
    with socket.create_connection((console.server.host, console.server.port), timeout=10) as s:
        seen = b""
        while not seen.endswith(b"mirrorfw> "):
            seen += s.recv(4096)
    if console.server.scheme == "rfc2217":
        assert seen.startswith(b"\xff")  # telnet negotiation first (IAC WILL/DO ...)
        seen = seen[seen.index(b"mirrorfw"):]
    assert seen == BANNER + b"mirrorfw> "


def test_every_command_answers_over_the_transport(console):
    with console.client() as client:
        assert "cg start [--json]" in "\n".join(client.run_check("help"))
        status = client.run_json("status")
        assert status["ok"] and status["command"] == "status" and status["data"]["copy_state"] == "Running"
        client.run_check("cg pause")
        assert client.run_json("status")["data"]["copy_state"] == "Paused"
        client.run_check("cg resume")
        client.run_check("cg start")
        console.loop.call(console.fake.dirty, "vol0", 0, 8)
        assert client.run_json("bitmap show oos vol0 0-16")["data"]["map"] == "########........"
        assert client.run_json("cg run")["data"]["total_successful_cgs"] == 1
        assert client.run_json("bitmap show oos vol0")["data"]["count"] == 0
        client.run_check("cg fail 'operator test'")
        client.run_check("pair suspend")
        client.run_check("pair resume")
        assert [v["name"] for v in client.run_json("volume list")["data"]["volumes"]] == ["vol0", "vol1"]
        assert client.run_json("volume show vol1")["data"]["volume"]["tracks"] == 100
        assert client.run_json("cache stats")["data"]["slots"] == 1024
        assert client.run_json("link status")["data"]["link"] == "up"
        assert client.run_json("set max_drain_s 30")["data"]["value"] == 30.0
        client.run_check(f"fault arm {FAKE_POINT}")
        assert any(FAKE_POINT in line and "armed" in line for line in client.run_check("fault list"))
        client.run_check(f"fault disarm {FAKE_POINT}")
        assert client.run_json("log level warning firmware.console_transport_test")["data"]["level"] == "warning"
        lines = client.run_check("events --now")
        assert lines[0].startswith("exists session") and lines[-1] == "exists -"
    calls = [c[0] for c in console.fake.calls]
    assert calls == ["cg_pause", "cg_resume", "cg_start", "run", "cg_fail", "suspend", "resume_pair",
                     "set_param"]
    assert console.fake.params.max_drain_s == 30.0


def test_errors_come_back_as_errors(console):
    with console.client() as client:
        lines, status = client.run("frobnicate")
        assert status == 1 and lines == ["error: unknown command 'frobnicate'; type help"]
        with pytest.raises(ConsoleCommandError, match="missing VOLUME"):
            client.run_check("bitmap show oos")
        doc = client.run_json("volume show nope", check=False)
        assert doc == {"ok": False, "command": "volume show", "error": "no volume 'nope'; volumes: vol0, vol1"}
        with pytest.raises(ConsoleCommandError):
            client.run_json("set max_coord_ms 0")
        assert client.run_json("status")["ok"]  # the session goes on


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n", b"\r\x00"])
def test_line_endings_and_tabs(console, ending):
    with console.client() as client:
        client.send(b"\tstatus\t--json" + ending)
        client.expect("mirrorfw> ")
        docs = [json.loads(x) for x in client.before.decode().splitlines() if x.startswith("{")]
        assert docs and docs[0]["command"] == "status"
        client.send(b"help cg" + ending + b"volume list" + ending)  # two lines in one write
        client.expect("cg fail")
        client.expect("vol1")
        client.expect("mirrorfw> ")


def test_overlong_line_is_refused_and_the_session_continues(console):
    before = console.state()
    with console.client() as client:
        client.sendline("cg run " + "x" * (3 * MAX_LINE_CHARS))
        client.expect(f"error: line too long \\(more than {MAX_LINE_CHARS} characters\\)")
        client.expect("mirrorfw> ")
        assert client.run_json("status")["ok"]
    assert console.state() == before


def test_binary_garbage_is_refused(console):
    before = console.state()
    with console.client() as client:
        client.send(b"cg run\x00\xff\xfe\x1b[A\n")
        client.expect("error: line holds binary data")
        client.expect("mirrorfw> ")
        assert client.run_json("status")["ok"]
    assert console.state() == before


def test_backspace_edits_the_line(console):
    with console.client() as client:
        lines = client.run_check("statux\x7fs")
        assert lines[0].startswith("copy_state") or lines[1].startswith("copy_state")
        lines, status = client.run("cg run\x15status")  # Ctrl-U dropped "cg run"
        assert status == 0
    assert console.fake.calls == []


def test_events_stream_until_a_line_is_sent(console):
    with console.client() as client:
        client.sendline("events")
        client.expect("exists -\r\n")
        console.loop.run(console.fake.run())
        client.expect("create cg seq:1")
        client.expect("destroy cg seq:1 result:committed")
        client.sendline("")
        client.expect("mirrorfw> ")
        assert client.run_json("status")["data"]["cg_seq"] == 1
    assert console.loop.call(lambda: len(console.fake.events._subscribers)) == 0


def test_events_json_stream(tcp_console):
    with tcp_console.client() as client:
        client.sendline("events --json")
        client.expect(r'"command": "events"[^\n]*\n')
        tcp_console.loop.run(tcp_console.fake.cg_pause())
        client.expect(r'\{"event": [^\n]*\n')
        assert json.loads(client.after) == {"event": {"action": "change", "object": "session",
                                                      "fields": {"copy_state": "Paused"}}}
        client.sendline("")
        client.expect("mirrorfw> ")


# ---- sockets: several clients, vanishing clients ----------------------------

def test_several_tcp_clients_at_once(tcp_console):
    clients = [tcp_console.client() for _ in range(3)]
    try:
        for i, client in enumerate(clients):
            client.run_check(f"set cg_interval_s {i + 1}")
        for client in clients:
            assert client.run_json("status")["data"]["cg_interval_s"] == 3.0
    finally:
        for client in clients:
            client.close()


def test_client_vanishing_mid_line_leaves_the_controller_unchanged(tcp_console):
    before = tcp_console.state()
    for partial in (b"cg ru", b"set cg_interval_s 9", b"events", b"cg run" + b"y" * 10000):
        with socket.create_connection((tcp_console.server.host, tcp_console.server.port)) as s:
            s.sendall(partial)
    with socket.create_connection((tcp_console.server.host, tcp_console.server.port)) as s:
        s.sendall(b"events\n")  # vanish while streaming
    with tcp_console.client() as client:
        assert client.run_json("status")["ok"]
    assert tcp_console.state() == before
    assert tcp_console.loop.call(lambda: len(tcp_console.fake.events._subscribers)) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6))
def test_fuzz_random_bytes_over_tcp(tcp_console, chunks):
    """Random bytes: partial lines from vanishing clients change nothing; complete
    lines do exactly what the same lines do to a reference command set."""
    calls_before = len(tcp_console.state()[0])
    with socket.create_connection((tcp_console.server.host, tcp_console.server.port)) as s:
        for chunk in chunks:
            s.sendall(chunk.replace(b"\n", b"#").replace(b"\r", b"#"))  # never a complete line
    reference = FakePrimary()
    reference_cs = CommandSet(reference, allow_faults=True)
    assembler = LineAssembler()
    client = tcp_console.shared_client()  # one client for all examples (pyserial's close sleeps 0.3 s)
    for chunk in chunks:
        line = chunk.replace(b"\n", b" ").replace(b"\r", b" ").replace(b"\x03", b" ") + b"\n"
        client.send(line)
        client.expect("mirrorfw> ")
        for text in assembler.feed(line):
            reply = asyncio.run(reference_cs.execute(text))
            if reply.stream is not None:
                reply.stream.close()
    assert client.run_json("status")["ok"]
    assert tcp_console.state()[0][calls_before:] == reference.calls


def test_rfc2217_answers_port_settings(loop, tmp_path):
    c = Console(loop, "rfc2217", tmp_path)
    try:
        with c.client() as client:
            client.serial.baudrate = 9600  # an RFC 2217 SET-BAUDRATE the server must acknowledge
            client.serial.rts = False
            assert client.run_json("status")["ok"]
    finally:
        c.close()


# ---- pty specifics -------------------------------------------------------

def test_pty_link_survives_terminal_reattach(loop, tmp_path):
    c = Console(loop, "pty", tmp_path)
    try:
        link = tmp_path / "console"
        assert link.is_symlink() and os.readlink(link).startswith("/dev/pts/")
        for _ in range(3):
            with c.client() as client:
                assert client.run_json("status")["ok"]
    finally:
        c.close()
    assert not link.exists()


def test_pty_refuses_to_replace_a_regular_file(loop, tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(UrlError, match="not a symlink"):
        loop.run(serve_console(f"pty://{tmp_path}/taken", _idle))
    assert (tmp_path / "taken").read_text() == "mine"


async def _idle(port):
    await port.readline()


@pytest.mark.parametrize("url, message", [
    ("telnet://127.0.0.1:1", "unknown console scheme"),
    ("socket://127.0.0.1", "a port is needed"),
    ("socket://127.0.0.1:0?speed=9", "unknown option"),
    ("socket://127.0.0.1:0?echo=maybe", "echo='maybe'"),
    ("pty://relative/path", "pty:///absolute/path/link"),
])
def test_bad_console_urls(loop, url, message):
    with pytest.raises(UrlError, match=message):
        loop.run(serve_console(url, _idle))


def test_line_assembler_bounds_and_edits():
    echoed: list[str] = []
    asm = LineAssembler(max_line_chars=8, echo=echoed.append)
    assert asm.feed(b"abc") == []
    assert asm.feed(b"\x08d\r\nx" * 1) == ["abd"]
    assert asm.feed(b"y" * 100 + b"\n") == ["x" + "y" * 8]  # cut to max+1: the command layer refuses it
    assert asm.feed("é".encode()[:1]) == [] and asm.feed("é".encode()[1:] + b"\r") == ["é"]
    assert asm.feed(b"\xff\n") == ["\ufffd"]
    assert asm.feed(b"q\x03") == [""]
    assert "".join(echoed).startswith("abc\b \bd\r\n")


# ---- the client --------------------------------------------------------------

def test_expect_timeout_says_what_was_seen(tcp_console):
    with tcp_console.client() as client:
        client.sendline("help cg")
        with pytest.raises(ConsoleTimeout) as info:
            client.expect("never printed", timeout=0.3)
        assert b"cg start" in info.value.seen
        assert client.expect(["nope", "mirrorfw> "]) == 1


def test_client_connection_errors():
    with pytest.raises(ConsoleConnectionError):
        ConsoleClient(f"socket://127.0.0.1:{_free_port()}", timeout_s=2)
    with pytest.raises(ConsoleConnectionError):
        ConsoleClient("pty:///nonexistent/console", timeout_s=2)


def test_console_log_records_the_session(tcp_console):
    with tcp_console.client() as client:
        client.run_check("cache stats")
    log = tcp_console.log_path.read_bytes()
    assert b"cache stats\n" in log and b"hit_rate" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- `mirrorfw console` as a process -----------------------------------------

def mirrorfw(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "console", *args], input=stdin,
                          capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)


def test_cli_one_shot(console):
    ok = mirrorfw(console.url, "status", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["data"]["copy_state"] == "Running"
    bad = mirrorfw(console.url, "volume", "show", "nope")
    assert bad.returncode == 1 and bad.stdout.startswith("error: no volume 'nope'")
    run_ = mirrorfw(console.url, "cg run")
    assert run_.returncode == 0 and "cg run: done" in run_.stdout


def test_cli_connection_problem_exits_2():
    res = mirrorfw(f"socket://127.0.0.1:{_free_port()}", "status")
    assert res.returncode == 2 and "cannot open console" in res.stderr


def test_cli_script_from_stdin(tcp_console):
    res = mirrorfw(tcp_console.url, stdin="status\nset cg_interval_s 4\n\nfrob\nlink status\n")
    assert res.returncode == 1  # frob failed; the rest ran
    assert "copy_state" in res.stdout and "cg_interval_s = 4.0" in res.stdout
    assert "error: unknown command 'frob'" in res.stdout and "link" in res.stdout
    assert tcp_console.fake.params.cg_interval_s == 4.0


def test_serial_for_url_sees_a_plain_socket_console(tcp_console):
    # Raw pyserial, no harness client: what any lab script would do.
    port = serial.serial_for_url(tcp_console.url, timeout=0.1)
    try:
        port.write(b"status --json\n")
        deadline = time.monotonic() + 10
        seen = b""
        while b'"command": "status"' not in seen and time.monotonic() < deadline:
            seen += port.read(4096)
        assert b'"copy_state": "Running"' in seen
    finally:
        port.close()


def test_cli_events_stream_until_interrupted(tcp_console):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "console", tcp_console.url, "events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        lines = []
        while not lines or lines[-1] != "exists -":
            lines.append(proc.stdout.readline().rstrip("\n"))
        assert lines[0].startswith("exists session name:fake")
        tcp_console.loop.run(tcp_console.fake.run())
        assert proc.stdout.readline().rstrip("\n") == "create cg seq:1"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
    with tcp_console.client() as client:  # the session ended cleanly and the console goes on
        assert client.run_json("status")["data"]["cg_seq"] == 1
    bad = mirrorfw(tcp_console.url, "events", "--bogus")
    assert bad.returncode == 1 and "unknown option --bogus" in bad.stdout
