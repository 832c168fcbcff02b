"""``mirrorfw bench``: every benchmark in one run, one results file.

Parts (``--only`` picks some; the rest record null with the reason):
- ``hal``: the HAL's O_DIRECT path next to fio on a loop device (root) or a
  file (testbench.bench.hal) -> fio_raw and the three hal_* ratios;
- ``nbd``: the host port with replication off next to nbdkit
  (testbench.bench.nbd) -> mirrorfw_local, randread_4k_vs_nbdkit;
- ``replicating``: primary + secondary processes with CGs cycling next to
  nbdkit (testbench.bench.replicating) -> mirrorfw_replicating, nbdkit, the
  two replicating ratios, held_ack_ms, rpo_s, rss_mib;
- ``cg``: CG cycle time on large sparse volumes (testbench.bench.cg) -> cg_cycle_s;
- ``formation``: held acks per CG with 1, 3 and 8 controllers in one session
  (testbench.bench.formation; 1 and 3 as real processes, 8 in process) ->
  cg_formation_ms.

A part that cannot run records null figures and a reason in ``skipped``;
no number is ever made up. Keys: /work/shared/RESULTS.md.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PARTS = ("hal", "nbd", "replicating", "cg", "formation")
FORMATION_COUNTS = ("1", "3", "8")
RATIO_KEYS = ("randwrite_4k_replicating_vs_nbdkit", "seqwrite_1m_replicating_vs_nbdkit", "randread_4k_vs_nbdkit",
              "hal_randwrite_4k_qd1_vs_fio", "hal_randwrite_4k_qd32_vs_fio", "hal_seqwrite_1m_vs_fio")
CG_KEYS = ("1TiB_0.1pct", "1TiB_1pct", "16TiB_0.1pct", "16TiB_1pct")
STAT_KEYS = ("p50", "p99", "max")


def add_arguments(p) -> None:
    p.add_argument("--out", default="bench/results.json", help="results file (JSON; keys as in RESULTS.md)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per measured test (default 10)")
    p.add_argument("--workdir", help="folder for images and sockets (default: a fresh one under /tmp)")
    p.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                   help=f"run only this part (repeatable): {', '.join(PARTS)}")
    p.add_argument("--hal-target", default=None,
                   help='device for the HAL part: "loop" (root), a block device, or a file (default: loop when '
                        "root, else a 1 GiB file in the work folder)")


def empty_results() -> dict:
    return {
        "machine": machine(),
        "systems": {"nbdkit": None, "mirrorfw_local": None, "mirrorfw_replicating": None, "fio_raw": None},
        "ratios": dict.fromkeys(RATIO_KEYS),
        "held_ack_ms": dict.fromkeys(STAT_KEYS),
        "rpo_s": dict.fromkeys(STAT_KEYS),
        "cg_cycle_s": dict.fromkeys(CG_KEYS),
        "cg_formation_ms": {n: dict.fromkeys(STAT_KEYS) for n in FORMATION_COUNTS},
        "rss_mib": {"primary_peak": None, "secondary_peak": None, "primary_nvram": None},
        "skipped": {},
        "parts_s": {},
    }


def machine() -> dict:
    return {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform()}


def _call(func, **kw):
    """Call a sibling's bench entry with the keyword arguments it accepts."""
    params = inspect.signature(func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return func(**kw)
    return func(**{k: v for k, v in kw.items() if k in params})


def _find(tree, key: str):
    """The first value stored under ``key`` anywhere in a nested dict."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


# -- the parts -----------------------------------------------------------------


def part_hal(res: dict, seconds: float, work: Path, target: str | None) -> None:
    from testbench.bench.hal import run_hal_bench

    if target is None:
        if os.geteuid() == 0:
            target = "loop"
        else:
            target = str(work / "hal-bench.img")
            with open(target, "wb") as f:
                f.truncate(1 << 30)
            res["skipped"]["hal_loop"] = "not root: the HAL part ran on a file instead of a loop device"
    out = run_hal_bench(target, seconds)
    res["systems"]["fio_raw"] = {"device": out.get("device"), "fio": out.get("fio"), "hal": out.get("hal"),
                                 "direct_io": out.get("direct_io"), "event_loop": out.get("event_loop")}
    for k in ("hal_randwrite_4k_qd1_vs_fio", "hal_randwrite_4k_qd32_vs_fio", "hal_seqwrite_1m_vs_fio"):
        res["ratios"][k] = out.get(k)


def part_nbd(res: dict, seconds: float, work: Path) -> None:
    mod = importlib.import_module("testbench.bench.nbd")
    out = _call(mod.run_nbd_bench, seconds=seconds, workdir=str(work / "nbd"))
    res["systems"]["mirrorfw_local"] = out
    for key in ("randread_4k_vs_nbdkit", "randwrite_4k_local_vs_nbdkit", "seqwrite_1m_local_vs_nbdkit"):
        res["ratios"][key] = _find(out, key)
    if res["systems"]["nbdkit"] is None and isinstance(out, dict):
        res["systems"]["nbdkit"] = _find(out, "nbdkit")


def part_replicating(res: dict, seconds: float, work: Path) -> None:
    from testbench.bench.replicating import run_replicating_bench

    out = run_replicating_bench(seconds, work / "replicating")
    res["systems"]["mirrorfw_replicating"] = {k: v for k, v in out.items() if k not in ("nbdkit", "ratios")}
    res["systems"]["nbdkit"] = out["nbdkit"]  # measured in the same run as the replicating figures
    res["ratios"].update(out["ratios"])
    res["held_ack_ms"] = {k: out["held_ack_ms"].get(k) for k in STAT_KEYS}
    res["rpo_s"] = {k: out["rpo_s"].get(k) for k in STAT_KEYS}
    res["rss_mib"] = out["rss_mib"]
    res["link_bytes_per_host_byte"] = out.get("link_bytes_per_host_byte")


def part_cg(res: dict, seconds: float, work: Path) -> None:
    mod = importlib.import_module("testbench.bench.cg")
    out = _call(mod.run_cg_bench, seconds=seconds, workdir=str(work / "cg"))
    res["systems"]["cg"] = out
    for k in CG_KEYS:
        res["cg_cycle_s"][k] = _find(out, k)


def part_formation(res: dict, seconds: float, work: Path) -> None:
    from testbench.bench.formation import run_formation_bench

    out = run_formation_bench(seconds, work / "formation", counts=tuple(int(n) for n in FORMATION_COUNTS),
                              processes=(1, 3))
    res["systems"]["cg_formation"] = {"cases": out["cases"], "notes": out["notes"]}
    for n in FORMATION_COUNTS:
        got = out["cg_formation_ms"].get(n) or {}
        res["cg_formation_ms"][n] = {k: got.get(k) for k in STAT_KEYS} | {"cgs": got.get("count"),
                                                                           "mode": got.get("mode")}
    res.setdefault("notes", {})["cg_formation_ms"] = out["notes"]


def run(args) -> int:
    parts = args.only or list(PARTS)
    own = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="mirrorfw-bench-", dir="/tmp") if own else args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    res = empty_results()
    res["seconds_per_test"] = args.seconds
    runners = {
        "hal": lambda: part_hal(res, args.seconds, work, args.hal_target),
        "nbd": lambda: part_nbd(res, args.seconds, work),
        "replicating": lambda: part_replicating(res, args.seconds, work),
        "cg": lambda: part_cg(res, args.seconds, work),
        "formation": lambda: part_formation(res, args.seconds, work),
    }
    for name in PARTS:
        if name not in parts:
            res["skipped"][name] = "not selected (--only)"
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            runners[name]()
        except ModuleNotFoundError as e:
            res["skipped"][name] = f"module missing: {e.name}"
        except Exception as e:  # noqa: BLE001 - a part that cannot run records why, the others go on
            log.debug("part %s failed", name, exc_info=True)
            res["skipped"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res["parts_s"][name] = round(time.monotonic() - t0, 1)
        state = f"skipped: {res['skipped'][name]}" if name in res["skipped"] else "done"
        print(f"bench: {name} {state} ({res['parts_s'][name]} s)", file=sys.stderr, flush=True)
    if own:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))
    print(f"results: {out}")
    return 0


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"mirrorfw bench  {m['when']}  {m['cores']} cores  kernel {m['kernel']}  python {m['python']}", ""]
    lines.append(f"{'ratio (mirrorfw / peer)':<40} value")
    lines += [f"{k:<40} {_fmt(v)}" for k, v in res["ratios"].items()]
    rep = res["systems"].get("mirrorfw_replicating") or {}
    peer = res["systems"].get("nbdkit") or {}
    fig = rep.get("mirrorfw_replicating", {}) if isinstance(rep, dict) else {}
    for job in ("randwrite_4k_qd16", "seqwrite_1m_qd1"):
        a, b = fig.get(job, {}), (peer.get(job, {}) if isinstance(peer, dict) else {})
        if a or b:
            lines.append(f"  {job:<22} replicating {_fmt(a.get('iops'))} IOPS {_fmt(a.get('mib_s'))} MiB/s | "
                         f"nbdkit {_fmt(b.get('iops'))} IOPS {_fmt(b.get('mib_s'))} MiB/s")
    lines.append("")
    for key, unit in (("held_ack_ms", " ms"), ("rpo_s", " s")):
        lines.append(f"{key:<14} " + "  ".join(f"{k} {_fmt(v, unit)}" for k, v in res[key].items()))
    lines.append("cg_cycle_s     " + "  ".join(f"{k} {_fmt(v, ' s')}" for k, v in res["cg_cycle_s"].items()))
    for n in FORMATION_COUNTS:
        f = res["cg_formation_ms"].get(n) or {}
        lines.append(f"cg_formation_ms {n} controller(s): " + "  ".join(f"{k} {_fmt(f.get(k), ' ms')}" for k in STAT_KEYS)
                     + (f"  ({f.get('cgs')} CGs, {f.get('mode')})" if f.get("mode") else ""))
    lines.append("rss_mib        " + "  ".join(f"{k} {_fmt(v)}" for k, v in res["rss_mib"].items()))
    for k, why in res["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)
