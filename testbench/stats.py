"""Percentiles and latency summaries: one convention for the whole testbench.

Percentile rule (nearest rank on the sorted samples): the ``q`` percentile of
``n`` samples is the sample at 0-based index ``floor(q * (n - 1) + 0.5)``,
i.e. the rank nearest to ``q * (n - 1)`` with halves rounded up. It is always
an observed value, never an interpolation (numpy's ``method="nearest"`` up to
the tie rule; not the ``ceil(q * n)`` textbook variant). p0 is the minimum,
p100 the maximum. firmware/quiesce.py applies the same rule to the held-ack
figures the console reports (firmware cannot import the testbench; its empty
case reads 0.0), so the bench's held-ack and RPO figures are alike.

Empty input: no number is made up. ``percentile`` gives None and ``summary``
gives ``{"p50": None, "p99": None, "max": None, "count": 0}`` (JSON null,
which the result files already use for "not measured").

Summaries are ``{"p50", "p99", "max", "count"}`` everywhere: the first three
are the keys /work/shared/RESULTS.md fixes; ``count`` is the number of
samples (never ``samples``, ``cgs`` or the like).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

SUMMARY_KEYS = ("p50", "p99", "max", "count")


def percentile(values: Iterable[float], q: float, *, presorted: bool = False) -> float | None:
    """The ``q`` (0..1) percentile of ``values`` by the rule above; None when empty.
    ``presorted=True`` skips the sort for a list already in ascending order."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile {q} is not between 0 and 1")
    s: Sequence[float] = values if presorted and isinstance(values, Sequence) else sorted(values)
    if not s:
        return None
    return s[_rank(q, len(s))]


def summary(values: Iterable[float]) -> dict:
    """``{"p50", "p99", "max", "count"}`` of ``values`` (see the module docstring
    for the empty case). Convert units before, e.g. ``summary(ns / 1e6 for ns in xs)``."""
    s = sorted(values)
    if not s:
        return dict.fromkeys(SUMMARY_KEYS[:-1]) | {"count": 0}
    n = len(s)
    return {"p50": s[_rank(0.5, n)], "p99": s[_rank(0.99, n)], "max": s[-1], "count": n}


def _rank(q: float, n: int) -> int:
    return min(n - 1, math.floor(q * (n - 1) + 0.5))
