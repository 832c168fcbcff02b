"""A primary/secondary pair as real processes with consoles, for the
crash, link and load parts: start, restart, status, pause around C checks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from harness.console_client import ConsoleClient
from harness.supervise import ControllerProcess, start_controller, write_pair_configs

log = logging.getLogger(__name__)

VOLUME_SIZE = "8MiB"
VOLUME_BYTES = 8 << 20
TRACK_BYTES = 65536


class ProcessPair:
    def __init__(self, workdir: Path, *, size: str = VOLUME_SIZE, nvram_size: str = "32MiB") -> None:
        self.configs = write_pair_configs(workdir, size=size, nvram_size=nvram_size, console=True)
        self.procs: dict[str, ControllerProcess] = {}
        self._consoles: dict[str, ConsoleClient] = {}

    def start(self, role: str, *, format: bool = False, crashpoints: str | None = None) -> ControllerProcess:
        path = self.configs.primary if role == "primary" else self.configs.secondary
        self.drop_console(role)
        proc = start_controller(path, format=format, crashpoints=crashpoints, verbose=0)
        self.procs[role] = proc
        return proc

    def start_both(self) -> None:
        self.start("secondary", format=True)
        self.start("primary", format=True)

    def nbd_url(self, role: str = "primary") -> str:
        return f"nbd://{self.procs[role].ready['nbd']}/vol0"

    def console(self, role: str) -> ConsoleClient:
        if role not in self._consoles:
            self._consoles[role] = ConsoleClient(self.procs[role].ready["console"], timeout_s=20.0)
        return self._consoles[role]

    def drop_console(self, role: str) -> None:
        client = self._consoles.pop(role, None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - the peer may be dead already
                pass

    def status(self) -> dict:
        return self.console("primary").run_json("status")["data"]

    def wait_caught_up(self, timeout_s: float = 60.0, *, after_cgs: int | None = None) -> dict:
        """Until nothing is out of sync and a CG has committed since ``after_cgs``."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if (not st["oos_tracks"] and not st["cr_tracks"] and st["phase"] == "idle"
                    and (after_cgs is None or st["total_successful_cgs"] > after_cgs)):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"not caught up after {timeout_s} s: copy_state {st['copy_state']}, "
                                   f"oos {st['oos_tracks']}, cr {st['cr_tracks']}, phase {st['phase']}, "
                                   f"reason {st.get('fatal_reason')!r}")
            time.sleep(0.1)

    def pause(self, timeout_s: float = 30.0) -> None:
        con = self.console("primary")
        con.run_json("cg pause", check=False)
        deadline = time.monotonic() + timeout_s
        while self.status()["copy_state"] not in ("Paused", "Suspended", "Fatal"):
            if time.monotonic() > deadline:
                raise TimeoutError("CG formation did not pause")
            time.sleep(0.05)

    def resume(self) -> None:
        self.console("primary").run_json("cg resume", check=False)

    def close(self) -> None:
        for role in list(self._consoles):
            self.drop_console(role)
        for proc in self.procs.values():
            if proc.alive():
                proc.kill()
