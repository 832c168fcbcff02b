"""Reports: a text summary, JSON, and PNG plots (matplotlib, Agg backend).

Inputs are plain data so any part can feed them: the replay result, a list of
check results (each with the check time and data exposure), and optionally
the controller's CG records as dicts (keys used when present: ``cg_seq``,
``start_s``/``end_s`` or ``time_s``, ``ok``/``failed``, ``held_ack_ms``,
``drain_bytes``, ``drain_s``). A plot whose data is missing is skipped and
the summary says so.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    replay: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # CheckResult.as_dict() plus "time_s" since the replay start
    cgs: list[dict] = field(default_factory=list)
    write_latencies_ms: list[float] = field(default_factory=list)
    status: dict = field(default_factory=dict)  # the primary's status() at the end, if known

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.get("consistent") for c in self.checks)

    def as_dict(self) -> dict:
        exposures = [c["data_exposure_s"] for c in self.checks if c.get("data_exposure_s") is not None]
        return {
            "passed": self.passed, "replay": self.replay, "checks": self.checks, "cgs": self.cgs,
            "status": self.status,
            "summary": {
                "checks": len(self.checks), "consistent": sum(1 for c in self.checks if c.get("consistent")),
                "data_exposure_s_max": max(exposures, default=None),
                "data_exposure_s_mean": (sum(exposures) / len(exposures)) if exposures else None,
                "cgs": len(self.cgs), "cgs_failed": sum(1 for g in self.cgs if _failed(g)),
            },
        }

    def text(self) -> str:
        d = self.as_dict()
        s = d["summary"]
        lines = ["== mirrorfw run report =="]
        r = self.replay
        if r:
            lines.append(f"replay: {r.get('ios', 0)} I/Os, {r.get('writes', 0)} writes in {r.get('elapsed_s', 0):.1f} s; "
                         f"IOPS {r.get('achieved_iops', 0):.0f} achieved vs {r.get('recorded_iops', 0):.0f} recorded")
            if r.get("lateness_ms"):
                lat = r["lateness_ms"]
                lines.append(f"  lateness ms p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} max {lat['max']:.3f}")
            if r.get("write_latency_ms"):
                wl = r["write_latency_ms"]
                lines.append(f"  host write latency ms p50 {wl['p50']:.3f} p99 {wl['p99']:.3f} max {wl['max']:.3f}")
        lines.append(f"checks: {s['consistent']}/{s['checks']} consistent")
        if s["data_exposure_s_max"] is not None:
            lines.append(f"  data exposure s: mean {s['data_exposure_s_mean']:.3f}, max {s['data_exposure_s_max']:.3f}")
        for c in self.checks:
            if not c.get("consistent"):
                lines.append(f"  check at {c.get('time_s', 0):.1f} s: {c.get('violation_count')} violation(s)")
                for v in c.get("violations", [])[:5]:
                    lines.append(f"    {v['kind']}: {v['volume']} lba {v['lba']}: {v['message']}")
        if self.cgs:
            lines.append(f"consistency groups: {s['cgs']} ({s['cgs_failed']} failed)")
        lines.append("RESULT: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)

    def write(self, folder: str) -> dict[str, str]:
        """report.json, report.txt and the plots; returns what was written, by name."""
        os.makedirs(folder, exist_ok=True)
        out = {"json": os.path.join(folder, "report.json"), "text": os.path.join(folder, "report.txt")}
        with open(out["json"], "w", encoding="utf-8") as f:
            json.dump(self.as_dict(), f, indent=2, default=str)
        with open(out["text"], "w", encoding="utf-8") as f:
            f.write(self.text() + "\n")
        out.update(plot_all(self, folder))
        return out


def _failed(g: dict) -> bool:
    return bool(g.get("failed")) or g.get("ok") is False


def _time(g: dict) -> float | None:
    for k in ("end_s", "time_s", "start_s"):
        if g.get(k) is not None:
            return float(g[k])
    return None


def plot_all(rep: RunReport, folder: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}

    def save(fig, name):
        path = os.path.join(folder, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[name.removesuffix(".png")] = path

    pts = [(c["time_s"], c["data_exposure_s"]) for c in rep.checks
           if c.get("time_s") is not None and c.get("data_exposure_s") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        bad = [(c["time_s"], c.get("data_exposure_s") or 0) for c in rep.checks if not c.get("consistent")]
        if bad:
            ax.scatter([b[0] for b in bad], [b[1] for b in bad], color="red", label="inconsistent", zorder=3)
            ax.legend()
        ax.set(xlabel="time since replay start (s)", ylabel="data exposure (s)", title="RPO: data exposure at each check")
        ax.grid(alpha=0.3)
        save(fig, "rpo.png")
    if rep.write_latencies_ms:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        lat = sorted(rep.write_latencies_ms)
        ax.hist(lat, bins=60, log=True)
        ax.set(xlabel="host write latency (ms)", ylabel="writes", title=f"Host write latency ({len(lat)} writes)")
        save(fig, "latency.png")
    held = [(g.get("cg_seq", i), g["held_ack_ms"]) for i, g in enumerate(rep.cgs) if g.get("held_ack_ms") is not None]
    if held:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.bar([h[0] for h in held], [h[1] for h in held])
        ax.set(xlabel="CG", ylabel="held ack (ms)", title="Held-acknowledgement time per consistency group")
        save(fig, "held_ack.png")
    timeline = [(t, _failed(g)) for g in rep.cgs if (t := _time(g)) is not None]
    if timeline:
        fig, ax = plt.subplots(figsize=(8, 2.5))
        ok = [t for t, f in timeline if not f]
        bad = [t for t, f in timeline if f]
        ax.eventplot([ok, bad], colors=["tab:green", "tab:red"], lineoffsets=[1, 0], linelengths=0.8)
        ax.set_yticks([0, 1], ["failed", "formed"])
        ax.set(xlabel="time (s)", title="Consistency-group timeline")
        save(fig, "cg_timeline.png")
    drain = [(t, g["drain_bytes"] / max(g.get("drain_s") or 0, 1e-3) / 2**20) for g in rep.cgs
             if g.get("drain_bytes") is not None and (t := _time(g)) is not None]
    if drain:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([d[0] for d in drain], [d[1] for d in drain], marker=".")
        ax.set(xlabel="time (s)", ylabel="MiB/s", title="Drain throughput per CG")
        save(fig, "drain.png")
    missing = [n for n in ("rpo", "latency", "held_ack", "cg_timeline", "drain") if n not in written]
    if missing:
        log.info("plots skipped for lack of data: %s", ", ".join(missing))
    return written
