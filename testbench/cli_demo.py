"""``mirrorfw demo``: the main job on embedded defaults (``make run``).

Builds file-backed volumes and NVRAM in a work folder, starts a secondary
and a primary as processes (the way a user starts them: ``mirrorfw
secondary|primary --config FILE``), replays a bundled trace through the
primary's NBD host port while CGs cycle, checks the secondary's consistent
copy C again and again while the replay runs, then prints the report and
where the plots and JSON are. Exit 0 only when every check passed.

Each check reads C live: it takes a snapshot on the secondary's console
(``snapshot create check-N``: every volume at one CG), reads
``nbd://…/VOLUME@check-N`` on fresh connections while CGs keep committing,
and deletes the snapshot.

``--controllers N`` (N > 1) runs a session of N primaries (c0 the master,
the others its subordinates) and N secondaries, the trace's devices spread
over all their volumes, one replay through every NBD port, and each check
one cut across every volume of every controller (one T*). The snapshots of
one check must show one CG on every secondary, so the master's CG formation
is paused just while they are taken (``cg pause``, ``snapshot create`` on
each secondary, ``cg resume``); the reads run with CGs forming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import shutil
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from harness.console_client import ConsoleClient, EventFollower
from harness.supervise import start_controller, write_pair_configs, write_session_configs

log = logging.getLogger(__name__)

PAUSE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0
SAME_CG_TIMEOUT_S = 5.0  # paused: the subordinates' commits of the master's last CG land within this
SNAPSHOT_ATTEMPTS = 5


def bundled_trace() -> str:
    return str(resources.files("testbench") / "data" / "demo.iolog")


def add_arguments(p) -> None:
    p.add_argument("--workdir", default="work", help="folder for images, NVRAM, configs, logs and the report (default: work)")
    p.add_argument("--trace", default=None, help="trace to replay (default: the bundled 60 s fio iolog, 2 devices)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format when it cannot be detected (see `mirrorfw trace --help`)")
    p.add_argument("--controllers", type=int, default=1,
                   help="primary+secondary pairs in one session (default 1; N > 1: c0 the master)")
    p.add_argument("--volumes", type=int, default=2, help="number of volumes per controller (default 2)")
    p.add_argument("--size", default="64MiB", help="size of each volume (default 64MiB; trace offsets wrap modulo it)")
    p.add_argument("--nvram-size", default="64MiB", help="NVRAM (write cache and bitmaps) per controller (default 64MiB)")
    p.add_argument("--timing", default="original", help="afap, original, or scale=X (default original)")
    p.add_argument("--queue-depth", type=int, default=16, help="replay queue depth (default 16)")
    p.add_argument("--check-every-s", type=float, default=5.0, help="check C this often while the replay runs (default 5)")
    p.add_argument("--cg-interval-s", type=float, default=0.5, help="CG interval (default 0.5 s)")
    p.add_argument("--max-coord-ms", type=float, default=50.0, help="maximum coordination time (default 50 ms)")
    p.add_argument("--max-drain-s", type=float, default=30.0, help="maximum drain time (default 30 s)")
    p.add_argument("--collision-policy", choices=["dual-image", "send-first"], default="dual-image",
                   help="a host write to a track being drained: keep both images, or send the track first")
    p.add_argument("--keep", action="store_true", help="leave the controllers running for console and NBD use")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_fidelity_arguments(p)


def add_fidelity_arguments(p) -> None:
    """The replay-fidelity limits of the verdict (testbench.report.Fidelity says why these defaults)."""
    from testbench.report import Fidelity

    d = Fidelity()
    g = p.add_argument_group("replay fidelity (a paced replay that misses the trace's timing tested a lighter load)")
    g.add_argument("--fidelity-degraded-lateness-ms", type=float, default=d.degraded_lateness_p99_ms,
                   help="lateness p99 above this: PASS (fidelity: degraded ...) (default %(default)s ms)")
    g.add_argument("--fidelity-degraded-iops", type=float, default=d.degraded_iops_ratio,
                   help="achieved / target IOPS below this: degraded (default %(default)s)")
    g.add_argument("--fidelity-fail-lateness-ms", type=float, default=d.fail_lateness_p99_ms,
                   help="lateness p99 above this: FAIL (default %(default)s ms)")
    g.add_argument("--fidelity-fail-iops", type=float, default=d.fail_iops_ratio,
                   help="achieved / target IOPS below this: FAIL (default %(default)s)")


def _report_options(args) -> dict:
    from testbench.report import Fidelity

    return {"fidelity": Fidelity(args.fidelity_degraded_lateness_ms, args.fidelity_degraded_iops,
                                 args.fidelity_fail_lateness_ms, args.fidelity_fail_iops),
            "max_coord_ms": args.max_coord_ms}


class CgFollower(EventFollower):
    """Follows the primary's ``events --statistics`` stream in a thread and
    keeps one record per CG for the report: the time.monotonic() of each
    phase it saw (``quiesce_mono`` at create, ``draining_mono`` when CR
    exists and the acks are released, ``committing_mono``, ``end_mono`` at
    destroy), ``held_ack_ms``, ``drain_bytes`` (tracks x track size: every
    drained track is sent whole), ``cycle_s``, the result, and
    ``initial_copy`` on the CG that carried a full copy (a ``full_copy``
    session event, or CG 1 after ``--format``: a new secondary gets
    everything). A CG already under way when following began lacks its
    earlier phases. ``at_start``: the session's ``exists`` fields then."""

    PHASE_KEYS = {"quiescing": "quiesce_mono", "draining": "draining_mono", "committing": "committing_mono"}

    def __init__(self, console_url: str, t0_mono: float, track_bytes: int, *, formatted: bool = False) -> None:
        self.cgs: dict[int, dict] = {}
        self.track_bytes = track_bytes
        self.at_start: dict[str, str] = {}
        self._t0 = t0_mono  # kept for callers; the records carry monotonic times
        self._formatted = formatted
        self._full_copy_pending = False
        super().__init__(console_url, "events --statistics --all-cgs")  # every CG, the empty ones too

    def take(self, line: str) -> None:
        words = line.split()
        if len(words) < 2:
            return
        fields = dict(w.split(":", 1) for w in words[2:] if ":" in w)
        now = time.monotonic()
        if words[1] == "session":
            if words[0] == "exists" and not self.at_start:
                self.at_start = fields
            elif fields.get("full_copy") == "yes":
                self._full_copy_pending = True
            return
        if words[1] != "cg":
            return
        try:
            seq = int(fields["seq"])
        except (KeyError, ValueError):
            return
        cg = self.cgs.setdefault(seq, {"cg_seq": seq})
        key = self.PHASE_KEYS.get(fields.get("phase", ""))
        if key and key not in cg:
            cg[key] = now
        if "held_ms" in fields:
            cg["held_ack_ms"] = float(fields["held_ms"])
        if words[0] == "destroy":
            cg["end_mono"] = now
            cg["ok"] = fields.get("result") == "committed"
            cg["failed"] = not cg["ok"]
            if "reason" in fields:
                cg["reason"] = fields["reason"]
            if "tracks" in fields:  # every drained track is sent whole
                cg["drain_bytes"] = int(fields["tracks"]) * self.track_bytes
            if "cycle_s" in fields:
                cg["cycle_s"] = float(fields["cycle_s"])
            if cg["ok"] and (self._full_copy_pending or (self._formatted and seq == 1)):
                cg["initial_copy"] = True
                self._full_copy_pending = False

    def records(self) -> list[dict]:
        return [self.cgs[k] for k in sorted(self.cgs)]

class Console:
    """A controller's console for the demo's hooks. The hooks run in worker
    threads: one command at a time on a console."""

    def __init__(self, url: str) -> None:
        self.client = ConsoleClient(url, timeout_s=PAUSE_TIMEOUT_S)
        self._lock = threading.Lock()

    def command(self, line: str) -> list[str]:
        with self._lock:
            return self.client.run_check(line)

    def json(self, line: str) -> dict:
        with self._lock:
            return self.client.run_json(line)["data"]

    def status(self) -> dict:
        return self.json("status")

    def close(self) -> None:
        self.client.close()


class PrimaryConsole(Console):
    """Pause/resume/settle over a primary's console (the master's, in a session)."""

    def volumes(self) -> list[dict]:
        return self.json("volume list")["volumes"]

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


class SecondaryConsole(Console):
    """Snapshots of C over a secondary's console."""

    def snapshot_create(self, name: str) -> int:
        """Pin every volume of C at the last committed CG as ``VOLUME@name``; its CG."""
        return int(self.json(f"snapshot create {name}")["cg"])

    def snapshot_delete(self, name: str) -> None:
        self.command(f"snapshot delete {name}")

    def committed(self) -> tuple[int, int | None]:
        st = self.status()
        return st["committed_cg"], st.get("prepared_cg")


def snapshot_one(sec: SecondaryConsole, name: str, ready: dict, names) -> contextlib.AbstractAsyncContextManager:
    """take_copy for one secondary: a snapshot, its VOLUME@NAME URLs, deleted after the read."""
    from testbench.demo import CopyUrls

    @contextlib.asynccontextmanager
    async def copy():
        cg = await asyncio.to_thread(sec.snapshot_create, name)
        try:
            yield CopyUrls([f"nbd://{ready['nbd']}/{v}@{name}" for v in names], cg)
        finally:
            await asyncio.to_thread(sec.snapshot_delete, name)
    return copy()


def snapshot_session(master: PrimaryConsole, secs: list[SecondaryConsole], name: str) -> int:
    """``snapshot create NAME`` on every secondary at one CG: the master's CG
    formation paused only while they are taken. Returns the CG."""
    for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
        master.pause()
        try:
            # Paused ends the master's own CG; its subordinates' commits follow
            # one by one, and a member in doubt is resolved only at the next CG.
            deadline = time.monotonic() + SAME_CG_TIMEOUT_S
            seen = [s.committed() for s in secs]
            while not _one_cg(seen) and time.monotonic() < deadline:
                time.sleep(0.02)
                seen = [s.committed() for s in secs]
            if _one_cg(seen):
                cgs = [s.snapshot_create(name) for s in secs]
                if len(set(cgs)) == 1:
                    return cgs[0]
                for s in secs:
                    s.snapshot_delete(name)
            log.warning("snapshot %s attempt %d: the secondaries are at CGs %s; again after a CG",
                        name, attempt, [c for c, _ in seen])
        finally:
            master.resume()
        time.sleep(0.5)
    raise RuntimeError(f"snapshot {name}: no moment with every secondary at one CG in {SNAPSHOT_ATTEMPTS} attempts")


def _one_cg(seen: list[tuple[int, int | None]]) -> bool:
    """Every secondary committed the same CG and none holds one prepared."""
    return len({c for c, _ in seen}) == 1 and all(p is None for _, p in seen)


def session_copy(master: PrimaryConsole, secs: list[SecondaryConsole], name: str, urls: list[str]):
    """take_copy for a session: one CG across every secondary, dropped after the read."""
    from testbench.demo import CopyUrls

    @contextlib.asynccontextmanager
    async def copy():
        cg = await asyncio.to_thread(snapshot_session, master, secs, name)
        try:
            yield CopyUrls(urls, cg)
        finally:
            for s in secs:
                await asyncio.to_thread(s.snapshot_delete, name)
    return copy()


def _check_args(args) -> str | None:
    if args.volumes < 1:
        return "--volumes must be at least 1"
    if args.controllers < 1:
        return "--controllers must be at least 1"
    return None


def run(args) -> int:
    bad = _check_args(args)
    if bad:
        print(f"mirrorfw demo: {bad}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    trace = args.trace or bundled_trace()
    if not Path(trace).is_file():
        print(f"mirrorfw demo: trace {trace}: no such file", file=sys.stderr)
        return 2
    if args.controllers > 1:
        return run_session(args, workdir, trace)
    names = tuple(f"vol{i}" for i in range(args.volumes))
    for leftover in workdir.glob("*.img"):  # every run starts from empty volumes
        leftover.unlink()
    pair = write_pair_configs(workdir, volumes=names, size=args.size, nvram_size=args.nvram_size,
                              session=_session_params(args), console=True, metrics=True,
                              allow_faults=False)  # a random 0600 secret; no fault commands
    say(f"work folder {workdir}; trace {trace}; {args.volumes} volume(s) of {args.size}")
    secondary = start_controller(pair.secondary, format=True, log_path=workdir / "secondary.log")
    say(f"secondary: {ready_line(secondary)}")
    primary = None
    try:
        primary = start_controller(pair.primary, format=True, log_path=workdir / "primary.log")
        say(f"primary: {ready_line(primary)}")
        result = _replay_and_check(args, workdir, trace, names, primary.ready, secondary.ready)
    finally:
        if not args.keep:
            for proc in (primary, secondary):
                if proc is not None and proc.alive():
                    proc.stop()
    _print_result(result, workdir)
    print(f"logs: {workdir}/primary.log, {workdir}/secondary.log")
    if args.keep:
        print(f"controllers left running: primary pid {primary.pid}, secondary pid {secondary.pid}")
        print(f"  primary host port {primary.ready.get('nbd')}, console {primary.ready.get('console')}")
        print(f"  secondary C export {secondary.ready.get('nbd')}, console {secondary.ready.get('console')}")
        print(f"  stop them with: kill {primary.pid} {secondary.pid}")
        print("  restart them (after a stop) with:")
        for proc in (secondary, primary):
            print(f"    {restart_command(proc)}")
    print("PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


def ready_line(proc) -> str:
    """The controller's own ``ready key=value ...`` line (as it printed it;
    rebuilt from the parsed fields, in order, if the raw line is not kept)."""
    raw = getattr(proc, "ready_line", None)
    if raw:
        return raw.strip()
    return " ".join(["ready", *(f"{k}={v}" for k, v in proc.ready.items())])


def restart_command(proc) -> str:
    """How to start a controller the demo left running again: never with
    ``--format``, which would make its NVRAM and volumes empty."""
    import shlex

    return f"mirrorfw {proc.role} --config {shlex.quote(str(proc.config))}"


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def _session_params(args) -> dict:
    return {"cg_interval_s": args.cg_interval_s, "max_coord_ms": args.max_coord_ms,
            "max_drain_s": args.max_drain_s, "collision_policy": args.collision_policy}


def _print_result(result: dict, workdir: Path) -> None:
    report_dir = workdir / "report"
    print(result["text"])
    files = result.get("files", {})
    print(f"\nreport: {files.get('html', report_dir / 'report.html')} (one page, figure inside); "
          f"figure {files.get('figure', report_dir / 'report.png')}; {report_dir}/report.txt, {report_dir}/report.json")


def _nbd_urls(ready: dict, names: tuple[str, ...]) -> list[str]:
    return [f"nbd://{ready['nbd']}/{n}" for n in names]  # the ready line gives host:port


def _replay_and_check(args, workdir: Path, trace: str, names, pready: dict, sready: dict) -> dict:
    from testbench.demo import replay_and_check

    console = PrimaryConsole(pready["console"])
    secondary = SecondaryConsole(sready["console"])
    track_bytes = console.volumes()[0]["track_bytes"]
    follower = CgFollower(pready["console"], time.monotonic(), track_bytes, formatted=True)
    try:
        async def settle() -> None:
            await asyncio.to_thread(console.settle)

        async def cgs() -> list[dict]:
            return follower.records()

        result = asyncio.run(replay_and_check(
            trace, _nbd_urls(pready, names), volume_names=list(names), fmt=args.fmt,
            take_copy=lambda n: snapshot_one(secondary, f"check-{n}", sready, names),
            timing=args.timing, queue_depth=args.queue_depth, check_every_s=args.check_every_s,
            log_path=str(workdir / "replay.log"), settle=settle, cg_source=cgs,
            report_dir=str(workdir / "report"), progress=not args.no_progress, **_report_options(args)))
        status = console.status()
    finally:
        follower.close()
        console.close()
        secondary.close()
    _final_verdict(result)
    result["text"] += (f"\nprimary, since it started (before and after the replay too): "
                       f"{status['total_successful_cgs']} CGs committed, {status['total_failed_cgs']} failed; "
                       f"data exposure now {status['data_exposure_s']} s")
    (workdir / "report" / "status.json").write_text(json.dumps(status, indent=2))
    return result


def _final_verdict(result: dict) -> None:
    checks = result.get("checks", [])
    shown = [c.get("shown_writes", 0) for c in checks]
    if result["passed"] and (not checks or shown[-1] == 0):
        # An empty copy is a consistent cut, but a secondary that never
        # committed must not pass the demo.
        result["passed"] = False
        result["text"] += "\nFAILED: the final check found no writes on C (no CG committed?)"


# -- a session of several controllers ---------------------------------------------------


def stripe_ways(trace_devices: int, volumes: int) -> int:
    """How many parts each trace device is split into so that every volume
    gets some of the trace (1: the trace has a device for every volume)."""
    if trace_devices >= volumes or trace_devices == 0:
        return 1
    return math.ceil(volumes / trace_devices)


def run_session(args, workdir: Path, trace: str) -> int:
    from testbench.traces import read_trace, scan

    n = args.controllers
    names = tuple(f"vol{i}" for i in range(args.volumes))
    for leftover in workdir.glob("c*/*.img"):  # every run starts from empty volumes
        leftover.unlink()
    session = write_session_configs(workdir, controllers=n, volumes=names, size=args.size,
                                    nvram_size=args.nvram_size, session=_session_params(args),
                                    secret=secrets.token_hex(32).encode() + b"\n", console=True, allow_faults=False,
                                    metrics=True)
    devices = len(scan(read_trace(trace, args.fmt)).devices)
    ways = stripe_ways(devices, n * args.volumes)
    say(f"work folder {workdir}; trace {trace}; {n} controllers (c0 the master), {args.volumes} volume(s) of "
        f"{args.size} each" + (f"; each of the trace's {devices} device(s) striped over {ways} volumes"
                               if ways > 1 else ""))
    procs = []
    secondaries, primaries = [], [None] * n
    try:
        for pair in session.pairs:
            secondaries.append(start_controller(pair.secondary, format=True, log_path=pair.workdir / "secondary.log"))
            procs.append(secondaries[-1])
        for i in [*range(1, n), 0]:  # the subordinates listen before the master dials them
            pair = session.pairs[i]
            primaries[i] = start_controller(pair.primary, format=True, log_path=pair.workdir / "primary.log")
            procs.append(primaries[i])
        for i in range(n):
            say(f"c{i} primary: {ready_line(primaries[i])}")
            say(f"c{i} secondary: {ready_line(secondaries[i])}")
        result = _session_replay_and_check(args, workdir, trace, names, ways,
                                           [p.ready for p in primaries], [s.ready for s in secondaries])
    finally:
        if not args.keep:
            for proc in reversed(procs):
                if proc is not None and proc.alive():
                    proc.stop()
    _print_result(result, workdir)
    print(f"logs: {workdir}/c*/primary.log, {workdir}/c*/secondary.log")
    if args.keep:
        print("controllers left running (c0 the master):")
        for i in range(n):
            print(f"  c{i}: primary pid {primaries[i].pid} host port {primaries[i].ready.get('nbd')} console "
                  f"{primaries[i].ready.get('console')}; secondary pid {secondaries[i].pid} C export "
                  f"{secondaries[i].ready.get('nbd')} console {secondaries[i].ready.get('console')}")
        print("  stop them with: kill " + " ".join(str(p.pid) for p in procs))
        print("  restart them (after a stop; secondaries and subordinates first) with:")
        for proc in [*secondaries, *primaries[1:], primaries[0]]:
            print(f"    {restart_command(proc)}")
    print("PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


def _session_replay_and_check(args, workdir: Path, trace: str, names, ways: int, pready: list[dict],
                              sready: list[dict]) -> dict:
    from testbench.demo import replay_and_check

    n = len(pready)
    # Volumes controller-minor (c0/vol0, c1/vol0, …, c0/vol1, …): the replayer
    # deals the trace's (striped) devices round-robin, so every controller gets some.
    order = [(i, v) for v in names for i in range(n)]
    primary_urls = [f"nbd://{pready[i]['nbd']}/{v}" for i, v in order]
    volume_names = [f"c{i}/{v}" for i, v in order]
    master = PrimaryConsole(pready[0]["console"])
    others = [PrimaryConsole(r["console"]) for r in pready[1:]]
    secs = [SecondaryConsole(r["console"]) for r in sready]
    follower = CgFollower(pready[0]["console"], time.monotonic(), master.volumes()[0]["track_bytes"],
                          formatted=True)

    def take_copy(k: int):
        name = f"check-{k}"
        return session_copy(master, secs, name, [f"nbd://{sready[i]['nbd']}/{v}@{name}" for i, v in order])

    try:
        async def settle() -> None:
            await asyncio.to_thread(master.settle)

        async def cgs() -> list[dict]:
            return follower.records()

        result = asyncio.run(replay_and_check(
            trace, primary_urls, volume_names=volume_names, fmt=args.fmt, take_copy=take_copy, stripe_ways=ways,
            timing=args.timing, queue_depth=args.queue_depth, check_every_s=args.check_every_s,
            log_path=str(workdir / "replay.log"), settle=settle, cg_source=cgs,
            report_dir=str(workdir / "report"), progress=not args.no_progress, **_report_options(args)))
        statuses = [master.status()] + [c.status() for c in others]
    finally:
        follower.close()
        for c in (master, *others, *secs):
            c.close()
    _final_verdict(result)
    for i, st in enumerate(statuses):
        if st.get("total_failed_cgs") is None:
            continue
        result["text"] += (f"\nc{i}{' (master)' if i == 0 else ''}, since it started: "
                           f"{st['total_successful_cgs']} CGs committed, "
                           f"{st['total_failed_cgs']} failed; data exposure {st['data_exposure_s']} s; "
                           f"held-ack ms p99 {st['held_ack_ms'].get('p99')}")
    (workdir / "report" / "status.json").write_text(json.dumps(statuses[0] | {"controllers": statuses}, indent=2))
    return result
