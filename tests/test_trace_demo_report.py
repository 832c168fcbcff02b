"""The demo core (replay then check, in process on file:// images) and the report's plots."""

from __future__ import annotations

import asyncio
import json

import pytest

from testbench.demo import replay_and_check
from testbench.generate import GeneratorParams, generate
from testbench.report import RunReport
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
    assert set(out["files"]) >= {"json", "text", "latency", "held_ack", "cg_timeline", "drain", "rpo"}
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["summary"]["cgs_failed"] == 1
    assert (tmp_path / "rep" / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "RESULT: PASS" in out["text"]


def test_report_skips_plots_it_has_no_data_for(tmp_path):
    rep = RunReport(checks=[{"consistent": False, "violation_count": 1, "time_s": 1.0, "data_exposure_s": None,
                             "violations": [{"kind": "lost-write", "volume": "vol0", "lba": 3, "message": "m"}]}])
    files = rep.write(str(tmp_path))
    assert set(files) == {"json", "text"}
    assert not rep.passed and "RESULT: FAIL" in rep.text() and "lost-write: vol0 lba 3" in rep.text()
