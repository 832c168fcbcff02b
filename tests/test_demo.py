"""`mirrorfw demo` end to end, as `make run` starts it, on a short trace:
real primary and secondary processes, replay through NBD, C checked while
CGs cycle, report and plots written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_replays_a_trace_and_every_check_finds_a_consistent_cut(tmp_path):
    trace = tmp_path / "short.iolog"
    gen = subprocess.run([sys.executable, "-m", "harness.cli", "trace", "generate", "--format", "fio3",
                          "--duration-s", "6", "--iops", "400", "--devices", "2", "--span", "16MiB",
                          "--seed", "7", str(trace)], capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    work = tmp_path / "work"
    demo = subprocess.run([sys.executable, "-m", "harness.cli", "demo", "--workdir", str(work), "--trace",
                           str(trace), "--size", "16MiB", "--nvram-size", "16MiB", "--check-every-s", "1.5",
                           "--cg-interval-s", "0.2", "--no-progress"],
                          capture_output=True, text=True, timeout=200)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert demo.stdout.rstrip().endswith("PASSED")
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["passed"] is True
    checks = report["checks"]
    assert len(checks) >= 3 and all(c["consistent"] for c in checks)
    assert checks[-1]["shown_writes"] > 0  # the final check saw the replayed writes on C
    assert report["cgs"] and not any(c.get("failed") for c in report["cgs"])
    for plot in ("rpo.png", "latency.png", "held_ack.png", "cg_timeline.png", "drain.png"):
        assert (work / "report" / plot).stat().st_size > 1000, plot
    status = json.loads((work / "report" / "status.json").read_text())
    assert status["total_successful_cgs"] >= 3


def test_demo_refuses_a_missing_trace_in_one_line(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "harness.cli", "demo", "--workdir", str(tmp_path / "w"),
                           "--trace", str(tmp_path / "nope.iolog")], capture_output=True, text=True, timeout=60)
    assert demo.returncode == 2
    assert "nope.iolog: no such file" in demo.stderr and "Traceback" not in demo.stderr
