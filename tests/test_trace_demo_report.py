"""The demo core (replay then check, in process on file:// images) and the report's plots."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from testbench.demo import replay_and_check
from testbench.generate import GeneratorParams, generate
from testbench.report import Fidelity, RunReport, rpo_series
from testbench.traces import write_trace

pytestmark = pytest.mark.timeout(120)


def test_replay_and_check_reports_a_consistent_final_copy(tmp_path):
    trace = tmp_path / "t.iolog"
    write_trace(trace, "fio3", generate(GeneratorParams(seed=9, duration_s=0.4, iops=500, span_bytes=2 << 20)))
    urls = [f"file://{tmp_path}/v{i}.img?size=4MiB" for i in range(2)]
    copies = [f"file://{tmp_path}/v{i}.img" for i in range(2)]  # after the replay, A itself is a cut

    async def cgs():
        return [{"cg_seq": i, "time_s": i * 0.5, "ok": i != 2, "held_ack_ms": 1.0 + i, "drain_bytes": 1 << 20,
                 "drain_s": 0.1} for i in range(5)]

    out = asyncio.run(replay_and_check(str(trace), urls, copies, timing="afap", check_every_s=3600,
                                       report_dir=str(tmp_path / "rep"), cg_source=cgs, progress=False))
    assert out["passed"] and len(out["checks"]) == 1 and out["checks"][0]["consistent"]
    assert out["replay"]["writes"] > 50
    assert set(out["files"]) == {"json", "text", "figure", "html"}
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["summary"]["cgs_failed"] == 1
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "RESULT: PASS" in out["text"] and "fidelity: n/a (as fast as possible" in out["text"]


def test_each_check_runs_in_a_process_of_its_own(tmp_path, monkeypatch):
    """A check decodes every block of the copy: on the replay's own loop that
    stalled the replay for up to a second at a time, and the stalls were
    reported as host write latency and lateness."""
    import os

    import testbench.demo as demo

    trace = tmp_path / "t.iolog"
    write_trace(trace, "fio3", generate(GeneratorParams(seed=5, duration_s=0.3, iops=400, span_bytes=1 << 20)))
    urls = [f"file://{tmp_path}/v{i}.img?size=2MiB" for i in range(2)]
    copies = [f"file://{tmp_path}/v{i}.img" for i in range(2)]
    checkers: list[tuple[int, int]] = []  # (checking process, rows of history it was given)
    real_check = demo.CheckProcess.check

    def spy_check(self, urls, history, *args):
        given = []

        def rows():
            given.append(len(out := history()))
            return out
        result = real_check(self, urls, rows, *args)
        checkers.append((self.process.pid, given[0]))
        return result

    monkeypatch.setattr(demo.CheckProcess, "check", spy_check)
    out = asyncio.run(replay_and_check(str(trace), urls, copies, timing="afap", check_every_s=3600,
                                       progress=False))
    assert out["passed"] and out["checks"][0]["consistent"] and out["replay"]["writes"] > 20
    assert checkers and all(pid != os.getpid() for pid, _ in checkers), "a check ran in the replay's process"
    # The history is asked for once the copy has been read, every write in it.
    assert checkers[-1][1] == out["checks"][-1]["logged_writes"] == out["replay"]["writes"]


def test_report_skips_plots_it_has_no_data_for(tmp_path):
    rep = RunReport(checks=[{"consistent": False, "violation_count": 1, "time_s": 1.0, "data_exposure_s": None,
                             "violations": [{"kind": "lost-write", "volume": "vol0", "lba": 3, "message": "m"}]}])
    files = rep.write(str(tmp_path))
    assert set(files) == {"json", "text", "figure", "html"}  # the panels without data say so
    assert not rep.passed and "RESULT: FAIL" in rep.text() and "lost-write: vol0 lba 3" in rep.text()


def _paced(**over) -> dict:
    return {"ios": 6000, "writes": 4000, "elapsed_s": 60.0, "speed": 1.0, "recorded_iops": 100.0,
            "achieved_iops": 100.0, "lateness_ms": {"p50": 0.5, "p99": 3.0, "max": 9.0, "count": 6000}} | over


def test_fidelity_turns_pass_into_degraded_or_fail():
    ok = [{"consistent": True, "time_s": 1.0, "data_exposure_s": 0.5}]
    assert RunReport(replay=_paced(), checks=ok).verdict() == "PASS"
    late = RunReport(replay=_paced(lateness_ms={"p50": 1.0, "p99": 35.0, "max": 80.0, "count": 6000}), checks=ok)
    assert late.passed and late.verdict().startswith("PASS (fidelity: degraded: lateness p99 35.0 ms > 20 ms")
    # A replay that fell 4.8 s behind did not play the trace's load: FAIL, however consistent C was.
    behind = RunReport(replay=_paced(achieved_iops=92.6, lateness_ms={"p50": 900.0, "p99": 4800.0, "max": 4800.0,
                                                                          "count": 6000}), checks=ok)
    assert not behind.passed and behind.verdict().startswith("FAIL (fidelity: lateness p99 4800.0 ms > 1000 ms")
    assert "RESULT: FAIL (fidelity" in behind.text()
    slow = RunReport(replay=_paced(speed=2.0, achieved_iops=150.0), checks=ok)  # target 200 at scale=2
    assert slow.fidelity["target_iops"] == 200.0 and slow.verdict().startswith("FAIL (fidelity: 150 of 200 target")
    strict = RunReport(replay=_paced(), checks=ok, fidelity_limits=Fidelity(degraded_lateness_p99_ms=1.0))
    assert "degraded" in strict.verdict()
    assert RunReport(replay=_paced(speed=None), checks=ok).fidelity["verdict"] == "n/a"


def _cg(seq, t, *, ok=True, **over):
    return {"cg_seq": seq, "quiesce_s": t, "draining_s": t + 0.01, "committing_s": t + 0.3, "end_s": t + 0.32,
            "ok": ok, "failed": not ok, "held_ack_ms": 0.5 + seq, "drain_bytes": 1 << 20} | over


def test_report_rows_rpo_amplification_and_a_self_contained_page(tmp_path):
    cgs = [_cg(1, -1.0, initial_copy=True, drain_bytes=64 << 20), _cg(2, 0.5), _cg(3, 1.0, ok=False),
           _cg(4, 1.5)]
    # CG records on time.monotonic() become seconds since the replay start.
    cgs.append({"cg_seq": 5, "quiesce_mono": 102.0, "draining_mono": 102.01, "end_mono": 102.3, "ok": True,
                "drain_bytes": 1 << 20, "cycle_s": 0.3})
    writes = [(i * 0.01, 1.0 + (i % 7), 4096) for i in range(250)]
    checks = [{"consistent": True, "time_s": 1.2, "data_exposure_s": 0.6, "cg": 2},
              {"consistent": False, "time_s": 2.4, "data_exposure_s": 0.9, "violation_count": 3, "violations": []}]
    rep = RunReport(replay=_paced(elapsed_s=2.5), checks=checks, cgs=cgs, writes=writes, origin_mono_s=100.0,
                    max_coord_ms=50.0)
    rows = rep.cg_rows()
    assert [r["cg_seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[4]["quiesce_s"] == pytest.approx(2.0) and rows[4]["end_s"] == pytest.approx(2.3)
    assert "host_bytes" not in rows[0]  # the initial copy carried no host writes
    # CG 2 carried the writes issued before its cut (0.51 s): 51 writes of 4 KiB.
    assert rows[1]["host_bytes"] == 51 * 4096 and rows[1]["write_amplification"] == pytest.approx((1 << 20) / (51 * 4096))
    xs, ys = rpo_series(rows, 2.5)
    assert xs[0] == pytest.approx(-0.68) and ys[0] == pytest.approx(0.31)  # CG 1 committed, its cut 0.31 s old
    assert 3 not in [r["cg_seq"] for r in rows if r["end_s"] in xs]  # a failed CG moves nothing
    s = rep.as_dict()["summary"]
    assert s["initial_copy_bytes"] == 64 << 20 and s["cgs_failed"] == 1 and s["held_ack_ms"]["count"] == 4
    assert "consistency groups seen by this report: 5 (CG 1..5" in rep.text() and "RESULT: FAIL" in rep.text()
    files = rep.write(str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "<table>" in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing to fetch: one file
    assert "committed (initial copy)" in page and "failed: " in page and '<h1 class="fail">FAIL</h1>' in page
    assert Path(files["figure"]).stat().st_size > 20_000
