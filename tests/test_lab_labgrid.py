"""labgrid integration (harness/lab): the console driver on labgrid's serial
resources and the strategy (off -> formatted -> replicating).

The whole lab path runs locally: labgrid's own coordinator and exporter on
127.0.0.1, the exporter publishing a real primary's RFC 2217 console as a
NetworkSerialPort (harness/lab/exporter.example.yaml), ``labgrid-client``
creating and acquiring the place, and harness/lab/env.example.yaml's
target driven to ``replicating`` through it. The driver alone is also
tried on a RawSerialPort (a pty) and a raw-TCP NetworkSerialPort.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from console_fakes import FakePrimary, LoopThread

pytest.importorskip("labgrid", reason="labgrid is the lab extra: pip install -e '.[lab]'")

from labgrid import Environment, Target  # noqa: E402
from labgrid.binding import BindingState  # noqa: E402
from labgrid.resource import NetworkSerialPort, RawSerialPort  # noqa: E402
from labgrid.strategy import StrategyError  # noqa: E402

from harness.console_session import start_console  # noqa: E402
from harness.lab import MirrorfwConsoleDriver, MirrorfwStrategy, Status, console_url  # noqa: E402
from harness.pytest_plugin import start_pair  # noqa: E402
from harness.supervise import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(240)
LAB = Path(__file__).resolve().parent.parent / "harness" / "lab"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def local_target(kind: str, url: str) -> Target:
    target = Target(f"local-{kind}")
    if kind == "pty":
        RawSerialPort(target, name=None, port=url[len("pty://"):])
    else:
        host_port = url.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        NetworkSerialPort(target, name=None, host=host, port=int(port),
                          protocol="rfc2217" if kind == "rfc2217" else "raw")
    MirrorfwConsoleDriver(target, name=None, timeout=10.0)
    MirrorfwStrategy(target, name=None, ready_timeout=10.0)
    return target


@pytest.mark.parametrize("kind", ["pty", "socket", "rfc2217"])
def test_strategy_walks_the_states_on_a_local_serial_resource(loop, tmp_path, kind):
    fake = loop.call(FakePrimary)
    url = {"pty": f"pty://{tmp_path}/console", "socket": "socket://127.0.0.1:0",
           "rfc2217": "rfc2217://127.0.0.1:0"}[kind]
    server = loop.run(start_console(url, fake))
    target = local_target(kind, server.url)
    try:
        strategy = target.get_driver("MirrorfwStrategy")
        console = target.get_driver("MirrorfwConsoleDriver", activate=False)
        assert console_url(console.port) == server.url
        strategy.transition("formatted")
        assert console.status()["copy_state"] == "Suspended"
        strategy.transition("replicating")
        assert strategy.status is Status.replicating
        status = console.status()
        assert (status["copy_state"], status["total_successful_cgs"]) == ("Running", 1)
        assert console.run("set cg_interval_s 2") == (["cg_interval_s = 2.0"], [], 0)
        strategy.transition("off")
        assert console.state is not BindingState.active
        # From off, replicating goes through formatted again: suspend, resume, a CG.
        strategy.transition(Status.replicating)
        calls = [c[0] for c in loop.call(lambda: list(fake.calls)) if c[0] != "set_param"]
        assert calls == ["suspend", "resume_pair", "run", "suspend", "resume_pair", "run"]
        with pytest.raises(StrategyError):
            strategy.transition("unknown")
    finally:
        target.cleanup()
        loop.run(server.close())


# -- the lab path: coordinator, exporter, labgrid-client, RemotePlace -------------------
class Daemon:
    """A labgrid daemon this test started; its output kept for the failure message."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str], ready: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self._ready = threading.Event()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not self._ready.wait(60):
            self.stop()
            raise AssertionError(f"{name} not ready:\n" + "".join(self.lines[-40:]))

    def _pump(self, ready: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if ready in line:
                self._ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def client(coordinator: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "labgrid-client"), "-x", coordinator, *args], capture_output=True,
                          text=True, timeout=60)
    if check and proc.returncode:
        raise AssertionError(f"labgrid-client {' '.join(args)}: {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


@pytest.mark.slow
def test_lab_place_through_the_coordinator_reaches_replicating(tmp_path, monkeypatch):
    for tool in ("labgrid-coordinator", "labgrid-exporter", "labgrid-client"):
        assert (BIN / tool).exists() or shutil.which(tool), f"{tool} missing (labgrid installed without scripts?)"
    pair = start_pair(tmp_path / "pair", console="rfc2217", consoles=False)
    daemons: list[Daemon] = []
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, MIRRORFW_CONSOLE_PORT=pair.primary.ready["console"].rsplit(":", 1)[1],
               LG_COORDINATOR=coordinator)
    lab_env = None
    try:
        (tmp_path / "coordinator").mkdir()  # it keeps its places and reservations in its folder
        daemons.append(Daemon("coordinator", [str(BIN / "labgrid-coordinator"), "-l", coordinator],
                              tmp_path / "coordinator", env, "listening on"))
        shutil.copy(LAB / "exporter.example.yaml", tmp_path / "exporter.yaml")
        daemons.append(Daemon("exporter", [str(BIN / "labgrid-exporter"), "-c", coordinator, "--name", "lab1",
                                           "--hostname", "127.0.0.1", str(tmp_path / "exporter.yaml")],
                              tmp_path, env, "connected to coordinator"))
        deadline = time.monotonic() + 30
        while "lab1/mirrorfw-primary/NetworkSerialPort" not in client(coordinator, "resources").stdout:
            assert time.monotonic() < deadline, "".join(daemons[-1].lines[-40:])
            time.sleep(0.2)
        place = ["-p", "mirrorfw-primary"]
        client(coordinator, *place, "create")
        client(coordinator, *place, "add-match", "lab1/mirrorfw-primary/NetworkSerialPort")
        client(coordinator, *place, "acquire")

        monkeypatch.setenv("LG_COORDINATOR", coordinator)
        lab_env = Environment(config_file=str(LAB / "env.example.yaml"))
        target = lab_env.get_target("main")
        strategy = target.get_driver("MirrorfwStrategy")
        strategy.transition("replicating")
        console = target.get_driver("MirrorfwConsoleDriver")
        assert console_url(console.port) == pair.primary.ready["console"]
        status = console.status()
        assert (status["copy_state"], status["link"]) == ("Running", "up")
        assert status["total_successful_cgs"] >= 1
        shown = client(coordinator, *place, "show").stdout
        assert "acquired resources:" in shown and "NetworkSerialPort/console" in shown
        strategy.transition("off")
    finally:
        if lab_env is not None:
            lab_env.cleanup()
        if daemons:
            client(coordinator, "-p", "mirrorfw-primary", "release", check=False)
        for daemon in reversed(daemons):
            daemon.stop()
        codes = pair.stop()
    assert codes == {"primary": 0, "secondary": 0}
