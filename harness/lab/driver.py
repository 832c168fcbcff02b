"""``MirrorfwConsoleDriver``: a controller's console as a labgrid driver.

It binds to labgrid's ``RawSerialPort`` (a local line: a pty's symlink or a
device path) or ``NetworkSerialPort`` (a console exported from another lab
server, ``rfc2217`` or ``raw`` TCP) and talks through
harness.console_client, which already speaks the controller's prompt, echo
and ``--json`` replies. ``run``/``run_check`` have the shape of labgrid's
CommandProtocol (stdout lines, stderr lines, exit code), without claiming
it: a controller console is not a shell (no ``wait_for``, no exit codes
beyond ok/error). ``run_json`` and ``status`` are the controller's own.
"""

from __future__ import annotations

import attr
from labgrid.driver.common import Driver
from labgrid.driver.exception import ExecutionError
from labgrid.factory import target_factory
from labgrid.resource import NetworkSerialPort, SerialPort
from labgrid.step import step
from labgrid.util.proxy import proxymanager

from harness.console_client import ConsoleClient


def console_url(port) -> str:
    """The console_client URL for a labgrid serial resource."""
    if isinstance(port, SerialPort):  # RawSerialPort: a path on this host
        return port.port if "://" in port.port else f"pty://{port.port}"
    if isinstance(port, NetworkSerialPort):
        host, tcp_port = proxymanager.get_host_and_port(port)  # an SSH forward if the exporter needs one
        host = f"[{host}]" if ":" in host else host
        if port.protocol == "rfc2217":
            return f"rfc2217://{host}:{tcp_port}"
        if port.protocol == "raw":
            return f"socket://{host}:{tcp_port}"
        raise ExecutionError(f"NetworkSerialPort protocol {port.protocol!r}: expected rfc2217 or raw")
    raise ExecutionError(f"cannot reach a console through {type(port).__name__}")


@target_factory.reg_driver
@attr.s(eq=False)
class MirrorfwConsoleDriver(Driver):
    """A mirrorfw controller console (primary or secondary)."""

    bindings = {"port": {"SerialPort", "NetworkSerialPort"}}

    timeout = attr.ib(default=20.0, validator=attr.validators.instance_of(float))
    token_file = attr.ib(default=None, validator=attr.validators.optional(attr.validators.instance_of(str)))
    log_path = attr.ib(default=None, validator=attr.validators.optional(attr.validators.instance_of(str)))

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.client: ConsoleClient | None = None

    def on_activate(self) -> None:
        self.client = ConsoleClient(console_url(self.port), timeout_s=self.timeout,
                                    token_file=self.token_file, log_path=self.log_path)

    def on_deactivate(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    @Driver.check_active
    @step(args=["cmd"], result=True)
    def run(self, cmd: str, *, timeout: float | None = None) -> tuple[list[str], list[str], int]:
        lines, status = self.client.run(cmd, timeout)
        return lines, [], status

    @Driver.check_active
    def run_check(self, cmd: str, *, timeout: float | None = None) -> list[str]:
        lines, _, status = self.run(cmd, timeout=timeout)
        if status:
            raise ExecutionError(cmd, lines, [])
        return lines

    @Driver.check_active
    @step(args=["cmd"])
    def run_json(self, cmd: str, *, timeout: float | None = None, check: bool = True) -> dict:
        return self.client.run_json(cmd, timeout, check=check)

    @Driver.check_active
    def status(self) -> dict:
        """``status --json``'s data."""
        return self.run_json("status")["data"]
