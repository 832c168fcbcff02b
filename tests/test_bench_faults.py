"""Schema tests for ``mirrorfw faults`` and ``mirrorfw bench``: every key of
RESULTS.md is present (as real processes, tiny parts, no timing asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

FAULT_KEYS = {
    "seed": None,
    "crash": {"injected", "acked_writes_lost", "inconsistent_copies", "full_resyncs"},
    "link": {"faults", "corrupt_applied", "resync_bytes", "oos_bytes"},
    "device": {"faults", "silent_losses"},
    "fuzz": {"nbd", "link", "console", "trace", "config"},
    "load": {"clients", "queue_depth", "seconds", "writes", "lost", "peak_rss_mib"},
}
BENCH_KEYS = {
    "machine": {"cores", "kernel", "python", "when"},
    "systems": {"nbdkit", "mirrorfw_local", "mirrorfw_replicating", "fio_raw"},
    "ratios": {"randwrite_4k_replicating_vs_nbdkit", "seqwrite_1m_replicating_vs_nbdkit", "randread_4k_vs_nbdkit",
               "hal_randwrite_4k_qd1_vs_fio", "hal_randwrite_4k_qd32_vs_fio", "hal_seqwrite_1m_vs_fio"},
    "held_ack_ms": {"p50", "p99", "max"},
    "rpo_s": {"p50", "p99", "max"},
    "cg_cycle_s": {"1TiB_0.1pct", "1TiB_1pct", "16TiB_0.1pct", "16TiB_1pct"},
    "rss_mib": {"primary_peak", "secondary_peak", "primary_nvram"},
}


def mirrorfw(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_keys(doc: dict, schema: dict) -> None:
    for key, sub in schema.items():
        assert key in doc, f"missing key {key}"
        if sub:
            assert isinstance(doc[key], dict), f"{key} is not an object"
            assert sub <= doc[key].keys(), f"{key} lacks {sorted(sub - doc[key].keys())}"


def test_fuzz_part_writes_every_key_and_counts_cases(tmp_path):
    out = tmp_path / "faults.json"
    run = mirrorfw("faults", "--quick", "--only", "fuzz", "--seed", "7", "--out", str(out),
                   "--workdir", str(tmp_path / "work"))
    assert out.exists(), run.stderr
    doc = json.loads(out.read_text())
    assert_keys(doc, FAULT_KEYS)
    assert doc["seed"] == 7
    for name, counts in doc["fuzz"].items():
        assert counts["cases"] > 0, (name, counts)
        assert {"cases", "crashes"} <= counts.keys()
    # exit status follows the counters
    assert (run.returncode == 0) == doc["passed"], run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "fuzz" in run.stdout and "skipped crash" in run.stdout


def test_unknown_crash_point_is_one_line_error(tmp_path):
    run = mirrorfw("faults", "--quick", "--only", "crash", "--points", "no.such.point", "--out",
                   str(tmp_path / "f.json"))
    assert run.returncode == 2
    assert "unknown crash point" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_one_crash_point_is_injected_and_counted(tmp_path):
    out = tmp_path / "faults.json"
    run = mirrorfw("faults", "--quick", "--only", "crash", "--points", "primary.after_cache_write", "--out", str(out),
                   "--workdir", str(tmp_path / "work"))
    doc = json.loads(out.read_text())
    assert_keys(doc, FAULT_KEYS)
    point = doc["crash"]["points"]["primary.after_cache_write"]
    assert point["hit"] and "error" not in point, point
    assert doc["crash"]["injected"] == 1 and doc["crash"]["errors"] == [], doc["crash"]
    assert (run.returncode == 0) == doc["passed"]


def test_bench_hal_part_writes_every_key(tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (make deps)")
    out = tmp_path / "bench.json"
    args = ["bench", "--only", "hal", "--seconds", "1", "--out", str(out), "--workdir", str(tmp_path / "work")]
    if os.geteuid() != 0:
        img = tmp_path / "hal.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        args += ["--hal-target", str(img)]
    run = mirrorfw(*args)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    assert_keys(doc, BENCH_KEYS)
    if "hal" in doc["skipped"]:
        pytest.skip(f"HAL part could not run here: {doc['skipped']['hal']}")
    for k in ("hal_randwrite_4k_qd1_vs_fio", "hal_randwrite_4k_qd32_vs_fio", "hal_seqwrite_1m_vs_fio"):
        assert doc["ratios"][k] > 0
    # parts not selected are null with a reason, never a number
    assert doc["ratios"]["randwrite_4k_replicating_vs_nbdkit"] is None
    assert "replicating" in doc["skipped"]
    assert "randwrite" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "hal_randwrite_4k_qd1_vs_fio" in run.stdout
