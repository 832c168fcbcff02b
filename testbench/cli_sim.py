"""``mirrorfw sim``: deterministic simulation of whole sessions from seeds
(testbench/sim/, issue 14). Each seed is one run; a failing seed prints its
violations, a one-line repro and its shrunk event list; the coverage table
(fault kind x CG phase x controller role) and the rates close the report.
``--dask`` runs the seeds on a Dask LocalCluster, ``--scheduler`` on lab
servers running ``dask worker``; ``--matrix`` runs the trace-replay matrix."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--seeds", default="0:1000", help="A:B (B excluded) or A,B,C (default 0:1000)")
    p.add_argument("--seed", type=int, help="one seed: run it and print its event log (-q: only the result)")
    p.add_argument("--events", help="with --seed: this event list (JSON, as a repro line gives it) instead of the seed's")
    p.add_argument("-q", "--quiet", action="store_true", help="with --seed: no event log")
    p.add_argument("--no-shrink", action="store_true", help="do not shrink failing seeds")
    p.add_argument("--shrinks", type=int, default=5, help="how many failing seeds a campaign shrinks (default 5)")
    p.add_argument("--regressions", action="store_true", help="replay the checked-in regression seeds")
    p.add_argument("--matrix", nargs="?", const="", metavar="TOML",
                   help="run the trace-replay matrix (default testbench/sim/matrix.toml)")
    p.add_argument("--dask", action="store_true", help="run on a Dask LocalCluster on this machine")
    p.add_argument("--scheduler", help="run on this Dask scheduler (tcp://HOST:8786; workers: `dask worker`)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    p.add_argument("--chunk", type=int, default=50, help="seeds per Dask task (default 50)")
    p.add_argument("--out", default="faults/sim.json", help="results JSON (default faults/sim.json)")
    p.add_argument("--junit", help="JUnit XML (default: beside --out, NAME-junit.xml)")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args) -> int:
    from testbench.sim import campaign
    from testbench.sim.engine import config, run_seed, scenario

    dask = "local" if args.dask else None
    if args.seed is not None:
        events = json.loads(args.events) if args.events else scenario(args.seed)
        res = run_seed(args.seed, events)
        if not args.quiet:
            print("\n".join(res.log))
        print(json.dumps({"config": config(args.seed).as_dict(), **res.summary()}, indent=2))
        for v in res.violations:
            print(f"VIOLATION {v}")
        if res.violations and not args.no_shrink:
            s = campaign.shrink(args.seed, events)
            print(f"shrunk to {len(s['shrunk'])} of {len(events)} events ({s['shrink_runs']} runs): "
                  f"{s['shrunk_repro']}")
        return 1 if res.violations else 0
    if args.matrix is not None:
        t0 = time.monotonic()
        rows = campaign.run_matrix(args.matrix or campaign.MATRIX, dask=dask, scheduler=args.scheduler,
                                   workers=args.workers)
        bad = [r for r in rows if r["violations"]]
        for r in rows:
            print(f"{'FAIL' if r['violations'] else 'ok  '} {r['cell']}  acked {r['acked']}  CGs {r['cgs']}"
                  + "".join(f"\n    {v}" for v in r["violations"]))
        print(f"matrix: {len(rows)} cells, {len(bad)} failing, {time.monotonic() - t0:.1f} s")
        _write(args, {"matrix": rows}, [("mirrorfw.sim.matrix", [(r["cell"], "\n".join(r["violations"]) or None,
                                                                  r["seconds"]) for r in rows])])
        return 1 if bad else 0
    if args.regressions:
        bad = 0
        for seed, events, note in campaign.regression_seeds():
            res = run_seed(seed, events, keep_log=False)
            bad += bool(res.violations)
            print(f"{'FAIL' if res.violations else 'ok  '} {campaign.repro(seed, events)}  # {note}"
                  + "".join(f"\n    {v}" for v in res.violations[:3]))
        return 1 if bad else 0
    else:
        seeds = campaign.parse_seeds(args.seeds)
    total = campaign.run_campaign(seeds, dask=dask, scheduler=args.scheduler, workers=args.workers,
                                  chunk=args.chunk, shrinks=0 if args.no_shrink else args.shrinks,
                                  progress=_progress)
    print(campaign.report(total))
    _write(args, total, [("mirrorfw.sim", campaign.sim_junit_cases(total, seeds, args.chunk))])
    return 1 if total["violations"] else 0


def _write(args, data: dict, suites) -> None:
    from testbench.sim.campaign import write_junit

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    args.junit = args.junit or str(out.with_name(out.stem + "-junit.xml"))
    write_junit(args.junit, suites)
    print(f"results: {out}  junit: {args.junit}")
