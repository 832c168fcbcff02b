"""Run controllers as real processes: start from a config, wait for the
``ready`` line, stop with SIGTERM or kill with SIGKILL, collect the logs.

Used by the process tests and by ``mirrorfw demo``::

    pair = write_pair_configs(workdir)                 # secondary + primary configs, secret, link port
    sec = start_controller(pair.secondary, format=True)
    pri = start_controller(pair.primary, format=True)
    ... pri.ready["nbd"] ...
    pri.kill(); pri = start_controller(pair.primary)   # recovery from NVRAM

    session = write_session_configs(workdir, controllers=3)   # c0 master, c1 and c2 subordinates
    ... session.pairs[i].primary / .secondary, session.control_ports[i] ...
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 60.0


class SupervisorError(RuntimeError):
    """A controller did not start or stop as expected; the message ends with its log tail."""


@dataclass
class ControllerProcess:
    role: str
    config: Path
    proc: subprocess.Popen
    log_path: Path
    ready: dict[str, str] = field(default_factory=dict)
    _pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise SupervisorError(f"{self.role} pid {self.pid} still running after {timeout_s} s\n{self.tail()}") from None
        if self._pump is not None:
            self._pump.join(5)
        return code

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: a clean shutdown returns 0."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int:
        """SIGKILL and wait: what a crash looks like."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        return self.wait(10.0)


def _pump_output(stream, log, first_lines: list[str], got_ready: threading.Event) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        log.write(f"[stdout] {line}")
        log.flush()
        if not got_ready.is_set():
            first_lines.append(line)
            if line.startswith("ready"):
                got_ready.set()
    stream.close()


def parse_ready(line: str) -> dict[str, str]:
    fields = {}
    for word in line.split()[1:]:
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return fields


def config_role(config: Path) -> str:
    with open(config, "rb") as f:
        return tomllib.load(f).get("role", "")


def start_controller(
    config: str | Path,
    *,
    format: bool = False,
    env: dict[str, str] | None = None,
    crashpoints: str | None = None,
    log_path: str | Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    verbose: int = 1,
) -> ControllerProcess:
    """Start ``mirrorfw ROLE --config FILE`` and wait for its ready line."""
    config = Path(config).resolve()
    role = config_role(config)
    if role not in ("primary", "secondary"):
        raise SupervisorError(f"{config}: role {role!r} is not primary or secondary")
    log_path = Path(log_path) if log_path else config.with_suffix(f".{role}.log")
    cmd = [sys.executable, "-m", "harness.cli"] + (["-" + "v" * verbose] if verbose else [])
    cmd += [role, "--config", str(config)] + (["--format"] if format else [])
    child_env = dict(os.environ if env is None else env)
    child_env.pop("MIRRORFW_CRASHPOINTS", None)
    if crashpoints:
        child_env["MIRRORFW_CRASHPOINTS"] = crashpoints
    child_env["PYTHONUNBUFFERED"] = "1"
    log = open(log_path, "a")
    log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=child_env)
    first: list[str] = []
    got_ready = threading.Event()
    pump = threading.Thread(target=_pump_output, args=(proc.stdout, log, first, got_ready), daemon=True)
    pump.start()
    cp = ControllerProcess(role, config, proc, log_path, _pump=pump)
    deadline = time.monotonic() + ready_timeout_s
    while not got_ready.wait(0.05):
        if proc.poll() is not None:
            pump.join(2)
            raise SupervisorError(f"{role} exited with status {proc.returncode} before ready\n{cp.tail()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SupervisorError(f"{role} not ready after {ready_timeout_s} s\n{cp.tail()}")
    cp.ready = parse_ready(first[-1])
    return cp


# -- configs for a pair on one host ---------------------------------------------------


@dataclass
class PairConfigs:
    workdir: Path
    primary: Path
    secondary: Path
    volumes: list[str]
    size: str
    text: dict[str, str] = field(default_factory=dict)

    def image(self, kind: str, volume: str) -> Path:
        """The backing file of volume A, B or C."""
        return self.workdir / f"{kind.lower()}-{volume}.img"

    def set_peer(self, address: str) -> None:
        """Point the primary at another address (a fault proxy, say)."""
        text = self.primary.read_text()
        start = text.index("peer = ")
        end = text.index("\n", start)
        self.primary.write_text(text[:start] + f'peer = "{address}"' + text[end:])


def write_secret(path: Path, secret: bytes) -> None:
    """Write a secret readable by its owner only (0600 even if the file was there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret)
    finally:
        os.close(fd)


def write_pair_configs(
    workdir: str | Path,
    *,
    volumes: tuple[str, ...] = ("vol0",),
    size: str = "8MiB",
    nvram_size: str = "16MiB",
    session: dict[str, object] | None = None,
    secret: bytes | None = None,
    console: bool = False,
    allow_faults: bool = True,
    nbd_socket: bool = False,
    link_port: int | None = None,
    metrics: bool = False,
) -> PairConfigs:
    """Configs for a primary and a secondary on file:// volumes in ``workdir``.

    The link secret is ``secret``, or a new random one (never a string
    anyone can read in this file); either way the secret file is mode 0600.
    ``allow_faults`` turns on the consoles' fault commands (the fault
    tools arm crash points through them; the demo does not). ``metrics``:
    a ``[metrics]`` listener on each (port 0; the ready line's ``metrics``).

    The link port is a free one below the ephemeral range (so a primary
    reconnecting while the secondary is down cannot take it by a TCP
    self-connect); host and console ports are 0 (any free port, read from
    the ready line)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    write_secret(workdir / "secret", secret if secret is not None else secrets.token_hex(32).encode() + b"\n")
    session_lines = "\n".join(f"{k} = {_toml(v)}" for k, v in (session or {}).items())

    def head(role: str) -> str:
        return (f'role = "{role}"\n[session]\nid = "test"\nsecret_file = "secret"\n{session_lines}\n'
                f'[nvram]\nurl = "nvram://{workdir}/{role}.nvram?size={nvram_size}"\n')

    p = head("primary")
    s = head("secondary")
    for name in volumes:
        p += f'[[volume]]\nname = "{name}"\nurl = "file://{workdir}/a-{name}.img?size={size}"\n'
        s += (f'[[volume]]\nname = "{name}"\nb_url = "file://{workdir}/b-{name}.img?size={size}"\n'
              f'c_url = "file://{workdir}/c-{name}.img?size={size}"\n')
    port = free_port() if link_port is None else link_port
    p += f'[link]\npeer = "127.0.0.1:{port}"\n[host]\nlisten = "127.0.0.1:0"\n'
    s += f'[link]\nlisten = "127.0.0.1:{port}"\n[host]\nlisten = "127.0.0.1:0"\n'
    if nbd_socket:
        p += f'socket = "{workdir}/primary-nbd.sock"\n'
    if console:
        faults = "true" if allow_faults else "false"
        p += f'[console]\nurl = "socket://127.0.0.1:0"\nallow_faults = {faults}\n'
        s += f'[console]\nurl = "socket://127.0.0.1:0"\nallow_faults = {faults}\n'
    if metrics:
        p += '[metrics]\nlisten = "127.0.0.1:0"\n'
        s += '[metrics]\nlisten = "127.0.0.1:0"\n'
    primary = workdir / "primary.toml"
    secondary = workdir / "secondary.toml"
    primary.write_text(p)
    secondary.write_text(s)
    return PairConfigs(workdir, primary, secondary, list(volumes), size, {"primary": p, "secondary": s})


@dataclass
class SessionConfigs:
    """One multi-controller session: controller 0 is the master, the rest subordinates."""

    workdir: Path
    pairs: list[PairConfigs]  # pairs[i]: controller i's primary and its secondary
    control_ports: list[int | None]  # the port each subordinate's master connects to (None: the master)

    @property
    def master(self) -> PairConfigs:
        return self.pairs[0]

    @property
    def subordinates(self) -> list[PairConfigs]:
        return self.pairs[1:]


def write_session_configs(
    workdir: str | Path,
    *,
    controllers: int = 3,
    volumes: tuple[str, ...] = ("vol0",),
    size: str = "8MiB",
    nvram_size: str = "16MiB",
    session: dict[str, object] | None = None,
    secret: bytes = b"mirrorfw-test-secret\n",
    console: bool = False,
    allow_faults: bool = True,
    metrics: bool = False,
) -> SessionConfigs:
    """Configs for ``controllers`` primary+secondary pairs in one session, each
    pair in ``workdir/c<i>`` as ``write_pair_configs`` makes them: controller 0
    the master (``[session] master = true``, ``subordinates``), the others
    subordinates (``[control] listen`` on a free port below the ephemeral
    range, so a master reconnecting while one is down cannot take it). All
    share the session id and the secret; ``allow_faults`` as in
    ``write_pair_configs``."""
    if controllers < 1:
        raise ValueError(f"controllers={controllers}: a session needs at least one")
    workdir = Path(workdir).resolve()
    pairs = [write_pair_configs(workdir / f"c{i}", volumes=volumes, size=size, nvram_size=nvram_size,
                                session=session, secret=secret, console=console, allow_faults=allow_faults,
                                metrics=metrics)
             for i in range(controllers)]
    ports: list[int | None] = [None]
    while len(ports) < controllers:
        port = free_port()
        if port not in ports and all(port != _link_port(pair) for pair in pairs):
            ports.append(port)
    marker = 'secret_file = "secret"\n'
    addresses = ", ".join(f'"127.0.0.1:{port}"' for port in ports[1:])
    secondaries = ", ".join(f'"127.0.0.1:{_link_port(pair)}"' for pair in pairs[1:])
    for i, pair in enumerate(pairs):
        text = pair.primary.read_text()
        if i == 0:
            text = text.replace(marker, f"{marker}master = true\nsubordinates = [{addresses}]\n"
                                        f"secondaries = [{secondaries}]\n", 1)
        else:
            text += f'[control]\nlisten = "127.0.0.1:{ports[i]}"\n'
        pair.primary.write_text(text)
        pair.text["primary"] = text
        # Every secondary is a session member: a prepared CG stays in doubt for session recover.
        text = pair.secondary.read_text().replace(marker, f"{marker}member = true\n", 1)
        pair.secondary.write_text(text)
        pair.text["secondary"] = text
    return SessionConfigs(workdir, pairs, ports)


def _link_port(pair: PairConfigs) -> int:
    text = pair.text["secondary"]
    start = text.index('listen = "127.0.0.1:') + len('listen = "127.0.0.1:')
    return int(text[start : text.index('"', start)])


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A port on 127.0.0.1 that is free now, outside the ephemeral range."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SupervisorError(f"no free port in {low}..{high}")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
