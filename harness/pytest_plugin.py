"""pytest plugin (entry point ``mirrorfw``).

- ``--hil-device=URL`` runs the device contract suite on a real lab device
  (read-only unless ``--hil-destructive``).
- ``mirrorfw_pair``: a primary and a secondary started as processes on
  temporary files (harness/supervise.py), their addresses and console
  clients; stopped (SIGTERM, clean exit checked) after the test.
- ``mirrorfw_console``: a console client attached to the running controller
  ``--mirrorfw-console URL`` names (pty://, socket://, rfc2217://); the
  tests that use it skip when no URL is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.console_client import ConsoleClient
from harness.supervise import ControllerProcess, PairConfigs, start_controller, write_pair_configs

LINK_UP_TIMEOUT_S = 30.0


def pytest_addoption(parser) -> None:
    group = parser.getgroup("mirrorfw")
    group.addoption("--hil-device", action="append", default=[], metavar="URL",
                    help="also run the device contract suite on this device URL")
    group.addoption("--hil-destructive", action="store_true",
                    help="allow the contract suite to write to --hil-device devices")
    group.addoption("--mirrorfw-console", default=None, metavar="URL",
                    help="console of a running controller for the mirrorfw_console fixture "
                         "(pty:///path, socket://HOST:PORT, rfc2217://HOST:PORT; default: none, "
                         "its tests skip)")
    group.addoption("--mirrorfw-console-token-file", default=None, metavar="FILE",
                    help="token file for a --mirrorfw-console that has one (default: none)")


@pytest.fixture(scope="session")
def hil_devices(request) -> list[str]:
    """The --hil-device URLs (may be empty)."""
    return list(request.config.getoption("hil_device"))


@pytest.fixture(scope="session")
def hil_destructive(request) -> bool:
    """True when --hil-destructive allows writing to the --hil-device devices."""
    return bool(request.config.getoption("hil_destructive"))


@dataclass
class Pair:
    """A running pair: configs, processes, addresses from their ready lines, consoles."""

    configs: PairConfigs
    primary: ControllerProcess
    secondary: ControllerProcess
    consoles: dict[str, ConsoleClient] = field(default_factory=dict)

    @property
    def addresses(self) -> dict[str, dict[str, str]]:
        """role -> the ready line's fields (nbd, console, link or link_peer, ...)."""
        return {"primary": dict(self.primary.ready), "secondary": dict(self.secondary.ready)}

    def nbd_url(self, volume: str = "vol0", role: str = "primary") -> str:
        return f"nbd://{self.addresses[role]['nbd']}/{volume}"

    def stop(self) -> dict[str, int]:
        """Close the consoles, stop both (primary first); their exit codes."""
        for client in self.consoles.values():
            client.close()
        self.consoles.clear()
        codes = {}
        for proc in (self.primary, self.secondary):
            try:
                codes[proc.role] = proc.stop()
            finally:
                if proc.alive():
                    proc.kill()
        return codes


def start_pair(workdir: str | Path, *, console: str = "socket", consoles: bool = True, **config) -> Pair:
    """Format and start a pair on file:// volumes in ``workdir`` (``config``:
    write_pair_configs' keywords); ``console``: socket, rfc2217 or pty for both
    consoles; ``consoles``: open a client on each."""
    if console not in ("socket", "rfc2217", "pty"):
        raise ValueError(f"console {console!r}: expected socket, rfc2217 or pty")
    cfg = write_pair_configs(workdir, console=True, **config)
    for role, path in (("primary", cfg.primary), ("secondary", cfg.secondary)):
        url = f"pty://{cfg.workdir}/{role}.console" if console == "pty" else f"{console}://127.0.0.1:0"
        path.write_text(path.read_text().replace('url = "socket://127.0.0.1:0"', f'url = "{url}"', 1))
    secondary = start_controller(cfg.secondary, format=True, verbose=0)
    try:
        primary = start_controller(cfg.primary, format=True, verbose=0)
    except BaseException:
        secondary.kill()
        raise
    pair = Pair(cfg, primary, secondary)
    try:
        if consoles:
            for proc in (primary, secondary):
                pair.consoles[proc.role] = ConsoleClient(proc.ready["console"], timeout_s=20.0)
            # "ready" is printed before the primary's link connects: a pair is
            # handed over replicating, its link up (a test that asserted it
            # right away failed in a loaded CI run).
            deadline = time.monotonic() + LINK_UP_TIMEOUT_S
            while (link := pair.consoles["primary"].run_json("status")["data"]["link"]) != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pair's link is {link!r}, not up, {LINK_UP_TIMEOUT_S:g} s after start\n"
                                       f"{primary.tail()}\n{secondary.tail()}")
                time.sleep(0.05)
    except BaseException:
        pair.stop()
        raise
    return pair


@pytest.fixture
def mirrorfw_pair(tmp_path) -> Iterator[Pair]:
    """A formatted pair on temp files: ``.addresses``, ``.consoles["primary"|"secondary"]``,
    ``.primary``/``.secondary`` (the processes). Both must exit cleanly at the end."""
    pair = start_pair(tmp_path / "mirrorfw-pair")
    try:
        yield pair
    finally:
        codes = pair.stop()
    assert codes == {"primary": 0, "secondary": 0}, (
        f"unclean exit {codes}\n{pair.primary.tail()}\n{pair.secondary.tail()}")


@pytest.fixture
def mirrorfw_console(request) -> Iterator[ConsoleClient]:
    """A console client on the controller ``--mirrorfw-console URL`` names."""
    url = request.config.getoption("mirrorfw_console")
    if not url:
        pytest.skip("no --mirrorfw-console URL given")
    client = ConsoleClient(url, timeout_s=20.0, token_file=request.config.getoption("mirrorfw_console_token_file"))
    try:
        yield client
    finally:
        client.close()
