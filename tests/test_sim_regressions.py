"""Every seed in testbench/sim/regressions.txt, replayed (issue 14): each one
found a bug. A seed marked ``open:`` names a firmware bug reported and not
fixed yet: it must still fail (strict xfail), so whoever fixes it moves it to
the fixed ones, where it must pass for good."""

from __future__ import annotations

import pytest

from testbench.sim.campaign import regression_seeds, repro
from testbench.sim.engine import run_seed

pytestmark = pytest.mark.timeout(300)

SEEDS = regression_seeds()


def _param(i: int, seed: int, events, note: str):
    marks = [pytest.mark.xfail(strict=True, reason=note)] if note.startswith("open:") else []
    return pytest.param(seed, events, id=f"{i}-seed{seed}", marks=marks)


@pytest.mark.parametrize(("seed", "events"), [_param(i, *x) for i, x in enumerate(SEEDS)])
def test_regression_seed_holds_every_check(seed, events):
    res = run_seed(seed, events, keep_log=False)
    assert res.violations == [], f"{repro(seed, events)}: " + "; ".join(res.violations[:3])


def test_the_list_is_not_empty():
    assert len(SEEDS) >= 1
