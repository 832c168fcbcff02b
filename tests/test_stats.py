"""testbench.stats: the one percentile rule, on small inputs worked out by hand."""

from __future__ import annotations

import pytest

from testbench.stats import percentile, summary


def test_ten_values_by_hand():
    # n = 10: p50 is index floor(0.5 * 9 + 0.5) = 5, p99 is index floor(8.91 + 0.5) = 9
    assert summary([10, 9, 8, 7, 6, 5, 4, 3, 2, 1]) == {"p50": 6, "p99": 10, "max": 10, "count": 10}


def test_two_hundred_values_by_hand():
    # n = 200: p50 index floor(99.5 + 0.5) = 100, p99 index floor(197.01 + 0.5) = 197
    assert summary(range(1, 201)) == {"p50": 101, "p99": 198, "max": 200, "count": 200}


def test_a_tie_rounds_up():
    # two samples: the p50 rank is 0.5, which rounds up to the second sample
    assert percentile([10.0, 20.0], 0.5) == 20.0
    assert percentile([1, 2, 3], 0.5) == 2


def test_ends_are_min_and_max():
    values = [5, 3, 9, 1]
    assert percentile(values, 0.0) == 1 and percentile(values, 1.0) == 9


def test_presorted_skips_the_sort_and_gives_the_same_answer():
    s = [0.5, 1.5, 2.5, 9.0]
    assert percentile(s, 0.99, presorted=True) == percentile(list(reversed(s)), 0.99) == 9.0


def test_one_value_is_every_percentile():
    assert summary([7.5]) == {"p50": 7.5, "p99": 7.5, "max": 7.5, "count": 1}
    assert percentile([7.5], 0.01) == 7.5


def test_empty_input_makes_no_number_up():
    assert percentile([], 0.5) is None
    assert summary([]) == {"p50": None, "p99": None, "max": None, "count": 0}
    assert summary(x for x in ()) == {"p50": None, "p99": None, "max": None, "count": 0}


def test_summary_takes_a_generator_once():
    assert summary(ns / 1e6 for ns in (3_000_000, 1_000_000, 2_000_000)) == {"p50": 2.0, "p99": 3.0, "max": 3.0,
                                                                            "count": 3}


@pytest.mark.parametrize("q", [-0.1, 1.5, 99])
def test_percentile_outside_zero_to_one_is_refused(q):
    with pytest.raises(ValueError, match="between 0 and 1"):
        percentile([1, 2, 3], q)
