"""Paired comparisons over seeds, as every table reports them beside mean ± std.

Every row of a grid's seed ``s`` starts from seed ``s``'s initial weights and trains on seed
``s``'s batch order, so two rows are compared seed by seed: the difference ``a_s - b_s`` per seed,
its mean over the ``n`` seeds both rows have, and a Student-t interval for that mean,
``mean ± t(1 - (1 - level) / 2, n - 1) * sd / sqrt(n)``. One seed gives no interval. An interval
that covers 0 means no difference was detected at that level with those seeds, not that there is
none.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LEVEL", "COVERS_ZERO", "Paired", "paired_difference", "t_quantile"]

LEVEL = 0.95
COVERS_ZERO = "†"  # the mark beside a difference whose interval covers 0


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy ships with
    scikit-learn, a dependency)."""
    from scipy.stats import t

    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Paired:
    """``a - b`` over ``n`` paired seeds: the mean difference and its interval (NaN where
    undefined: no seed for the mean, fewer than two for the interval)."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def covers_zero(self) -> bool:
        return not math.isnan(self.low) and self.low <= 0.0 <= self.high

    def markdown(self, digits: int = 2) -> str:
        """``-4.40 [-6.12, -2.68] (n=5)``, marked where the interval covers 0."""
        if self.n == 0:
            return "n/a"
        interval = "no interval" if math.isnan(self.low) else \
            f"[{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        mark = f" {COVERS_ZERO}" if self.covers_zero else ""
        return f"{self.mean:+.{digits}f} {interval}{mark} (n={self.n})"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Paired:
    """``a[s] - b[s]`` over the seeds ``s`` both map: its mean and ``level`` t-interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(diffs)
    if n == 1:
        return Paired(1, mean, math.nan, math.nan)
    half = t_quantile(1.0 - (1.0 - level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half)
