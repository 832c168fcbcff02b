"""CG formation time by controller count: how long host write acks are held
per CG with 1, 3 and 8 controllers in one session (issue 13; results key
``cg_formation_ms``).

A CG's formation time is its longest hold: every member holds its acks from
its own quiesce until the master's run (one controller: until its own CR
switch), so the CG is formed when the last member releases. Per CG the
figure is the maximum over the members of ``held_ms`` in the members'
``change cg seq:N phase:draining held_ms:X`` events; p50/p99/max are over
the CGs that every member released.

Two ways to run a count:
- ``processes``: real controllers (harness.supervise), one primary and one
  secondary process per controller on file:// volumes, the session over the
  authenticated control link on 127.0.0.1; the events come from each
  primary's console. 1 controller is a plain pair (no master).
- ``in_process``: N Primaries and Secondaries (LocalRemote) on mem://
  volumes in this process and one event loop, a SessionMaster over them
  driving LocalMembers (as tests/test_session.py does, on the real clock):
  no control link round trips, everything on one core.

In both, host writers keep 4 KiB writes going on every controller so each
hold holds real acks, and CGs form every ``CG_INTERVAL_S``.

    python -m testbench.bench.formation --seconds 10 --processes 1,3 --counts 1,3,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness.console_client import EventFollower
from testbench import stats

log = logging.getLogger(__name__)

COUNTS = (1, 3, 8)
CG_INTERVAL_S = 0.05
VOLUME_SIZE = "16MiB"
VOLUME_BYTES = 16 << 20
WRITERS_PER_CONTROLLER = 2
WRITE_PAUSE_S = 0.002  # each writer: a 4 KiB write, then this pause (load, not a throughput test)
INITIAL_COPY_TIMEOUT_S = 120.0


def formation(per_cg: dict[int, dict[str, float]], members: int) -> dict:
    """p50/p99/max over the CGs every member released, of the longest hold."""
    values = [max(held.values()) for held in per_cg.values() if len(held) == members]
    return stats.summary(values)  # count: the CGs measured


# ============================================================================ real processes
class HeldFollower(EventFollower):
    """Follows one primary's ``events`` in a thread: held_ms per CG into
    ``sink[seq][name]``, once ``active`` (the measurement began)."""

    def __init__(self, console_url: str, name: str, sink: dict[int, dict[str, float]], lock: threading.Lock) -> None:
        self.name, self.sink, self.lock = name, sink, lock
        self.active = False
        super().__init__(console_url)

    def take(self, line: str) -> None:
        words = line.split()
        if not self.active or len(words) < 3 or words[:2] != ["change", "cg"]:
            return
        fields = dict(w.split(":", 1) for w in words[2:] if ":" in w)
        if "held_ms" not in fields or "seq" not in fields:
            return
        with self.lock:
            self.sink.setdefault(int(fields["seq"]), {})[self.name] = float(fields["held_ms"])


async def _host_writers(addresses: list[str], seconds: float) -> int:
    """4 KiB writes on vol0 of every primary for ``seconds``; the count acked."""
    from drivers import open_device

    devices = [await asyncio.to_thread(open_device, f"nbd://{a}/vol0") for a in addresses]
    done = [0]
    stop_at = time.monotonic() + seconds

    async def writer(dev, seed: int) -> None:
        rng = random.Random(seed)
        bs = dev.info.block_size
        blocks = 4096 // bs
        while time.monotonic() < stop_at:
            await dev.write(rng.randrange(dev.info.num_blocks // blocks) * blocks, rng.randbytes(4096))
            done[0] += 1
            await asyncio.sleep(WRITE_PAUSE_S)

    try:
        await asyncio.gather(*(writer(d, i * 100 + k) for i, d in enumerate(devices)
                               for k in range(WRITERS_PER_CONTROLLER)))
    finally:
        for d in devices:
            d.close()
    return done[0]


def _wait_committed(consoles: list, timeout_s: float) -> None:
    """Until every primary has committed a CG (the initial copy) and has no OOS left."""
    deadline = time.monotonic() + timeout_s
    while True:
        sts = [c.run_json("status")["data"] for c in consoles]
        if all(st.get("total_successful_cgs", 0) >= 1 and not st.get("oos_tracks") for st in sts):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"initial copy not committed on every controller after {timeout_s} s: "
                               f"{[(st.get('total_successful_cgs'), st.get('oos_tracks')) for st in sts]}")
        time.sleep(0.25)


def run_processes(n: int, seconds: float, workdir: Path) -> dict:
    """One count with real controller processes (1: a plain pair)."""
    from harness.console_client import ConsoleClient
    from harness.supervise import start_controller, write_pair_configs, write_session_configs

    session = {"cg_interval_s": CG_INTERVAL_S}
    if n == 1:
        pairs = [write_pair_configs(workdir / "c0", size=VOLUME_SIZE, session=session, console=True,
                                    allow_faults=False)]
    else:
        pairs = write_session_configs(workdir, controllers=n, size=VOLUME_SIZE, session=session, console=True,
                                      allow_faults=False).pairs
    procs, consoles, followers = [], [], []
    per_cg: dict[int, dict[str, float]] = {}
    lock = threading.Lock()
    try:
        secondaries = []
        for pair in pairs:
            secondaries.append(start_controller(pair.secondary, format=True, verbose=0))
            procs.append(secondaries[-1])
        primaries: list = [None] * n
        for i in [*range(1, n), 0]:  # the subordinates listen before the master dials them
            primaries[i] = start_controller(pairs[i].primary, format=True, verbose=0)
            procs.append(primaries[i])
        consoles = [ConsoleClient(p.ready["console"], timeout_s=20.0) for p in primaries]
        _wait_committed(consoles, INITIAL_COPY_TIMEOUT_S)
        followers = [HeldFollower(p.ready["console"], f"c{i}", per_cg, lock) for i, p in enumerate(primaries)]
        before = [c.run_json("status")["data"] for c in consoles]
        for f in followers:
            f.active = True
        writes = asyncio.run(_host_writers([p.ready["nbd"] for p in primaries], seconds))
        time.sleep(0.5)  # the last CG's events
        for f in followers:
            f.active = False
        after = [c.run_json("status")["data"] for c in consoles]
        with lock:
            result = formation(per_cg, n)
        rss = [_vm_hwm_mib(p.pid) for p in procs]
        for p in reversed(procs):
            p.stop()
        return result | {
            "mode": "processes", "controllers": n, "host_writes": writes,
            "committed": after[0]["total_successful_cgs"] - before[0]["total_successful_cgs"],
            "failed": after[0]["total_failed_cgs"] - before[0]["total_failed_cgs"],
            "peak_rss_mib_total": round(sum(r for r in rss if r), 1),
        }
    finally:
        for f in followers:
            f.close()
        for c in consoles:
            c.close()
        for p in reversed(procs):
            if p.alive():
                p.kill()


def _vm_hwm_mib(pid: int) -> float | None:
    from testbench.bench.replicating import vm_hwm_mib

    return vm_hwm_mib(pid)


# ============================================================================ in process
async def _in_process(n: int, seconds: float) -> dict:
    from drivers.mem import open as open_mem
    from firmware.local_remote import LocalRemote
    from firmware.params import SessionParams
    from firmware.primary import Primary
    from firmware.secondary import Secondary
    from firmware.session_master import SessionMaster
    from hal.clock import AsyncioClock
    from testbench.bench.cg import BytesNvram

    clock = AsyncioClock()
    url = f"mem://?size={VOLUME_BYTES}"
    primaries, secondaries = [], []
    params = SessionParams(cg_interval_s=CG_INTERVAL_S)
    for _ in range(n):
        sec = Secondary({"vol0": (open_mem(url), open_mem(url))}, BytesNvram(4 << 20), clock,
                        session_id="bench", session_member=n > 1)
        await sec.open(format=True)
        p = Primary({"vol0": open_mem(url)}, BytesNvram(64 << 20), clock, params, LocalRemote(sec),
                    session_id="bench")
        await p.open(format=True)
        secondaries.append(sec)
        primaries.append(p)
    per_cg: dict[int, dict[str, float]] = {}
    active = [False]

    def follow(name: str):
        def take(ev) -> None:
            if active[0] and ev.action == "change" and ev.obj == "cg" and "held_ms" in ev.fields:
                per_cg.setdefault(int(ev.fields["seq"]), {})[name] = float(ev.fields["held_ms"])
        return take

    for i, p in enumerate(primaries):
        p.events.subscribe(follow(f"c{i}"))
    master = None
    if n == 1:
        await primaries[0].start()
    else:
        from firmware.session_member import LocalMember

        for p in primaries:
            await p.start(form_cgs=False)
        master = SessionMaster(primaries[0], [LocalMember(p, f"c{i}") for i, p in enumerate(primaries) if i],
                               name="c0")
        master.start_loop()
    deadline = time.monotonic() + INITIAL_COPY_TIMEOUT_S
    while not all(p.region.record.get("successful", 0) >= 1 and not p.oos_tracks() for p in primaries):
        if time.monotonic() > deadline:
            raise RuntimeError(f"initial copy not committed in process with {n} controllers")
        await asyncio.sleep(0.05)
    before = [p.region.record.get("successful", 0) for p in primaries]
    failed_before = master.failed if master else primaries[0].region.record.get("failed", 0)
    active[0] = True
    stop_at = time.monotonic() + seconds
    writes = [0]

    async def writer(p, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            await p.write("vol0", rng.randrange(VOLUME_BYTES // 4096) * 4096, rng.randbytes(4096))
            writes[0] += 1
            await asyncio.sleep(WRITE_PAUSE_S)

    await asyncio.gather(*(writer(p, i * 100 + k) for i, p in enumerate(primaries)
                           for k in range(WRITERS_PER_CONTROLLER)))
    await asyncio.sleep(0.2)
    active[0] = False
    committed = primaries[0].region.record.get("successful", 0) - before[0]
    failed = (master.failed if master else primaries[0].region.record.get("failed", 0)) - failed_before
    coord = dict(master.status()["coord_ms"]) if master else None
    for p in primaries:
        await p.stop(clean=False)
    for s in secondaries:
        close = getattr(s, "close", None)
        if close is not None:
            res = close()
            if asyncio.iscoroutine(res):
                await res
    return formation(per_cg, n) | {"mode": "in_process", "controllers": n, "host_writes": writes[0],
                                   "committed": committed, "failed": failed, "coord_ms": coord}


def run_in_process(n: int, seconds: float) -> dict:
    return asyncio.run(_in_process(n, seconds))


# ============================================================================ the part
def run_formation_bench(seconds: float = 10.0, workdir: str | Path | None = None, *,
                        counts: tuple[int, ...] = COUNTS, processes: tuple[int, ...] = (1, 3)) -> dict:
    """Returns {"cg_formation_ms": {"1": {p50, p99, max, count, mode}, …}, "cases": {…}, "notes": …}.
    A count in ``processes`` runs as real processes (its in-process figure is
    kept in ``cases`` too, for comparison); the others in process."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="mirrorfw-form-", dir="/tmp") if own else workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cases: dict[str, dict] = {}
    chosen: dict[str, dict] = {}
    try:
        for n in counts:
            log.info("CG formation: %d controller(s) in process", n)
            cases[f"{n}_in_process"] = run_in_process(n, seconds)
            chosen[str(n)] = cases[f"{n}_in_process"]
            if n in processes:
                log.info("CG formation: %d controller(s) as processes", n)
                try:
                    cases[f"{n}_processes"] = run_processes(n, seconds, work / f"n{n}")
                except Exception as e:  # noqa: BLE001 - the in-process figure stands, with the reason
                    log.warning("%d controllers as processes: %s", n, e)
                    cases[f"{n}_processes"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                else:
                    chosen[str(n)] = cases[f"{n}_processes"]
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    by_count = {k: {key: v.get(key) for key in ("p50", "p99", "max", "count", "mode")} for k, v in chosen.items()}
    modes = ", ".join(f"{k}: {v['mode']}" for k, v in by_count.items())
    notes = (f"held acks per CG (longest hold over the members), CG interval {CG_INTERVAL_S} s, "
             f"{WRITERS_PER_CONTROLLER} host writers per controller; {modes}. processes = one primary and one "
             f"secondary process per controller on 127.0.0.1 (1: a plain pair), the session over the control "
             f"link; in_process = every controller in one process and event loop, a SessionMaster driving "
             f"LocalMembers, no control-link round trips")
    return {"cg_formation_ms": by_count, "cases": cases, "notes": notes, "seconds_per_case": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workdir")
    p.add_argument("--counts", default="1,3,8", help="controller counts (default 1,3,8)")
    p.add_argument("--processes", default="1,3", help="counts to run as real processes too (default 1,3)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    print(json.dumps(run_formation_bench(args.seconds, args.workdir, counts=ints(args.counts),
                                         processes=ints(args.processes)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
