"""The fuzz part at scale (testbench/faults/fuzz.py): every target runs in
its worker and counts real cases; a target that raises something other than
its interface's error class, or logs a traceback, is counted as a crash;
the engines and the campaign's accounting."""

from __future__ import annotations

import json
import logging

import pytest

from testbench.faults import fuzz

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_every_target_runs_its_seeds_and_mutants_without_a_crash(name, tmp_path):
    out = tmp_path / "r.json"
    fuzz._worker(name, 150, 1, out, "mutate")
    res = json.loads(out.read_text())
    assert res["cases"] == 150
    assert res["crashes"] == 0, res["examples"]
    assert res["cases_per_s"] > 0 and res["peak_rss_mib"] < fuzz.RSS_BUDGET_MIB


def test_a_crash_and_a_logged_traceback_are_counted(tmp_path, monkeypatch):
    def broken() -> fuzz.Target:
        def run(data: bytes) -> None:
            if data[:1] == b"k":
                raise KeyError("a parser bug")
            if data[:1] == b"l":
                try:
                    raise ValueError("caught to stay up")
                except ValueError:
                    logging.getLogger("drivers.x").exception("handler failed")

        return fuzz.Target(run, [b"k", b"l", b"ok"])

    monkeypatch.setitem(fuzz.TARGETS, "broken", broken)
    counter = fuzz._Counter("broken", 3, tmp_path / "r.json", broken(), fuzz._ExcInfoLog())
    logging.getLogger().addHandler(counter.watch)
    try:
        for data in (b"k", b"l", b"ok"):
            counter.one(data)
    finally:
        logging.getLogger().removeHandler(counter.watch)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["cases"] == 3 and res["crashes"] == 2
    assert "KeyError" in res["examples"][0] and "traceback" in res["examples"][1]


def test_a_slow_case_is_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(fuzz, "HANG_S", 0.01)
    import time

    counter = fuzz._Counter("slow", 1, tmp_path / "r.json", fuzz.Target(lambda d: time.sleep(0.05), [b""]),
                            fuzz._ExcInfoLog())
    counter.one(b"x")
    assert "hang" in json.loads((tmp_path / "r.json").read_text())["examples"][0]


def test_the_sealed_link_target_did_a_real_handshake_and_reseals_what_it_mutates():
    from firmware import protocol as p

    target = fuzz._link_sealed_target()
    try:
        # Seeds are frames sealed with the keys of a real handshake; a re-sealed
        # mutant carries a MAC the secondary accepts (so its body parser runs).
        mode1 = [s for s in target.seeds if s[0] == 1]
        assert mode1
        for seed in target.seeds:
            target.run(seed)
    finally:
        target.close()
    assert p.is_sealed(mode1[0][1:])


def test_run_targets_reports_a_worker_that_dies(tmp_path):
    res = fuzz.run_targets(["config"], 50, 1, engine="mutate", jobs=1)
    assert res["config"]["cases"] == 50 and res["config"]["crashes"] == 0
    assert res["config"]["engine"] == "mutate"


def test_run_fuzz_fills_every_interface_of_results_json():
    res = fuzz.run_fuzz(40, 1, live_cases=10, engine="mutate")
    for iface in ("nbd", "link", "control", "console", "trace", "config"):
        assert res[iface]["crashes"] == 0, res[iface]["examples"]
        assert res[iface]["min_target_cases"] == 40
    assert res["nbd"]["targets"]["live_nbd"]["cases"] == 10
    assert res["link"]["targets"]["live_link"]["cases"] == 10


def test_atheris_engine_when_installed(tmp_path):
    pytest.importorskip("atheris", reason="the fuzz extra is not installed (pip install -e '.[fuzz]')")
    res = fuzz.run_targets(["control"], 300, 1, engine="atheris", jobs=1)
    assert res["control"]["cases"] == 300 and res["control"]["crashes"] == 0, res["control"]["examples"]
    assert res["control"]["coverage_edges"] > 0


def test_a_worker_measures_its_own_peak_not_its_parents():
    """ru_maxrss carries over from the process that forked the worker: under a
    775 MiB pytest worker every fuzz target read "over its 768 MiB budget"."""
    import subprocess
    import sys
    from pathlib import Path

    ballast = bytearray(400 << 20)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # resident, not just reserved
    out = subprocess.run([sys.executable, "-c", "from testbench.faults.fuzz import rss_mib; print(rss_mib())"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert float(out.stdout) < 200, out.stdout
    del ballast


def test_the_rss_budget_counts_what_the_cases_take_not_what_the_process_held_before(tmp_path, monkeypatch):
    # A target runs in-process here, after whatever this pytest worker ran before
    # (a worker at 771 MiB failed every target against the 768 MiB budget).
    monkeypatch.setattr(fuzz, "RSS_BUDGET_MIB", 48)
    held_before = bytearray(96 << 20)  # touched: resident
    calm = fuzz._Counter("calm", 1, tmp_path / "calm.json", fuzz.Target(lambda d: None, [b""]), fuzz._ExcInfoLog())
    calm.one(b"x")
    assert json.loads((tmp_path / "calm.json").read_text())["crashes"] == 0
    greedy = fuzz._Counter("greedy", 1, tmp_path / "greedy.json",
                           fuzz.Target(lambda d: bytearray(96 << 20), [b""]), fuzz._ExcInfoLog())
    greedy.one(b"x")
    res = json.loads((tmp_path / "greedy.json").read_text())
    assert res["crashes"] == 1 and "budget" in res["examples"][0]
    del held_before
