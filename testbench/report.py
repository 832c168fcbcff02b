"""Reports: a text summary, JSON, one combined figure (report.png) and one
self-contained HTML page (report.html: the figure embedded, tables inline).

Inputs are plain data so any part can feed them:

- ``replay``: ReplayResult.as_dict() (IOPS, lateness and latency summaries);
- ``checks``: CheckResult.as_dict() plus ``time_s`` since the replay start
  (and ``cg`` when known);
- ``cgs``: one dict per consistency group. Keys used when present:
  ``cg_seq``; phase times ``quiesce_s`` (CG formed, acks held),
  ``draining_s`` (CR exists, acks released: the cut), ``committing_s``,
  ``end_s`` (committed or failed) in seconds since the replay start, or the
  same as ``*_mono`` on time.monotonic() (the demo's CgFollower; turned into
  seconds with ``origin_mono_s``, the replay start on that clock);
  ``start_s``/``time_s`` (older records: one time per CG); ``ok``/``failed``,
  ``reason``, ``held_ack_ms``, ``drain_bytes``, ``initial_copy``;
- ``writes``: (issue time s since the replay start, latency ms or None, bytes)
  per host write, for IOPS, latency percentiles and host bytes over time;
- ``status``: the primary's status() at the end, if known.

The combined figure shares one time axis (0 = replay start; CGs formed
before it, e.g. the initial copy, sit at negative times): host write IOPS,
host write latency p50/p99/max per time bin, the CG Gantt, held-ack per CG
against the maximum coordination time, the RPO sawtooth with the checks'
measured exposure on it, drain bytes per CG and write amplification. A panel
without data says so in the panel.

The verdict (``RESULT:``) joins consistency with replay fidelity
(``Fidelity``): a replay that could not keep the trace's pace tested a lighter
load than asked, so PASS becomes "PASS (fidelity: degraded: …)" past the soft
limits and FAIL past the hard ones. The limits and why they sit where they do
are on ``Fidelity``; ``mirrorfw demo --fidelity-*`` sets them.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

from testbench import stats

log = logging.getLogger(__name__)

PHASES = ("quiesce", "draining", "committing", "end")
FIGURE = "report.png"
HTML = "report.html"


@dataclass
class Fidelity:
    """Limits on how far a paced replay (``original`` or ``scale=X``) may
    miss the trace's timing. Target IOPS = recorded IOPS x requested speed.

    Lateness is how long after its deadline (start + trace time / speed) an
    I/O was issued. ``degraded_*``: the run still tests what it claims but
    less exactly (a p99 of 20 ms is several CG intervals' worth of ms at the
    default 0.5 s only at the tail; 95 % of the target rate). ``fail_*``: the
    host load was not the trace's any more (1 s p99 lateness is two CG
    intervals behind for 1 % of the I/Os; under 80 % of the target rate is a
    different workload). afap replays have no target: fidelity is "n/a"."""

    degraded_lateness_p99_ms: float = 20.0
    degraded_iops_ratio: float = 0.95
    fail_lateness_p99_ms: float = 1000.0
    fail_iops_ratio: float = 0.80

    def judge(self, replay: dict) -> dict:
        """``{"verdict": ok|degraded|fail|n/a, "reasons": [...], ...}``."""
        speed = replay.get("speed")
        out: dict = {"verdict": "n/a", "reasons": [], "limits": asdict(self), "speed": speed}
        if not replay or not speed:
            out["reasons"].append("as fast as possible: no target rate" if replay else "no replay")
            return out
        target = (replay.get("recorded_iops") or 0) * speed
        achieved = replay.get("achieved_iops") or 0
        ratio = achieved / target if target > 0 else None
        p99 = (replay.get("lateness_ms") or {}).get("p99")
        out |= {"target_iops": round(target, 1), "achieved_iops": achieved,
                "iops_ratio": None if ratio is None else round(ratio, 3), "lateness_p99_ms": p99}
        fail, degraded = [], []
        if p99 is not None:
            if p99 > self.fail_lateness_p99_ms:
                fail.append(f"lateness p99 {p99:.1f} ms > {self.fail_lateness_p99_ms:g} ms")
            elif p99 > self.degraded_lateness_p99_ms:
                degraded.append(f"lateness p99 {p99:.1f} ms > {self.degraded_lateness_p99_ms:g} ms")
        if ratio is not None:
            what = f"{achieved:.0f} of {target:.0f} target IOPS ({ratio:.0%})"
            if ratio < self.fail_iops_ratio:
                fail.append(f"{what} < {self.fail_iops_ratio:.0%}")
            elif ratio < self.degraded_iops_ratio:
                degraded.append(f"{what} < {self.degraded_iops_ratio:.0%}")
        out["verdict"] = "fail" if fail else "degraded" if degraded else "ok"
        out["reasons"] = fail + degraded
        return out


@dataclass
class RunReport:
    replay: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # CheckResult.as_dict() plus "time_s" since the replay start
    cgs: list[dict] = field(default_factory=list)
    write_latencies_ms: list[float] = field(default_factory=list)
    status: dict = field(default_factory=dict)  # the primary's status() at the end, if known
    writes: list[tuple[float, float | None, int]] = field(default_factory=list, repr=False)
    origin_mono_s: float | None = None  # the replay start on time.monotonic(), for *_mono CG times
    fidelity_limits: Fidelity = field(default_factory=Fidelity)
    max_coord_ms: float | None = None  # the held-ack reference line
    bin_s: float | None = None  # time bin of the IOPS/latency panels (None: about 60 bins)

    @property
    def consistent(self) -> bool:
        return bool(self.checks) and all(c.get("consistent") for c in self.checks)

    @property
    def fidelity(self) -> dict:
        return self.fidelity_limits.judge(self.replay)

    @property
    def passed(self) -> bool:
        return self.consistent and self.fidelity["verdict"] != "fail"

    def verdict(self) -> str:
        fid = self.fidelity
        if not self.consistent:
            head = "FAIL"
        elif fid["verdict"] == "fail":
            head = "FAIL (fidelity: " + "; ".join(fid["reasons"]) + ")"
        elif fid["verdict"] == "degraded":
            head = "PASS (fidelity: degraded: " + "; ".join(fid["reasons"]) + ")"
        else:
            head = "PASS"
        return head

    def cg_rows(self) -> list[dict]:
        """The CG records with phase times in seconds since the replay start,
        ``held_ack_ms``, ``drain_bytes``, host bytes of the CG and the write
        amplification (its drain bytes / host bytes written between the
        previous CG's cut and its own: the writes it carried, approximately)."""
        rows = [_cg_times(g, self.origin_mono_s) for g in self.cgs]
        rows.sort(key=lambda r: (r.get("cg_seq") is None, r.get("cg_seq") or 0))
        issue = sorted((t, b) for t, _lat, b in self.writes)
        prev_cut = None
        for r in rows:
            cut = r.get("draining_s")
            if cut is not None and issue and not r.get("initial_copy"):
                lo = prev_cut if prev_cut is not None else -math.inf
                r["host_bytes"] = sum(b for t, b in issue if lo <= t < cut)
                if r["host_bytes"] and r.get("drain_bytes") is not None:
                    r["write_amplification"] = r["drain_bytes"] / r["host_bytes"]
            if cut is not None:
                prev_cut = cut
        return rows

    def as_dict(self) -> dict:
        exposures = [c["data_exposure_s"] for c in self.checks if c.get("data_exposure_s") is not None]
        rows = self.cg_rows()
        committed = [r for r in rows if not _failed(r)]
        drained = sum(r.get("drain_bytes") or 0 for r in rows if not r.get("initial_copy"))
        host = self.replay.get("bytes_written") or sum(b for _t, _l, b in self.writes)
        return {
            "passed": self.passed, "verdict": self.verdict(), "consistent": self.consistent,
            "fidelity": self.fidelity, "replay": self.replay, "checks": self.checks, "cgs": rows,
            "status": self.status,
            "summary": {
                "checks": len(self.checks), "consistent": sum(1 for c in self.checks if c.get("consistent")),
                "data_exposure_s_max": max(exposures, default=None),
                "data_exposure_s_mean": (sum(exposures) / len(exposures)) if exposures else None,
                "cgs": len(rows), "cgs_failed": sum(1 for g in rows if _failed(g)),
                "cgs_committed": len(committed),
                "cg_first": rows[0].get("cg_seq") if rows else None,
                "cg_last": rows[-1].get("cg_seq") if rows else None,
                "initial_copy_bytes": sum(r.get("drain_bytes") or 0 for r in rows if r.get("initial_copy")),
                "drain_bytes": drained, "host_bytes": host,
                "write_amplification": (drained / host) if host and drained else None,
                "held_ack_ms": stats.summary(r["held_ack_ms"] for r in rows if r.get("held_ack_ms") is not None),
            },
        }

    def text(self) -> str:
        d = self.as_dict()
        s = d["summary"]
        lines = ["== mirrorfw run report =="]
        r = self.replay
        if r:
            lines.append(f"replay: {r.get('ios', 0)} I/Os, {r.get('writes', 0)} writes in {r.get('elapsed_s', 0):.1f} s; "
                         f"IOPS {r.get('achieved_iops', 0):.0f} achieved vs {r.get('recorded_iops', 0):.0f} recorded"
                         + (f" (speed x{r['speed']:g})" if r.get("speed") else " (as fast as possible)"))
            if r.get("lateness_ms"):
                lat = r["lateness_ms"]
                lines.append(f"  lateness ms p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} max {lat['max']:.3f}")
            if r.get("write_latency_ms"):
                wl = r["write_latency_ms"]
                lines.append(f"  host write latency ms p50 {wl['p50']:.3f} p99 {wl['p99']:.3f} max {wl['max']:.3f}")
        fid = d["fidelity"]
        if fid["verdict"] == "n/a":
            lines.append(f"fidelity: n/a ({'; '.join(fid['reasons'])})")
        else:
            lim = self.fidelity_limits
            lines.append(f"fidelity: {fid['verdict']}: {fid['achieved_iops']:.0f} of {fid['target_iops']:.0f} target "
                         f"IOPS, lateness p99 {_num(fid['lateness_p99_ms'])} ms (degraded past "
                         f"{lim.degraded_lateness_p99_ms:g} ms or under {lim.degraded_iops_ratio:.0%}; fail past "
                         f"{lim.fail_lateness_p99_ms:g} ms or under {lim.fail_iops_ratio:.0%})")
        lines.append(f"checks: {s['consistent']}/{s['checks']} consistent")
        if s["data_exposure_s_max"] is not None:
            lines.append(f"  data exposure s: mean {s['data_exposure_s_mean']:.3f}, max {s['data_exposure_s_max']:.3f}")
        for c in self.checks:
            if not c.get("consistent"):
                lines.append(f"  check at {c.get('time_s', 0):.1f} s: {c.get('violation_count')} violation(s)")
                for v in c.get("violations", [])[:5]:
                    lines.append(f"    {v['kind']}: {v['volume']} lba {v['lba']}: {v['message']}")
        if self.cgs:
            span = (f"CG {s['cg_first']}..{s['cg_last']}" if s["cg_first"] is not None else "")
            lines.append(f"consistency groups seen by this report: {s['cgs']} ({span}; {s['cgs_committed']} committed, "
                         f"{s['cgs_failed']} failed) - the ones whose events arrived while it followed the primary; "
                         "the controller's own totals below count every CG since it started")
            if s["held_ack_ms"]["count"]:
                h = s["held_ack_ms"]
                lines.append(f"  held ack ms p50 {h['p50']:.3f} p99 {h['p99']:.3f} max {h['max']:.3f} "
                             f"({h['count']} CGs)")
            if s["initial_copy_bytes"]:
                lines.append(f"  initial copy: {_mib(s['initial_copy_bytes'])} drained")
            if s["write_amplification"] is not None:
                lines.append(f"  drained {_mib(s['drain_bytes'])} for {_mib(s['host_bytes'])} written by the host: "
                             f"write amplification {s['write_amplification']:.2f} (tracks counted whole from the CG events: an upper bound, the drain sends only changed 4 KiB segments)")
        lines.append("RESULT: " + self.verdict())
        return "\n".join(lines)

    def write(self, folder: str) -> dict[str, str]:
        """report.json, report.txt, report.png and report.html; returns what was written, by name."""
        os.makedirs(folder, exist_ok=True)
        out = {"json": os.path.join(folder, "report.json"), "text": os.path.join(folder, "report.txt")}
        with open(out["json"], "w", encoding="utf-8") as f:
            json.dump(self.as_dict(), f, indent=2, default=str)
        with open(out["text"], "w", encoding="utf-8") as f:
            f.write(self.text() + "\n")
        out["figure"] = os.path.join(folder, FIGURE)
        plot_figure(self, out["figure"])
        out["html"] = os.path.join(folder, HTML)
        with open(out["html"], "w", encoding="utf-8") as f:
            f.write(html_page(self, out["figure"]))
        return out


def _num(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _failed(g: dict) -> bool:
    return bool(g.get("failed")) or g.get("ok") is False


def _cg_times(g: dict, origin_mono_s: float | None) -> dict:
    """A copy of ``g`` with ``quiesce_s``…``end_s`` in seconds since the replay start."""
    r = dict(g)
    for p in PHASES:
        mono = r.pop(f"{p}_mono", None)
        if r.get(f"{p}_s") is None and mono is not None and origin_mono_s is not None:
            r[f"{p}_s"] = mono - origin_mono_s
    if r.get("quiesce_s") is None and r.get("start_s") is not None:
        r["quiesce_s"] = r["start_s"]
    if r.get("end_s") is None and r.get("time_s") is not None:
        r["end_s"] = r["time_s"]
    if r.get("quiesce_s") is None and r.get("end_s") is not None and r.get("cycle_s") is not None:
        # begun before the events were followed: its start from its cycle time, phases unknown until seen
        r["quiesce_s"] = r["end_s"] - r["cycle_s"]
        r["phases_unseen"] = True
    return r


def _bins(writes, bin_s: float | None):
    """Per time bin: (start s, writes/s, p50, p99, max latency ms)."""
    if not writes:
        return []
    t_end = max(t for t, _l, _b in writes)
    width = bin_s or max(0.05, _nice(t_end / 60))
    nbins = int(t_end // width) + 1
    lat: list[list[float]] = [[] for _ in range(nbins)]
    count = [0] * nbins
    for t, ms, _b in writes:
        i = max(0, int(t // width))
        count[i] += 1
        if ms is not None:
            lat[i].append(ms)
    out = []
    for i in range(nbins):
        s = stats.summary(lat[i])
        out.append((i * width, count[i] / width, s["p50"], s["p99"], s["max"]))
    return out


def _nice(x: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``x``."""
    if x <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= x)


def rpo_series(rows: list[dict], t_end: float) -> tuple[list[float], list[float]]:
    """The RPO sawtooth: at time t the secondary holds the cut of the last CG
    committed by t, so the data at risk spans t - that cut (the CG's draining
    start, when its acks were released). Rises 1 s per s; drops at each commit."""
    done = sorted((r["end_s"], r["draining_s"]) for r in rows
                  if not _failed(r) and r.get("end_s") is not None and r.get("draining_s") is not None)
    xs: list[float] = []
    ys: list[float] = []
    for i, (commit, cut) in enumerate(done):
        nxt = done[i + 1][0] if i + 1 < len(done) else max(t_end, commit)
        xs += [commit, nxt]
        ys += [commit - cut, nxt - cut]
    return xs, ys


def plot_figure(rep: RunReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep.cg_rows()
    bins = _bins(rep.writes, rep.bin_s)
    fig, axes = plt.subplots(6, 1, sharex=True, figsize=(11, 15),
                             gridspec_kw={"height_ratios": [1.2, 1.4, 2.0, 1.2, 1.6, 1.4]})
    ax_iops, ax_lat, ax_cg, ax_held, ax_rpo, ax_drain = axes
    fig.suptitle(f"mirrorfw run - {rep.verdict()}", fontsize=12,
                 color="tab:green" if rep.passed else "tab:red")
    elapsed = rep.replay.get("elapsed_s")
    for ax in axes:
        ax.grid(alpha=0.3)
        if elapsed:
            ax.axvspan(0, elapsed, color="0.93", zorder=0)  # the replay's span

    def empty(ax, what):
        ax.text(0.5, 0.5, f"no data: {what}", transform=ax.transAxes, ha="center", va="center", color="0.4")

    if bins:
        t = [b[0] for b in bins]
        ax_iops.step(t, [b[1] for b in bins], where="post", color="tab:blue")
        ax_iops.set_ylim(bottom=0)
        for q, i, style in (("p50", 2, "-"), ("p99", 3, "--"), ("max", 4, ":")):
            ax_lat.step(t, [b[i] if b[i] is not None else math.nan for b in bins], where="post", ls=style, label=q)
        ax_lat.set_yscale("log")
        ax_lat.legend(loc="upper right", fontsize=8, ncol=3)
    else:
        empty(ax_iops, "host writes")
        empty(ax_lat, "host writes")
    width = bins[1][0] - bins[0][0] if len(bins) > 1 else None
    ax_iops.set_ylabel("host writes/s")
    ax_iops.set_title("host write IOPS" + (f" ({width:g} s bins)" if width else ""), fontsize=9, loc="left")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("host write latency per bin: p50, p99, max", fontsize=9, loc="left")

    _gantt(ax_cg, rows)
    if not rows:
        empty(ax_cg, "CG records")
    held = [(r.get("draining_s") or r.get("quiesce_s") or r.get("end_s"), r["held_ack_ms"], r) for r in rows
            if r.get("held_ack_ms") is not None]
    held = [h for h in held if h[0] is not None]
    if held:
        ax_held.vlines([h[0] for h in held], 0, [h[1] for h in held], color="tab:orange", lw=1)
        ax_held.scatter([h[0] for h in held], [h[1] for h in held], s=10, color="tab:orange", zorder=3)
        ax_held.set_ylim(bottom=0)
    else:
        empty(ax_held, "held-ack times")
    if rep.max_coord_ms:
        ax_held.axhline(rep.max_coord_ms, color="tab:red", ls="--", lw=1, label=f"max coordination {rep.max_coord_ms:g} ms")
        ax_held.legend(loc="upper right", fontsize=8)
        ax_held.set_ylim(0, max(rep.max_coord_ms * 1.15, *(h[1] * 1.1 for h in held)) if held else rep.max_coord_ms * 1.2)
    ax_held.set_ylabel("held ack (ms)")
    ax_held.set_title("held-acknowledgement time per CG (at its cut)", fontsize=9, loc="left")

    t_end = max([elapsed or 0] + [c.get("time_s") or 0 for c in rep.checks])
    xs, ys = rpo_series(rows, t_end)
    if xs:
        ax_rpo.plot(xs, ys, color="tab:purple", lw=1, label="RPO from CG commits")
    pts = [(c["time_s"], c["data_exposure_s"], c.get("consistent")) for c in rep.checks
           if c.get("time_s") is not None and c.get("data_exposure_s") is not None]
    good = [p for p in pts if p[2]]
    bad = [p for p in pts if not p[2]]
    if good:
        ax_rpo.scatter([p[0] for p in good], [p[1] for p in good], color="tab:green", marker="D", s=28, zorder=3,
                       label="check: consistent (measured exposure)")
    if bad:
        ax_rpo.scatter([p[0] for p in bad], [p[1] for p in bad], color="tab:red", marker="X", s=50, zorder=4,
                       label="check: INCONSISTENT")
    no_exposure = [c for c in rep.checks if c.get("time_s") is not None and c.get("data_exposure_s") is None]
    for i, c in enumerate(no_exposure):
        ax_rpo.axvline(c["time_s"], color="tab:red" if not c.get("consistent") else "tab:green", ls=":", lw=1,
                       label=None if i else "check: no write on C yet")
    if xs or pts or no_exposure:
        ax_rpo.set_ylim(0, 1.45 * max([*ys, *(p[1] for p in pts), 0.01]))  # room for the legend
        ax_rpo.legend(loc="upper left", fontsize=8, ncol=3)
    else:
        empty(ax_rpo, "CG commits or checks")
    ax_rpo.set_ylabel("data exposure (s)")
    ax_rpo.set_title("RPO: data at risk over time, checks overlaid", fontsize=9, loc="left")

    drained = [r for r in rows if r.get("drain_bytes") is not None and r.get("end_s") is not None]
    if drained:
        x = [next(r[k] for k in ("draining_s", "quiesce_s", "end_s") if r.get(k) is not None) for r in drained]
        w = [max(r["end_s"] - xi, 0.02) for r, xi in zip(drained, x, strict=True)]
        colors = ["tab:gray" if r.get("initial_copy") else "tab:blue" for r in drained]
        ax_drain.bar(x, [r["drain_bytes"] / 2**20 for r in drained], width=w, align="edge", color=colors,
                     edgecolor="none")
        ax_drain.set_yscale("symlog", linthresh=1)
        init = [r for r in drained if r.get("initial_copy")]
        if init:
            ax_drain.annotate(f"initial copy {_mib(init[0]['drain_bytes'])}", (x[drained.index(init[0])],
                              init[0]["drain_bytes"] / 2**20), fontsize=8, xytext=(4, -10), textcoords="offset points")
        amp = [(r.get("draining_s"), r["write_amplification"]) for r in rows if r.get("write_amplification")]
        if amp:
            ax_amp = ax_drain.twinx()
            ax_amp.plot([a[0] for a in amp], [a[1] for a in amp], ".", color="tab:red", ms=4)
            ax_amp.set_ylabel("link / host bytes", color="tab:red")
            ax_amp.tick_params(axis="y", colors="tab:red")
            ax_amp.set_ylim(bottom=0)
    else:
        empty(ax_drain, "drain bytes")
    ax_drain.set_ylabel("drained (MiB)")
    ax_drain.set_title("drain bytes per CG (bar spans its drain and commit) and write amplification (red)",
                       fontsize=9, loc="left")
    ax_drain.set_xlabel("time since replay start (s); shaded: the replay")
    lo = min([0.0] + [r.get("quiesce_s") or 0 for r in rows])
    ax_drain.set_xlim(lo - 0.2, max(t_end, *(r.get("end_s") or 0 for r in rows), 0.1) + 0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _gantt(ax, rows: list[dict]) -> None:
    """One row per CG: quiesce (acks held) orange, drain blue, commit green; failed red."""
    colors = {"quiesce": "tab:orange", "draining": "tab:blue", "committing": "tab:green"}
    seen = set()
    for i, r in enumerate(rows):
        y = r.get("cg_seq", i)
        edges = [(p, r.get(f"{p}_s")) for p in PHASES]
        if r.get("phases_unseen"):
            known = next((t for p, t in edges[1:] if t is not None), None)
            if known is not None and known > r["quiesce_s"]:
                ax.broken_barh([(r["quiesce_s"], known - r["quiesce_s"])], (y - 0.4, 0.8), facecolor="none",
                               edgecolor="0.5", hatch="///", label=None if "unseen" in seen else "before following")
                seen.add("unseen")
            edges[0] = ("quiesce", None)
        for (p, a), (_q, b) in zip(edges, edges[1:], strict=False):
            if a is None or b is None:
                continue
            color = "tab:red" if _failed(r) else colors[p]
            label = None if p in seen else {"quiesce": "quiesce (acks held)", "draining": "drain",
                                             "committing": "commit"}[p]
            seen.add(p)
            ax.broken_barh([(a, max(b - a, 0.004))], (y - 0.4, 0.8), color=color, label=label)
        if _failed(r) and r.get("end_s") is not None:
            ax.plot([r["end_s"]], [y], "x", color="tab:red", ms=6, label=None if "failed" in seen else "failed")
            seen.add("failed")
        if r.get("initial_copy") and r.get("end_s") is not None:
            ax.annotate("initial copy", (r["end_s"], y), fontsize=7, xytext=(3, 0), textcoords="offset points",
                        va="center")
    if rows:
        from matplotlib.ticker import MaxNLocator

        ax.legend(loc="lower left", fontsize=8, ncol=5)
        ax.invert_yaxis()
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("CG")
    ax.set_title("consistency groups: quiesce, drain, commit", fontsize=9, loc="left")


def html_page(rep: RunReport, figure_path: str) -> str:
    """One self-contained page: no external assets, the figure as a data: URL."""
    d = rep.as_dict()
    with open(figure_path, "rb") as f:
        png = base64.b64encode(f.read()).decode("ascii")
    e = html.escape
    ok = rep.passed

    def table(head: list[str], body: list[list]) -> str:
        th = "".join(f"<th>{e(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    fid = d["fidelity"]
    fid_rows = [[k, fid.get(k) if fid.get(k) is not None else "-"]
                for k in ("verdict", "speed", "target_iops", "achieved_iops", "iops_ratio", "lateness_p99_ms")]
    fid_rows += [[f"limit {k}", v] for k, v in fid["limits"].items()]
    fid_rows += [["reason", r] for r in fid["reasons"]]
    checks = [[f"{c.get('time_s', 0):.2f}", c.get("cg", "-"), "yes" if c.get("consistent") else "NO",
               c.get("violation_count", 0), c.get("shown_writes", "-"), _num(c.get("data_exposure_s"), ".3f")]
              for c in rep.checks]
    cgs = [[r.get("cg_seq", "-"), _num(r.get("quiesce_s"), ".3f"), _num(r.get("draining_s"), ".3f"),
            _num(r.get("committing_s"), ".3f"), _num(r.get("end_s"), ".3f"), _num(r.get("held_ack_ms"), ".2f"),
            r.get("drain_bytes", "-"), r.get("host_bytes", "-"), _num(r.get("write_amplification"), ".2f"),
            ("failed: " + str(r.get("reason", ""))) if _failed(r) else
            ("committed (initial copy)" if r.get("initial_copy") else "committed")]
           for r in d["cgs"]]
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}"
             "pre{background:#f7f7f7;padding:.8em;overflow-x:auto}.pass{color:#1a7f37}.fail{color:#c62828}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>mirrorfw run report</title>"
            f"<style>{style}</style></head><body>\n"
            f"<h1 class=\"{'pass' if ok else 'fail'}\">{e(rep.verdict())}</h1>\n"
            f"<pre>{e(rep.text())}</pre>\n"
            f"<img alt=\"combined figure\" src=\"data:image/png;base64,{png}\">\n"
            f"<h2>Replay fidelity</h2>{table(['', ''], fid_rows)}\n"
            f"<h2>Checks</h2>{table(['time s', 'CG', 'consistent', 'violations', 'shown writes', 'exposure s'], checks)}\n"
            f"<h2>Consistency groups</h2>"
            f"{table(['CG', 'quiesce s', 'drain s', 'commit s', 'end s', 'held ms', 'drain bytes', 'host bytes', 'amplification', 'result'], cgs)}\n"
            "</body></html>\n")
