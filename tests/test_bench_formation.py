"""The CG formation bench (testbench.bench.formation): the per-CG figure is
the longest hold over the members, only CGs every member released count;
a short in-process run of 3 controllers measures committed CGs."""

from __future__ import annotations

import pytest

from testbench.bench.formation import formation, run_in_process


def test_formation_takes_the_longest_hold_of_each_cg_every_member_released():
    per_cg = {1: {"c0": 1.0, "c1": 3.0, "c2": 2.0}, 2: {"c0": 0.5, "c1": 0.7, "c2": 9.0}, 3: {"c0": 50.0}}
    out = formation(per_cg, 3)
    assert out["count"] == 2 and out["max"] == 9.0 and out["p50"] in (3.0, 9.0)


@pytest.mark.timeout(120)
def test_three_controllers_in_process_form_cgs_with_holds_measured():
    out = run_in_process(3, 1.0)
    assert out["mode"] == "in_process" and out["controllers"] == 3
    assert out["count"] >= 3 and out["committed"] >= out["count"] - 1 and out["failed"] == 0
    assert 0 < out["p50"] <= out["p99"] <= out["max"]
    assert out["host_writes"] > 0 and out["coord_ms"]["count"] >= out["count"]
