"""``mirrorfw demo``: the main job on embedded defaults (``make run``).

Builds file-backed volumes and NVRAM in a work folder, starts a secondary
and a primary as processes (the way a user starts them: ``mirrorfw
secondary|primary --config FILE``), replays a bundled trace through the
primary's NBD host port while CGs cycle, checks the secondary's consistent
copy C again and again while the replay runs (CG formation paused around
each read so C is not replaced under it), then prints the report and where
the plots and JSON are. Exit 0 only when every check passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from harness.console_client import ConsoleClient, ConsoleError
from harness.supervise import start_controller, write_pair_configs

log = logging.getLogger(__name__)

PAUSE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0


def bundled_trace() -> str:
    return str(resources.files("testbench") / "data" / "demo.iolog")


def add_arguments(p) -> None:
    p.add_argument("--workdir", default="work", help="folder for images, NVRAM, configs, logs and the report (default: work)")
    p.add_argument("--trace", default=None, help="trace to replay (default: the bundled 60 s fio iolog, 2 devices)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format when it cannot be detected (see `mirrorfw trace --help`)")
    p.add_argument("--volumes", type=int, default=2, help="number of volumes in the session (default 2)")
    p.add_argument("--size", default="64MiB", help="size of each volume (default 64MiB; trace offsets wrap modulo it)")
    p.add_argument("--nvram-size", default="64MiB", help="NVRAM (write cache and bitmaps) per controller (default 64MiB)")
    p.add_argument("--timing", default="original", help="afap, original, or scale=X (default original)")
    p.add_argument("--queue-depth", type=int, default=16, help="replay queue depth (default 16)")
    p.add_argument("--check-every-s", type=float, default=5.0, help="check C this often while the replay runs (default 5)")
    p.add_argument("--cg-interval-s", type=float, default=0.5, help="CG interval (default 0.5 s)")
    p.add_argument("--max-coord-ms", type=float, default=50.0, help="maximum coordination time (default 50 ms)")
    p.add_argument("--max-drain-s", type=float, default=30.0, help="maximum drain time (default 30 s)")
    p.add_argument("--collision-policy", choices=["dual-image", "send-first"], default="dual-image")
    p.add_argument("--keep", action="store_true", help="leave both controllers running for console and NBD use")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class CgFollower:
    """Follows the primary's ``events`` stream in a thread and keeps one
    record per CG (for the report's CG timeline, held-ack and drain plots)."""

    def __init__(self, console_url: str, t0_mono: float, track_bytes: int) -> None:
        self.cgs: dict[int, dict] = {}
        self.track_bytes = track_bytes
        self._t0 = t0_mono
        self._stop = threading.Event()
        self._client = ConsoleClient(console_url, timeout_s=1.0)
        self._client.sendline("events")
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        pending = b""
        while not self._stop.is_set():
            try:
                pending += self._client.read_nonblocking()
            except ConsoleError:
                return
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._take(raw.decode(errors="replace").strip())

    def _take(self, line: str) -> None:
        words = line.split()
        if len(words) < 3 or words[1] != "cg":
            return
        fields = dict(w.split(":", 1) for w in words[2:] if ":" in w)
        try:
            seq = int(fields["seq"])
        except (KeyError, ValueError):
            return
        now_s = time.monotonic() - self._t0
        cg = self.cgs.setdefault(seq, {"cg_seq": seq, "start_s": now_s})
        if "held_ms" in fields:
            cg["held_ack_ms"] = float(fields["held_ms"])
        if words[0] == "destroy":
            cg["end_s"] = now_s
            cg["ok"] = fields.get("result") == "committed"
            cg["failed"] = not cg["ok"]
            if "reason" in fields:
                cg["reason"] = fields["reason"]
            if "tracks" in fields:  # every drained track is sent whole
                cg["drain_bytes"] = int(fields["tracks"]) * self.track_bytes
            if "cycle_s" in fields:
                cg["drain_s"] = float(fields["cycle_s"])

    def records(self) -> list[dict]:
        return [self.cgs[k] for k in sorted(self.cgs)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._client.close()


class PrimaryConsole:
    """Pause/resume/settle hooks for the checker, over the primary's console."""

    def __init__(self, url: str) -> None:
        self.client = ConsoleClient(url, timeout_s=PAUSE_TIMEOUT_S)
        # The hooks run in worker threads, and a cancelled check may leave
        # one still running: one command at a time on the console.
        self._lock = threading.Lock()

    def command(self, line: str) -> list[str]:
        with self._lock:
            return self.client.run_check(line)

    def status(self) -> dict:
        with self._lock:
            return self.client.run_json("status")["data"]

    def volumes(self) -> list[dict]:
        with self._lock:
            return self.client.run_json("volume list")["data"]["volumes"]

    def _wait_for(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"primary did not reach {what} within {timeout_s} s (status: {st})")
            time.sleep(0.05)

    def pause(self) -> None:
        self.command("cg pause")
        self._wait_for(lambda st: st["copy_state"] == "Paused", PAUSE_TIMEOUT_S, "Paused")

    def resume(self) -> None:
        self.command("cg resume")

    def settle(self) -> None:
        """Wait until a CG that began after the last host write has committed,
        so the final check sees every write."""
        first = self.status()["total_successful_cgs"]
        self._wait_for(lambda st: st["total_successful_cgs"] >= first + 2, SETTLE_TIMEOUT_S, "two more committed CGs")


def run(args) -> int:
    if args.volumes < 1:
        print("mirrorfw demo: --volumes must be at least 1", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    trace = args.trace or bundled_trace()
    if not Path(trace).is_file():
        print(f"mirrorfw demo: trace {trace}: no such file", file=sys.stderr)
        return 2
    names = tuple(f"vol{i}" for i in range(args.volumes))
    session = {"cg_interval_s": args.cg_interval_s, "max_coord_ms": args.max_coord_ms,
               "max_drain_s": args.max_drain_s, "collision_policy": args.collision_policy}
    for leftover in workdir.glob("*.img"):  # every run starts from empty volumes
        leftover.unlink()
    pair = write_pair_configs(workdir, volumes=names, size=args.size, nvram_size=args.nvram_size, session=session,
                              console=True, allow_faults=False)  # a random 0600 secret; no fault commands
    say = lambda text: print(f"demo: {text}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"work folder {workdir}; trace {trace}; {args.volumes} volume(s) of {args.size}")
    secondary = start_controller(pair.secondary, format=True, log_path=workdir / "secondary.log")
    say(f"secondary ready: {secondary.ready}")
    primary = None
    try:
        primary = start_controller(pair.primary, format=True, log_path=workdir / "primary.log")
        say(f"primary ready: {primary.ready}")
        result = _replay_and_check(args, workdir, trace, names, primary.ready, secondary.ready)
    finally:
        if not args.keep:
            for proc in (primary, secondary):
                if proc is not None and proc.alive():
                    proc.stop()
    report_dir = workdir / "report"
    print(result["text"])
    print(f"\nreport: {report_dir}/report.txt, {report_dir}/report.json; plots: "
          + ", ".join(Path(f).name for f in result.get("files", {}).values() if str(f).endswith(".png")))
    print(f"logs: {workdir}/primary.log, {workdir}/secondary.log")
    if args.keep:
        print(f"controllers left running: primary pid {primary.pid}, secondary pid {secondary.pid}")
        print(f"  primary host port {primary.ready.get('nbd')}, console {primary.ready.get('console')}")
        print(f"  secondary C export {secondary.ready.get('nbd')}, console {secondary.ready.get('console')}")
        print(f"  stop them with: kill {primary.pid} {secondary.pid}")
    print("PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


def _nbd_urls(ready: dict, names: tuple[str, ...]) -> list[str]:
    return [f"nbd://{ready['nbd']}/{n}" for n in names]  # the ready line gives host:port


def _replay_and_check(args, workdir: Path, trace: str, names, pready: dict, sready: dict) -> dict:
    from testbench.demo import replay_and_check

    console = PrimaryConsole(pready["console"])
    track_bytes = console.volumes()[0]["track_bytes"]
    follower = CgFollower(pready["console"], time.monotonic(), track_bytes)
    try:
        async def pause() -> None:
            await asyncio.to_thread(console.pause)

        async def resume() -> None:
            await asyncio.to_thread(console.resume)

        async def settle() -> None:
            await asyncio.to_thread(console.settle)

        async def cgs() -> list[dict]:
            return follower.records()

        result = asyncio.run(replay_and_check(
            trace, _nbd_urls(pready, names), _nbd_urls(sready, names), volume_names=list(names), fmt=args.fmt,
            timing=args.timing, queue_depth=args.queue_depth, check_every_s=args.check_every_s,
            log_path=str(workdir / "replay.log"), pause=pause, resume=resume, settle=settle, cg_source=cgs,
            report_dir=str(workdir / "report"), progress=not args.no_progress))
        status = console.status()
    finally:
        follower.close()
        console.client.close()
    checks = result.get("checks", [])
    shown = [c.get("shown_writes", 0) for c in checks]
    if result["passed"] and (not checks or shown[-1] == 0):
        # An empty copy is a consistent cut, but a secondary that never
        # committed must not pass the demo.
        result["passed"] = False
        result["text"] += "\nFAILED: the final check found no writes on C (no CG committed?)"
    result["text"] += (f"\nprimary: {status['total_successful_cgs']} CGs committed, "
                       f"{status['total_failed_cgs']} failed; data exposure {status['data_exposure_s']} s")
    (workdir / "report" / "status.json").write_text(json.dumps(status, indent=2))
    return result
