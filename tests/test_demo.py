"""`mirrorfw demo` end to end, as `make run` starts it, on a short trace:
real primary and secondary processes, replay through NBD, C checked while
CGs cycle (each check a snapshot of C, read live), report and plots written;
and `mirrorfw demo --controllers 3`, a session of 3 primaries and 3
secondaries checked as one cut across all their volumes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from testbench.demo import stripe_devices
from testbench.replaylog import ReplayLog
from testbench.traces import IoRecord

# These tests judge consistency; on a loaded 2-core CI box the replay may
# fall behind the trace, which the fidelity verdict would rightly call FAIL.
LOAD_TOLERANT = ["--fidelity-fail-lateness-ms", "600000", "--fidelity-fail-iops", "0"]


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
                           "--cg-interval-s", "0.2", "--no-progress",
                           *LOAD_TOLERANT],
                          capture_output=True, text=True, timeout=200)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert demo.stdout.rstrip().endswith("PASSED")
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["passed"] is True
    checks = report["checks"]
    assert len(checks) >= 3 and all(c["consistent"] for c in checks)
    assert checks[-1]["shown_writes"] > 0  # the final check saw the replayed writes on C
    # Each check read a fresh snapshot: C moved on between checks (a copy
    # device kept open would have shown the first check's CG every time).
    cgs = [c["cg"] for c in checks]
    assert cgs == sorted(cgs) and cgs[-1] > cgs[0]
    assert checks[-1]["shown_writes"] > checks[0]["shown_writes"]
    assert report["cgs"] and not any(c.get("failed") for c in report["cgs"])
    assert (work / "report" / "report.png").stat().st_size > 20_000  # the one combined figure
    page = (work / "report" / "report.html").read_text()
    assert "data:image/png;base64," in page and "Consistency groups" in page
    assert "demo: primary: ready role=primary" in demo.stderr  # the controller's own ready line
    assert any(r.get("initial_copy") for r in report["cgs"])
    status = json.loads((work / "report" / "status.json").read_text())
    assert status["total_successful_cgs"] >= 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_with_three_controllers_checks_one_cut_across_every_volume(tmp_path):
    trace = tmp_path / "short.iolog"
    gen = subprocess.run([sys.executable, "-m", "harness.cli", "trace", "generate", "--format", "fio3",
                          "--duration-s", "6", "--iops", "300", "--devices", "2", "--span", "8MiB",
                          "--seed", "11", str(trace)], capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    work = tmp_path / "work"
    demo = subprocess.run([sys.executable, "-m", "harness.cli", "demo", "--controllers", "3", "--workdir", str(work),
                           "--trace", str(trace), "--size", "8MiB", "--nvram-size", "16MiB", "--check-every-s", "1",
                           "--cg-interval-s", "0.2", "--no-progress",
                           *LOAD_TOLERANT],
                          capture_output=True, text=True, timeout=280)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert demo.stdout.rstrip().endswith("PASSED")
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["passed"] is True
    checks = report["checks"]
    assert len(checks) >= 2 and all(c["consistent"] for c in checks)
    # One cut over 3 controllers x 2 volumes of 8 MiB (512-byte blocks), one T*.
    assert all(c["blocks"] == 6 * (8 << 20) // 512 for c in checks)
    assert checks[-1]["shown_writes"] > 0
    cgs = [c["cg"] for c in checks]
    assert cgs == sorted(cgs) and cgs[-1] > cgs[0]
    # The trace's 2 devices were striped over every controller's volumes.
    log = ReplayLog(work / "replay.log")
    names = [v.name for v in log.volumes]
    assert sorted(names) == sorted(f"c{i}/vol{v}" for i in range(3) for v in range(2))
    per_volume = Counter(names[w.volume] for w in log)
    assert all(per_volume[n] > 0 for n in names), per_volume
    status = json.loads((work / "report" / "status.json").read_text())
    assert len(status["controllers"]) == 3
    assert all(st["total_successful_cgs"] >= 3 for st in status["controllers"])
    for i in range(3):
        assert (work / f"c{i}" / "primary.log").exists() and (work / f"c{i}" / "secondary.log").exists()


def test_stripe_devices_splits_each_device_by_offset_and_keeps_every_record():
    recs = [IoRecord(i, "W", off, 4096, dev) for i, (dev, off) in enumerate(
        [("a", 0), ("a", 1 << 20), ("b", 2 << 20), ("a", 3 << 20), ("b", 5 << 20)])]
    out = list(stripe_devices(recs, 3))
    assert [r.device for r in out] == ["a#00", "a#01", "b#02", "a#00", "b#02"]
    assert [(r.ts_ns, r.offset_bytes, r.length_bytes) for r in out] == [(r.ts_ns, r.offset_bytes, r.length_bytes)
                                                                         for r in recs]
    assert list(stripe_devices(recs, 1)) == recs


def test_demo_refuses_a_missing_trace_in_one_line(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "harness.cli", "demo", "--workdir", str(tmp_path / "w"),
                           "--trace", str(tmp_path / "nope.iolog")], capture_output=True, text=True, timeout=60)
    assert demo.returncode == 2
    assert "nope.iolog: no such file" in demo.stderr and "Traceback" not in demo.stderr
