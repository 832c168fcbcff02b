"""Seeds by the thousand: run them (here or on Dask), shrink a failing one,
tabulate coverage, and write one JSON and one JUnit file (issue 14).

- ``run_chunk(seeds)`` runs seeds in this process and returns a summary
  (what a Dask task returns); ``merge`` adds summaries up.
- ``run_campaign(seeds, dask=..., scheduler=...)``: in this process, or on a
  Dask ``LocalCluster`` (``dask="local"``, worker processes on 127.0.0.1),
  or on a running scheduler (``scheduler="tcp://HOST:8786"``, lab servers
  running ``dask worker`` with mirrorfw installed).
- ``shrink(seed, events)``: delta debugging (ddmin) over the run's event
  list, down to a shortest list that still fails the same way.
- The trace-replay matrix: traces x CG parameters x collision policy x
  faults from a small TOML (``matrix.toml`` beside this file), each cell one
  simulated run with the trace's writes as the host workload.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from testbench.sim.engine import (
    FAULT_KINDS,
    IMPOSSIBLE,
    PHASES,
    RACE_ONLY,
    REACHABLE,
    ROLES,
    SECTORS,
    Config,
    config,
    roles_of,
    run_seed,
    scenario,
)
from testbench.sim.model import SECTOR

HERE = Path(__file__).resolve().parent
REGRESSIONS = HERE / "regressions.txt"
MATRIX = HERE / "matrix.toml"
SHRINK_RUNS = 400  # at most this many runs to shrink one seed (mirrorfw sim --seed)
CAMPAIGN_SHRINK_RUNS = 60  # in a campaign: a first cut; `mirrorfw sim --seed N` shrinks further
MAX_SHRINKS = 5  # failing seeds a campaign shrinks (the first ones)


def repro(seed: int, events: list | None = None) -> str:
    line = f"mirrorfw sim --seed {seed}"
    if events is not None:
        line += " --events '" + json.dumps(events, separators=(",", ":")) + "'"
    return line


def violation_kind(text: str) -> str:
    """What a shrunk run must still show: the check that failed."""
    return text.split(" ", 1)[0] if text.startswith("(") else text.split(":", 1)[0]


# ================================================================ running seeds
def run_chunk(seeds: Iterable[int]) -> dict:
    """Run seeds here; a summary ``merge`` can add to others."""
    out = empty()
    t0 = time.monotonic()
    for seed in seeds:
        c0 = time.process_time()
        cfg = config(seed)
        res = run_seed(seed, keep_log=False, cfg=cfg)
        out["cpu_s"] += time.process_time() - c0  # the rates count runs, not shrinking
        out["seeds"] += 1
        for role in roles_of(cfg):
            out["roles"][role] = out["roles"].get(role, 0) + 1
        out["cg_steps"] += res.cgs_committed + res.cgs_failed
        out["acked"] += res.acked
        out["virtual_s"] += res.virtual_s
        for cell in res.cells:
            out["coverage"]["|".join(cell)] = out["coverage"].get("|".join(cell), 0) + 1
        for kp in {f"{k} x {p}" for k, p, _ in res.cells}:  # RESULTS.md's "FAULT x PHASE", over every role
            out["fault_x_phase"][kp] = out["fault_x_phase"].get(kp, 0) + 1
        if res.violations:
            out["violations"].append({"seed": seed, "config": res.config, "found": res.violations[:6],
                                      "repro": repro(seed), "digest": res.log_digest})
    out["wall_s"] += time.monotonic() - t0
    return out


def empty() -> dict:
    return {"seeds": 0, "violations": [], "coverage": {}, "fault_x_phase": {}, "roles": {}, "cg_steps": 0, "acked": 0,
            "virtual_s": 0.0, "cpu_s": 0.0, "wall_s": 0.0}


def merge(a: dict, b: dict) -> dict:
    for k in ("seeds", "cg_steps", "acked", "virtual_s", "cpu_s"):
        a[k] += b[k]
    a["violations"] += b["violations"]
    for key in ("coverage", "fault_x_phase", "roles"):
        for cell, n in b[key].items():
            a[key][cell] = a[key].get(cell, 0) + n
    return a


def chunks(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def parse_seeds(text: str) -> list[int]:
    """``A:B`` (B excluded), ``N`` or ``A,B,C``."""
    if ":" in text:
        a, b = text.split(":", 1)
        return list(range(int(a), int(b)))
    return [int(x) for x in text.split(",") if x.strip()]


def dask_client(dask: str | None, scheduler: str | None, workers: int):
    """A distributed Client: on ``scheduler``, or a LocalCluster of
    ``workers`` processes (one thread each: a seed is CPU bound)."""
    import logging

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # a line per worker start and connection
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=":0", silence_logs=40)  # any free port: campaigns may overlap
    return Client(cluster), cluster


def run_campaign(seeds: list[int], *, dask: str | None = None, scheduler: str | None = None, workers: int = 2,
                 chunk: int = 50, shrinks: int = MAX_SHRINKS, client=None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Every seed, here (``dask`` None, no scheduler, no client) or on Dask;
    then the first ``shrinks`` failing seeds shrunk (the same way). Returns
    the merged summary with the rates."""
    t0 = time.monotonic()
    total = empty()
    parts = chunks(seeds, chunk)
    if dask is None and scheduler is None and client is None:
        for part in parts:
            merge(total, run_chunk(part))
            if progress:
                progress(f"sim: {total['seeds']}/{len(seeds)} seeds, {len(total['violations'])} violations")
        total["workers"] = 1
        total["violations"].sort(key=lambda v: v["seed"])
        for v in total["violations"][:shrinks]:
            v.update(shrink(v["seed"], budget=CAMPAIGN_SHRINK_RUNS))
    else:
        from distributed import as_completed

        own = client is None
        cluster = None
        if own:
            client, cluster = dask_client(dask, scheduler, workers)
        try:
            total["workers"] = len(client.scheduler_info().get("workers", {})) or workers
            for fut in as_completed(client.map(run_chunk, parts, pure=False)):
                merge(total, fut.result())
                if progress:
                    progress(f"sim (dask): {total['seeds']}/{len(seeds)} seeds, "
                             f"{len(total['violations'])} violations")
            total["violations"].sort(key=lambda v: v["seed"])
            first = total["violations"][:shrinks]
            for v, s in zip(first, client.gather(client.map(shrink, [v["seed"] for v in first],
                                                            budget=CAMPAIGN_SHRINK_RUNS, pure=False)), strict=True):
                v.update(s)
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
    total["wall_s"] = time.monotonic() - t0
    total["violations"].sort(key=lambda v: v["seed"])
    return finish(total)


def finish(total: dict) -> dict:
    cpu = max(total["cpu_s"], 1e-9)
    total["scenarios_per_s"] = round(total["seeds"] / cpu, 2)  # per core: per CPU second of the workers
    total["cg_steps_per_s"] = round(total["cg_steps"] / cpu, 1)
    total["scenarios_per_s_wall"] = round(total["seeds"] / max(total["wall_s"], 1e-9), 2)
    for k in ("virtual_s", "cpu_s", "wall_s"):
        total[k] = round(total[k], 2)
    total.update(coverage_floor(total["coverage"], total["roles"], total["seeds"]))
    return total


# ================================================================ shrinking
def fails_like(seed: int, events: list, kind: str, cfg: Config | None = None) -> bool:
    res = run_seed(seed, events, keep_log=False, cfg=cfg)
    return any(violation_kind(v) == kind for v in res.violations)


def ddmin(items: list, test: Callable[[list], bool], budget: int = SHRINK_RUNS) -> tuple[list, int]:
    """Zeller's delta debugging: a 1-minimal sublist of ``items`` on which
    ``test`` still holds (within ``budget`` tests). Returns it and the tests run."""
    runs = 0
    n = 2
    while len(items) >= 2 and runs < budget:
        size = math.ceil(len(items) / n)
        subsets = [items[i : i + size] for i in range(0, len(items), size)]
        for cand in subsets + [[x for j, s in enumerate(subsets) if j != i for x in s] for i in range(len(subsets))]:
            if runs >= budget:
                break
            runs += 1
            if cand and len(cand) < len(items) and test(cand):
                items = cand
                n = max(n - 1, 2)
                break
        else:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    return items, runs


def shrink(seed: int, events: list | None = None, cfg: Config | None = None, budget: int = SHRINK_RUNS) -> dict:
    """The shortest event list (ddmin) that fails the way ``seed`` fails."""
    cfg = cfg or config(seed)
    events = scenario(seed, cfg) if events is None else events
    first = run_seed(seed, events, keep_log=False, cfg=cfg)
    if not first.violations:
        return {"shrunk": None}
    kind = violation_kind(first.violations[0])
    if first.failed_at is not None and fails_like(seed, events[: first.failed_at + 1], kind, cfg):
        events = events[: first.failed_at + 1]  # what came after the failing check does not matter
    small, runs = ddmin(events, lambda evs: fails_like(seed, evs, kind, cfg), budget)
    found = run_seed(seed, small, keep_log=False, cfg=cfg).violations
    return {"shrunk": small, "shrunk_from": len(scenario(seed, cfg)), "shrink_runs": runs + 2, "kind": kind,
            "shrunk_found": found[:3], "shrunk_repro": repro(seed, small)}


# ================================================================ coverage
COVERAGE_TARGET = 1000  # seeds per cell at 100,000 seeds (issue 14)


def coverage_floor(coverage: dict, roles: dict, seeds: int) -> dict:
    """The fewest seeds any reachable cell got (race-only cells aside: their
    own key), over the roles the seeds' configs had (a run of
    single-controller seeds has no master cells to reach), and that floor
    projected to 100,000 seeds at the same rate."""
    cells = [c for c in REACHABLE if roles.get(c[2]) and c not in RACE_ONLY]
    counts = {c: coverage.get("|".join(c), 0) for c in cells}
    low = min(counts.values(), default=0)
    return {"coverage_reachable_cells": len(cells),
            "coverage_cells_hit": sum(1 for n in counts.values() if n),
            "coverage_min": low,
            "coverage_min_cells": ["|".join(c) for c, n in counts.items() if n == low][:10],
            "coverage_min_per_100k": round(low / seeds * 100_000) if seeds else 0,
            "coverage_race_only": {"|".join(c): coverage.get("|".join(c), 0) for c in RACE_ONLY if roles.get(c[2])}}


def coverage_table(coverage: dict, seeds: int, roles: dict | None = None) -> str:
    """fault kind x CG phase, one block per controller role present: seeds
    per cell; "n/a" where a cell cannot happen (the reasons under it), and
    the floor over the reachable cells with its projection to 100k seeds."""
    cells = {tuple(k.split("|")): n for k, n in coverage.items()}
    roles = roles or {}
    lines = []
    for role in ROLES:
        if not roles.get(role) and not any(r == role for _, _, r in cells):
            continue
        lines.append(f"role {role}  (seeds hitting each cell, of {roles.get(role, seeds)} with this role)")
        lines.append(f"  {'fault':<17}" + "".join(f"{p:>11}" for p in PHASES))
        for kind in FAULT_KINDS:
            row = []
            for p in PHASES:
                n = cells.get((kind, p, role), 0)
                impossible = (kind, p, role) in IMPOSSIBLE
                race = "~" if (kind, p, role) in RACE_ONLY else ""
                row.append("n/a" if impossible and not n else f"{n}!" if impossible else f"{race}{n}")
            if any(x not in ("0", "n/a") for x in row) or roles.get(role):
                lines.append(f"  {kind:<17}" + "".join(f"{x:>11}" for x in row))
    reasons: dict[str, list[str]] = {}
    for (kind, p, role), why in IMPOSSIBLE.items():
        if roles.get(role) or any(r == role for _, _, r in cells):
            reasons.setdefault(why, [])
            if f"{kind} x {p}" not in reasons[why]:
                reasons[why].append(f"{kind} x {p}")
    if reasons:
        lines.append("n/a: cells that cannot happen (a count with ! would mean one did):")
        lines += [f"  {why}: {', '.join(where)}" for why, where in reasons.items()]
    races: dict[str, list[str]] = {}
    for (kind, p, role), why in RACE_ONLY.items():
        if roles.get(role) and f"{kind} x {p}" not in races.setdefault(why, []):
            races[why].append(f"{kind} x {p}")
    if races:
        lines.append("~: cells only a race reaches (aimed at, not in the floor below):")
        lines += [f"  {why}: {', '.join(where)}" for why, where in races.items()]
    if roles:
        f = coverage_floor(coverage, roles, seeds)
        share = f["coverage_min"] / seeds * 100 if seeds else 0.0
        lines.append(f"min seeds per reachable cell: {f['coverage_min']} of {seeds} ({share:.2f} %; "
                     f"{f['coverage_cells_hit']}/{f['coverage_reachable_cells']} cells hit; lowest: "
                     f"{', '.join(f['coverage_min_cells'][:4])}); at 100,000 seeds: ~{f['coverage_min_per_100k']} "
                     f"per cell (target {COVERAGE_TARGET})")
    return "\n".join(lines)


def report(total: dict) -> str:
    lines = [f"sim: {total['seeds']} seeds, {len(total['violations'])} violations; "
             f"{total['scenarios_per_s']} scenarios/s per core, {total['cg_steps_per_s']} CG steps/s per core, "
             f"{total['scenarios_per_s_wall']} scenarios/s on {total.get('workers', 1)} worker(s); "
             f"{total['virtual_s']} virtual s, {total['acked']} acked writes",
             coverage_table(total["coverage"], total["seeds"], total.get("roles"))]
    for v in total["violations"]:
        lines.append(f"VIOLATION seed {v['seed']} {v['config']}")
        lines += [f"    {x}" for x in v["found"][:3]]
        lines.append(f"    repro: {v['repro']}")
        if v.get("shrunk") is not None:
            lines.append(f"    shrunk to {len(v['shrunk'])} of {v['shrunk_from']} events "
                         f"({v['shrink_runs']} runs): {v['shrunk_repro']}")
    return "\n".join(lines)


# ================================================================ outputs
def write_junit(path: str | os.PathLike, suites: list[tuple[str, list[tuple[str, str | None, float]]]]) -> None:
    """``suites``: (name, [(case name, failure text or None, seconds)])."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<testsuites>"]
    for name, cases in suites:
        fails = sum(1 for _, f, _ in cases if f)
        out.append(f"  <testsuite name={quoteattr(name)} tests=\"{len(cases)}\" failures=\"{fails}\">")
        for case, failure, secs in cases:
            out.append(f"    <testcase classname={quoteattr(name)} name={quoteattr(case)} time=\"{secs:.3f}\">")
            if failure:
                first = failure.splitlines()[0] if failure else ""
                out.append(f"      <failure message={quoteattr(first)}>{escape(failure)}</failure>")
            out.append("    </testcase>")
        out.append("  </testsuite>")
    out.append("</testsuites>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(out) + "\n")


def sim_junit_cases(total: dict, seeds: list[int], chunk: int) -> list[tuple[str, str | None, float]]:
    bad = {v["seed"]: v for v in total["violations"]}
    cases = []
    for part in chunks(seeds, chunk):
        failing = [s for s in part if s in bad]
        text = "\n".join(f"seed {s}: {bad[s]['found'][0]}\n  repro: {bad[s]['repro']}" for s in failing) or None
        cases.append((f"seeds {part[0]}:{part[-1] + 1}", text, 0.0))
    return cases


# ================================================================ regression seeds
def regression_seeds(path: str | os.PathLike = REGRESSIONS) -> list[tuple[int, list | None, str]]:
    """(seed, its shrunk events or None: the seed's own, what it found) per
    line ``SEED [EVENTS-JSON]  # note``; blank lines and comments skipped.
    The events make a line independent of how scenarios are drawn later."""
    out = []
    for line in Path(path).read_text().splitlines():
        text, _, note = line.partition("#")
        if text.strip():
            seed, _, events = text.strip().partition(" ")
            out.append((int(seed), json.loads(events) if events.strip() else None, note.strip()))
    return out


# ================================================================ the trace-replay matrix
def trace_writes(spec: str, ctls: int, limit: int, duration_s: float) -> list[list]:
    """The first ``limit`` writes of a trace (a path, or ``gen:SEED``), mapped
    onto the simulated volumes (device d -> controller d//2 % ctls, volume
    d % 2; offsets folded into the volume) and spread over ``duration_s``."""
    from testbench.traces import read_trace

    if spec.startswith("gen:"):
        from testbench.generate import GeneratorParams, generate

        records = generate(GeneratorParams(seed=int(spec[4:]), duration_s=10.0, iops=200.0, devices=4))
    else:
        path = Path(spec)
        if not path.is_absolute():
            path = HERE.parent.parent / spec
        records = read_trace(path)
    devices: dict[str, int] = {}
    picked = []
    for rec in records:
        if rec.op != "W":
            continue
        picked.append(rec)
        if len(picked) >= limit:
            break
    if not picked:
        return []
    t0, t1 = picked[0].ts_ns, max(picked[-1].ts_ns, picked[0].ts_ns + 1)
    out = []
    for rec in picked:
        d = devices.setdefault(rec.device, len(devices))
        count = max(1, min(16, rec.length_bytes // SECTOR))
        sector = (rec.offset_bytes // SECTOR) % (SECTORS - count + 1)
        t = round((rec.ts_ns - t0) / (t1 - t0) * duration_s, 6)
        out.append(["w", t, (d // 2) % ctls, d % 2, sector, count])
    return out


FAULT_RECIPES: dict[str, list[list]] = {
    # [kind, t, ...] with ctl 0; t within the 2 s a cell runs
    "none": [],
    "power-primary": [["power", 0.7, 0, "primary", 1, 0.1]],
    "power-secondary": [["power", 0.7, 0, "secondary", 1, 0.1]],
    "site": [["power", 0.9, 0, "site", 2, 0.2]],
    "crash-primary": [["crash", 0.8, 0, "primary", 0.05]],
    "linkdown": [["linkdown", 0.5, 0, 0.4]],
    "loss": [["loss", 0.3, 0, 0.2, 1.0]],
    "eio-b": [["eio", 0.6, 0, "b0", 2]],
    "cut-primary": [["arm", 0.6, 0, "primary", 7, 0.1]],
    "cut-secondary": [["arm", 0.6, 0, "secondary", 5, 0.1]],
}


def matrix_cells(path: str | os.PathLike = MATRIX) -> list[dict]:
    spec = tomllib.loads(Path(path).read_text())
    m = spec["matrix"]
    cells = []
    for trace in m["traces"]:
        for params in m["params"]:
            for policy in m["policies"]:
                for fault in m["faults"]:
                    if fault not in FAULT_RECIPES:
                        raise ValueError(f"{path}: unknown fault {fault!r}; known: {', '.join(FAULT_RECIPES)}")
                    cells.append({"trace": trace, "params": dict(params), "policy": policy, "fault": fault,
                                  "controllers": int(m.get("controllers", 1)), "writes": int(m.get("writes", 30)),
                                  "seed": int(m.get("seed", 1))})
    return cells


def cell_name(cell: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(cell["params"].items()))
    return f"{cell['trace']} [{params}] {cell['policy']} {cell['fault']}"


def run_cell(cell: dict) -> dict:
    t0 = time.monotonic()
    cfg = Config(controllers=cell["controllers"], policy=cell["policy"],
                 cg_interval_s=float(cell["params"].get("cg_interval_s", 0.02)),
                 drain_inflight=int(cell["params"].get("drain_inflight", 2)), duration_s=2.0, writes=cell["writes"])
    events = trace_writes(cell["trace"], cfg.controllers, cfg.writes, cfg.duration_s)
    events = sorted(events + [list(e) for e in FAULT_RECIPES[cell["fault"]]], key=lambda e: e[1])
    res = run_seed(cell["seed"], events, keep_log=False, cfg=cfg)
    return {"cell": cell_name(cell), **cell, "violations": res.violations[:4], "acked": res.acked,
            "cgs": res.cgs_committed + res.cgs_failed, "seconds": round(time.monotonic() - t0, 3)}


def run_matrix(path: str | os.PathLike = MATRIX, *, dask: str | None = None, scheduler: str | None = None,
               workers: int = 2) -> list[dict]:
    cells = matrix_cells(path)
    if dask is None and scheduler is None:
        return [run_cell(c) for c in cells]
    client, cluster = dask_client(dask, scheduler, workers)
    try:
        return client.gather(client.map(run_cell, cells, pure=False))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def sample_seeds(n: int, seed: int = 0) -> list[int]:
    return random.Random(seed).sample(range(1_000_000), n)


# ================================================================ the faults campaign's sim part
def sim_results(total: dict) -> dict:
    """faults/results.json "sim" (RESULTS.md keys, and the rest of the story)."""
    return {"seeds": total["seeds"], "violations": len(total["violations"]),
            "scenarios_per_s": total["scenarios_per_s"], "cg_steps_per_s": total["cg_steps_per_s"],
            "coverage": dict(sorted(total["fault_x_phase"].items())),
            "coverage_by_role": dict(sorted(total["coverage"].items())),
            **{k: total[k] for k in ("coverage_min", "coverage_min_per_100k", "coverage_min_cells",
                                     "coverage_reachable_cells", "coverage_cells_hit", "coverage_race_only")},
            "failing": [{"seed": v["seed"], "found": v["found"][:2], "repro": v["repro"],
                         "shrunk_repro": v.get("shrunk_repro")} for v in total["violations"]],
            "cpu_s": total["cpu_s"], "wall_s": total["wall_s"], "workers": total.get("workers", 1)}


def run_sim_part(seeds: list[int], *, client=None, progress: Callable[[str], None] | None = None,
                 chunk: int = 50) -> dict:
    """The faults campaign's sim part: on ``client`` (a Dask client the
    campaign runs on), else on a LocalCluster of two workers when Dask is
    installed, else here."""
    dask = None
    if client is None:
        try:
            import distributed  # noqa: F401 - only asks whether the campaign extra is installed
            dask = "local"
        except ImportError:
            pass
    total = run_campaign(seeds, dask=dask, client=client, chunk=chunk, progress=progress)
    if progress:
        progress(report(total))
    return sim_results(total)
