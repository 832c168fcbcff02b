"""Issue 16, console access: a token for TCP consoles (`auth TOKEN` first),
no bind beyond loopback without one, line assembly that cannot starve the
event loop, and a pty another program is attached to refused in one line."""

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
from console_fakes import FakePrimary, LoopThread

from drivers.console import DROP_AFTER_CHARS, serve_console
from hal.url import UrlError
from harness.console_client import ConsoleBusy, ConsoleClient, ConsoleError, attached_by
from harness.console_session import start_console

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def mirrorfw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "console", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture
def token_console(loop, tmp_path):
    token = tmp_path / "console.token"
    token.write_text("s3cr3t-t0ken\n")
    token.chmod(0o600)
    fake = loop.call(FakePrimary)
    server = loop.run(start_console(f"socket://127.0.0.1:0?token_file={token}", fake))
    yield server, token, fake
    loop.run(server.close())


def raw_session(server, first: bytes) -> bytes:
    """What a raw TCP client that sends ``first`` hears until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(first)
        seen = b""
        while chunk := s.recv(4096):
            seen += chunk
            if b"mirrorfw> " in seen:
                break
    return seen


def test_a_token_console_runs_nothing_before_auth(token_console):
    server, token, fake = token_console
    said = raw_session(server, b"pair suspend\n")
    assert b"needs a token" in said and b"mirrorfw> " not in said
    said = raw_session(server, b"auth wrong\npair suspend\n")
    assert b"needs a token" in said and b"mirrorfw> " not in said
    assert fake.calls == []  # the suspend never ran
    said = raw_session(server, b"\nauth s3cr3t-t0ken\n")
    assert b"mirrorfw> " in said


def test_clients_send_the_token(token_console):
    server, token, fake = token_console
    with ConsoleClient(server.url, timeout_s=10, token_file=token) as client:
        assert client.run_json("status")["ok"]
        assert client.run_json("auth again")["data"]["authorized"]
    with pytest.raises(ConsoleError):
        ConsoleClient(server.url, timeout_s=3).close()
    ok = mirrorfw("--token-file", str(token), server.url, "status", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["data"]["copy_state"] == "Running"
    bad = mirrorfw("--timeout", "5", server.url, "status")
    assert bad.returncode == 2 and "token" in bad.stderr, bad.stderr


def test_no_bind_beyond_loopback_without_a_token(loop, tmp_path):
    async def handler(port):
        return None

    with pytest.raises(UrlError, match="beyond loopback.*token"):
        loop.run(serve_console("socket://0.0.0.0:0", handler))
    (tmp_path / "t").write_text("tok")
    with pytest.raises(UrlError, match="not a regular file"):
        loop.run(serve_console("socket://127.0.0.1:0?token_file=/dev/zero", handler))


def test_streaming_without_a_newline_cannot_starve_the_loop(loop):
    """Two clients send bytes with no line end as fast as they can: a
    ticker on the controller's loop keeps its pace, each flooder is cut
    off, and a good client is served meanwhile."""
    fake = loop.call(FakePrimary)
    server = loop.run(start_console("socket://127.0.0.1:0", fake))
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    tick = asyncio.run_coroutine_threadsafe(ticker(), loop.loop)
    cut_off = []

    def flood():
        with socket.create_connection((server.host, server.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            blob = b"x" * 65536
            try:
                for _ in range(2000):  # 128 MiB, far past the cut-off
                    s.sendall(blob)
            except OSError:
                seen = b""
                try:
                    while chunk := s.recv(65536):
                        seen += chunk
                except OSError:
                    pass
                cut_off.append(seen)

    import threading
    floods = [threading.Thread(target=flood) for _ in range(2)]
    for t in floods:
        t.start()
    try:
        with ConsoleClient(server.url, timeout_s=20) as client:
            for _ in range(5):
                assert client.run_json("status")["ok"]
        for t in floods:
            t.join(60)
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        tick.result(10)
        loop.run(server.close())
    assert len(cut_off) == 2, "a flooder was never cut off"
    assert all(b"without a line end" in seen for seen in cut_off), cut_off
    lags.sort()
    assert lags and lags[-1] < 0.25, f"loop stalled {lags[-1]:.3f} s (p50 {lags[len(lags) // 2]:.4f} s)"
    assert DROP_AFTER_CHARS >= 4 * 4096  # an overlong command line still gets its own reply


@pytest.fixture
def pty_console(loop, tmp_path):
    fake = loop.call(FakePrimary)
    server = loop.run(start_console(f"pty://{tmp_path}/console", fake))
    yield server, tmp_path / "console"
    loop.run(server.close())


def test_a_pty_with_a_terminal_attached_is_refused_in_one_line(pty_console):
    server, link = pty_console
    assert attached_by(str(link)) == []  # the controller holding it is not "another program"
    ok = mirrorfw(server.url, "status", "--json")
    assert ok.returncode == 0, ok.stderr
    terminal = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                                 f"fd = os.open({str(link)!r}, os.O_RDWR | os.O_NOCTTY)\n"
                                 "print('attached', flush=True)\ntime.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert terminal.stdout.readline().strip() == "attached"
        assert [pid for pid, _ in attached_by(str(link))] == [terminal.pid]
        with pytest.raises(ConsoleBusy, match=f"busy: .*attached by .*pid {terminal.pid}"):
            ConsoleClient(server.url, timeout_s=5)
        res = mirrorfw("--timeout", "5", server.url, "status", "--json")
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"busy: console {server.url} is attached by" in lines[0], res.stderr
        assert "[^" not in res.stderr  # no raw regex
    finally:
        terminal.kill()
        terminal.wait()
    ok = mirrorfw(server.url, "status", "--json")  # detached: works again
    assert ok.returncode == 0, ok.stderr


def test_the_client_holds_the_pty_lock_while_it_runs(pty_console):
    import fcntl

    server, link = pty_console
    with ConsoleClient(server.url, timeout_s=10) as client:
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            with pytest.raises(BlockingIOError):  # what picocom's flock would meet
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert client.run_json("status")["ok"]
