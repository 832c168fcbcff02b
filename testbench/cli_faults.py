"""``mirrorfw faults``: the seeded fault campaign; writes faults/results.json
(keys as in RESULTS.md) and exits 0 only when every loss and inconsistency
counter is 0.

Parts (``--only`` picks some): crash (SIGKILL at every declared crash point),
link (LinkProxy faults and an outage), device (FaultyDevice EIO/latency under
A and B), fuzz (nbd, link, control, console, trace and config, 100,000 cases per
target; testbench/faults/fuzz.py), load (8 clients x QD32),
power (a power cut at every persist point of small workloads in virtual time,
then ``power cut`` to real controllers on volatile+ devices and NVRAM), dos
(issue 16's attacks on a running pair, budgets in testbench/faults/dos.py), multi
(3 controllers in one session: SIGKILL of the master, a subordinate and a secondary
at each CG phase, and a subordinate slower than the coordination time;
testbench/faults/multi.py), sim (seeds of the deterministic simulator,
testbench/sim/: whole sessions in virtual time with every fault; the coverage
table fault kind x CG phase x role). ``--dask`` runs the parts (and the sim
seeds in chunks) on a Dask LocalCluster, ``--scheduler tcp://HOST:8786`` on
lab servers running ``dask worker``; either way one JSON and one JUnit file.
Default about 10 minutes in all on 2 cores; ``--quick`` about 2.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("fuzz", "device", "link", "load", "crash", "power", "dos", "multi", "sim")


def add_arguments(p) -> None:
    p.add_argument("--out", default="faults/results.json", help="results file (JSON)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="about a minute: fewer cases, points and seconds")
    p.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                   help=f"run only this part (repeatable): {', '.join(PARTS)}")
    p.add_argument("--points", help="crash points to use, comma-separated (default: every declared point)")
    p.add_argument("--workdir", help="folder for the pairs' files (default: a fresh one under /tmp)")
    p.add_argument("--sim-seeds", help="seeds of the sim part, A:B (default 0:2000; --quick 0:300)")
    p.add_argument("--junit", help="JUnit XML of the parts (default: beside --out, NAME-junit.xml)")
    p.add_argument("--dask", action="store_true", help="run the parts on a Dask LocalCluster (2 workers)")
    p.add_argument("--scheduler", help="run the parts on this Dask scheduler (tcp://HOST:8786)")


def _progress(text: str) -> None:
    print(f"faults: {text}", file=sys.stderr, flush=True)


def empty_results(seed: int) -> dict:
    return {
        "seed": seed,
        "crash": {"injected": 0, "acked_writes_lost": 0, "inconsistent_copies": 0, "full_resyncs": 0},
        "link": {"faults": 0, "corrupt_applied": 0, "resync_bytes": 0, "oos_bytes": 0},
        "device": {"faults": 0, "silent_losses": 0},
        "fuzz": {k: {"cases": 0, "crashes": 0} for k in ("nbd", "link", "control", "console", "trace", "config")},
        "load": {"clients": 8, "queue_depth": 32, "seconds": 0, "writes": 0, "lost": 0, "peak_rss_mib": 0},
        "power": {"cut_points": 0, "states_checked": 0, "acked_writes_lost": 0, "inconsistent_copies": 0,
                  "full_resyncs": 0, "process_cuts": 0},
        "dos": {"nbd_peak_rss_mib": 0, "link_peak_rss_mib": 0, "good_client_p99_ms": 0},
        "multi": {"controllers": 3, "injected": 0, "acked_writes_lost": 0, "inconsistent_copies": 0, "split_cgs": 0},
        "sim": {"seeds": 0, "violations": 0, "scenarios_per_s": 0.0, "coverage": {}},
        "skipped": {},
        "errors": {},
    }


def failures(res: dict) -> list[str]:
    """Every counter that must be 0 and is not (or a part that broke)."""
    bad = []
    for part, key in (("crash", "acked_writes_lost"), ("crash", "inconsistent_copies"), ("link", "corrupt_applied"),
                      ("device", "silent_losses"), ("load", "lost"), ("power", "acked_writes_lost"),
                      ("power", "inconsistent_copies"), ("power", "full_resyncs"), ("multi", "acked_writes_lost"),
                      ("multi", "inconsistent_copies"), ("multi", "split_cgs"), ("sim", "violations")):
        if res[part].get(key):
            bad.append(f"{part}.{key} = {res[part][key]}")
    for name, f in res["fuzz"].items():
        if isinstance(f, dict) and f.get("crashes"):
            bad.append(f"fuzz.{name}.crashes = {f['crashes']}")
    if res["link"].get("c_consistent") is False:
        bad.append("link: C is not a consistent cut")
    if res["load"].get("c_consistent") is False:
        bad.append("load: C is not a consistent cut")
    from testbench.faults.dos import failures as dos_failures

    bad += dos_failures(res["dos"])
    bad += [f"{part}: {err}" for part, err in res["errors"].items()]
    bad += [f"crash: {e}" for e in res["crash"].get("errors", [])]
    bad += [f"power: {e}" for e in res["power"].get("errors", [])]
    bad += [f"multi: {e}" for e in res["multi"].get("errors", [])]
    return bad


def run(args) -> int:
    logging.getLogger("drivers.nbd").setLevel(logging.ERROR)  # fuzzed clients are logged by the thousand
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    quick = args.quick
    parts = args.only or list(PARTS)
    res = empty_results(args.seed)
    res["quick"] = quick
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mirrorfw-faults-", dir="/tmp")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    points = [p.strip() for p in args.points.split(",") if p.strip()] if args.points else None
    if points:
        from firmware.crashpoints import POINTS
        from testbench.faults.crash import crash_points

        known = crash_points()
        unknown = [p for p in points if p not in POINTS]
        if unknown:
            print(f"mirrorfw faults: unknown crash point(s) {', '.join(unknown)}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    seed = args.seed

    def fuzz():
        from testbench.faults.fuzz import engine_available, run_fuzz

        # "fuzz" holds one entry per interface (RESULTS.md); the engine is said beside it
        res["fuzz"] = run_fuzz(3000 if quick else 100_000, seed, progress=_progress)
        res["fuzz_engine"] = engine_available()

    def device():
        from testbench.faults.device import run_device

        res["device"] = run_device(work / "device", seed=seed, writes=300 if quick else 2000, progress=_progress)

    def link():
        from testbench.faults.link import run_link

        res["link"] = run_link(work / "link", seed=seed, seconds=4 if quick else 15, progress=_progress)

    def load():
        from testbench.faults.load import run_load

        res["load"] = run_load(work / "load", seed=seed, seconds=3 if quick else 20, progress=_progress)

    def crash():
        from testbench.faults.crash import crash_points, run_crash

        chosen = points or crash_points()
        if quick and not points:
            chosen = chosen[::3]
        res["crash"] = run_crash(work / "crash", seed=seed, seconds_per_point=2 if quick else 6, points=chosen,
                                 progress=_progress)

    def power():
        from testbench.faults.power import run_power

        res["power"] = run_power(work / "power", seed=seed, quick=quick, progress=_progress)

    def dos():
        from testbench.faults.dos import run_dos

        res["dos"] = run_dos(work / "dos", seed=seed, seconds=6 if quick else 20, quick=quick, progress=_progress)

    def multi():
        from testbench.faults.multi import run_multi

        res["multi"] = run_multi(work / "multi", seed=seed, quick=quick, seconds_per_round=2 if quick else 4,
                                 progress=_progress)

    def sim():
        from testbench.sim.campaign import parse_seeds, run_sim_part

        seeds = parse_seeds(args.sim_seeds or ("0:300" if quick else "0:2000"))
        res["sim"] = run_sim_part(seeds, client=client, progress=_progress)

    runners = {"sim": sim, "multi": multi, "dos": dos, "fuzz": fuzz, "device": device, "link": link, "load": load, "crash": crash, "power": power}
    t_all = time.monotonic()
    client = cluster = None
    if args.dask or args.scheduler:
        from testbench.sim.campaign import dask_client

        client, cluster = dask_client("local" if args.dask else None, args.scheduler, 2)
    part_s: dict[str, float] = {}

    def part_result(name: str) -> dict:  # what a Dask task runs (cloudpickled with its closure)
        runners[name]()
        return res[name]

    remote = {}
    if client is not None:  # every part but sim is one task; sim sends its seeds in chunks itself
        remote = {name: client.submit(part_result, name, pure=False) for name in PARTS
                  if name in parts and name != "sim"}
    try:
        for name in PARTS:
            if name not in parts:
                res["skipped"][name] = "not selected (--only)"
                continue
            _progress(f"{name} ...")
            t0 = time.monotonic()
            try:
                if name in remote:
                    res[name] = remote[name].result()
                else:
                    runners[name]()
            except Exception as e:  # noqa: BLE001 - a broken part is reported and fails the campaign
                logging.getLogger(__name__).debug("part %s", name, exc_info=True)
                res["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            part_s[name] = time.monotonic() - t0
            _progress(f"{name} done in {part_s[name]:.1f} s: "
                      f"{json.dumps({k: v for k, v in res[name].items() if not isinstance(v, dict | list)})}")
    finally:
        if client is not None:
            client.close()
            if cluster is not None:
                cluster.close()
    res["seconds"] = round(time.monotonic() - t_all, 1)
    bad = failures(res)
    res["passed"] = not bad
    res["failures"] = bad
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    from testbench.sim.campaign import write_junit

    cases = [(name, "\n".join(b for b in bad if b.startswith((f"{name}.", f"{name}:"))) or None, part_s.get(name, 0.0))
             for name in PARTS if name in parts]
    args.junit = args.junit or str(out.with_name(out.stem + "-junit.xml"))
    write_junit(args.junit, [("mirrorfw.faults", cases)])
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(summary(res))
    print(f"results: {out}  junit: {args.junit}")
    return 0 if not bad else 1


def summary(res: dict) -> str:
    c, lk, d, ld, pw = res["crash"], res["link"], res["device"], res["load"], res["power"]
    lines = [
        f"fault campaign  seed {res['seed']}  {res['seconds']} s  {'PASS' if res['passed'] else 'FAIL'}",
        f"crash   injected {c['injected']}  acked_writes_lost {c['acked_writes_lost']}  "
        f"inconsistent_copies {c['inconsistent_copies']}  full_resyncs {c['full_resyncs']}"
        + (f"  not hit: {', '.join(c.get('not_hit', []))}" if c.get("not_hit") else ""),
        f"link    faults {lk['faults']}  corrupt_applied {lk['corrupt_applied']}  resync_bytes {lk['resync_bytes']}  "
        f"oos_bytes {lk['oos_bytes']}",
        f"device  faults {d['faults']}  silent_losses {d['silent_losses']}",
        "fuzz    " + "  ".join(f"{k} {v.get('cases')}/{v.get('crashes')} {v.get('cases_per_s', '?')}/s"
                              for k, v in res["fuzz"].items() if isinstance(v, dict))
        + f"  (cases/crashes cases/s, {res['fuzz'].get('engine', '?')})",
        f"dos     primary peak {res['dos'].get('nbd_peak_rss_mib')} MiB  secondary peak "
        f"{res['dos'].get('link_peak_rss_mib')} MiB  good client p99 {res['dos'].get('good_client_p99_ms')} ms  "
        f"CGs {res['dos'].get('cgs_during_attack', '-')}",
        f"load    {ld['clients']} clients x QD{ld['queue_depth']}  {ld['seconds']} s  writes {ld['writes']}  "
        f"lost {ld['lost']}  peak_rss_mib {ld['peak_rss_mib']}",
        f"power   cut_points {pw['cut_points']} ({pw['process_cuts']} in processes)  states_checked "
        f"{pw['states_checked']}  acked_writes_lost {pw['acked_writes_lost']}  inconsistent_copies "
        f"{pw['inconsistent_copies']}  full_resyncs {pw['full_resyncs']}",
        f"sim     seeds {res['sim']['seeds']}  violations {res['sim']['violations']}  "
        f"{res['sim']['scenarios_per_s']} scenarios/s per core  {res['sim'].get('cg_steps_per_s', 0)} CG steps/s",
        f"multi   {res['multi']['controllers']} controllers  injected {res['multi']['injected']}  acked_writes_lost "
        f"{res['multi']['acked_writes_lost']}  inconsistent_copies {res['multi']['inconsistent_copies']}  split_cgs "
        f"{res['multi']['split_cgs']}" + (f"  not hit: {', '.join(res['multi']['not_hit'])}"
                                         if res["multi"].get("not_hit") else ""),
    ]
    lines += [f"FAIL: {b}" for b in res["failures"]]
    lines += [f"skipped {k}: {v}" for k, v in res["skipped"].items()]
    return "\n".join(lines)
