"""Paired comparisons over seeds, as every table reports them beside mean ± std.

Every row of a grid's seed ``s`` starts from seed ``s``'s initial weights and trains on seed
``s``'s batch order, so two rows are compared seed by seed: the difference ``a_s - b_s`` per seed,
its mean over the ``n`` seeds both rows have, and a Student-t interval for that mean,
``mean ± t(1 - (1 - level) / 2, n - 1) * sd / sqrt(n)``, with the two-sided p-value of the same
paired t-test. Fewer than :data:`MIN_SEEDS` seeds give no interval and no p-value (with 2 the t
quantile is 12.7 and the interval says nothing): the per-seed differences are printed instead.
Differences equal on every seed give an interval of zero width, printed as "all n seeds equal".
An interval that covers 0 means no difference was detected at that level with those seeds, not
that there is none. A table makes many comparisons at once: :func:`holm` adjusts their p-values
(Holm 1979), so that the chance of any false detection in the table stays below ``1 - level``.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LEVEL", "COVERS_ZERO", "MIN_SEEDS", "Paired", "paired_difference", "t_quantile", "holm"]

LEVEL = 0.95
COVERS_ZERO = "†"  # the mark beside a difference whose interval covers 0
MIN_SEEDS = 3      # the fewest seeds that get an interval and a p-value


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy ships with
    scikit-learn, a dependency)."""
    from scipy.stats import t

    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(t.ppf(p, df))


def t_sf2(t_stat: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic ``t_stat`` with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(2.0 * t.sf(abs(t_stat), df))


@dataclass(frozen=True)
class Paired:
    """``a - b`` over ``n`` paired seeds: the mean difference, its interval and p-value (NaN where
    undefined: no seed for the mean, fewer than :data:`MIN_SEEDS` for the interval), and the
    per-seed differences."""

    n: int
    mean: float
    low: float
    high: float
    diffs: tuple[float, ...] = ()
    p: float = math.nan

    @property
    def covers_zero(self) -> bool:
        return not math.isnan(self.low) and self.low <= 0.0 <= self.high

    def markdown(self, digits: int = 2, p_adjusted: float | None = None) -> str:
        """``-4.40 [-6.12, -2.68] (n=5, p_Holm=0.004)``, marked where the interval covers 0;
        ``-2.69 (n=2: -2.10, -3.28; no interval below 3 seeds)``; ``+1.00 (all 4 seeds equal)``."""
        if self.n == 0:
            return "n/a"
        mean = f"{self.mean:+.{digits}f}"
        if self.n < MIN_SEEDS:
            per_seed = ", ".join(f"{d:+.{digits}f}" for d in self.diffs)
            return f"{mean} (n={self.n}" + (f": {per_seed}" if per_seed else "") + \
                f"; no interval below {MIN_SEEDS} seeds)"
        if self.low == self.high:
            return f"{mean} (all {self.n} seeds equal)"
        mark = f" {COVERS_ZERO}" if self.covers_zero else ""
        p = "" if p_adjusted is None or math.isnan(p_adjusted) else f", p_Holm={p_adjusted:.3g}"
        return f"{mean} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark} (n={self.n}{p})"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Paired:
    """``a[s] - b[s]`` over the seeds ``s`` both map: its mean, ``level`` t-interval and p-value."""
    seeds = sorted(set(a) & set(b))
    diffs = tuple(a[s] - b[s] for s in seeds)
    n = len(diffs)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(diffs)
    if n < MIN_SEEDS:
        return Paired(n, mean, math.nan, math.nan, diffs)
    sd = statistics.stdev(diffs)
    if sd == 0.0:  # every seed the same difference: no spread to test against
        return Paired(n, mean, mean, mean, diffs, 0.0 if mean != 0.0 else 1.0)
    half = t_quantile(1.0 - (1.0 - level) / 2, n - 1) * sd / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half, diffs, t_sf2(mean / (sd / math.sqrt(n)), n - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN entries are not part of it and
    stay NaN): the k-th smallest of m becomes max over j <= k of min(1, (m - j + 1) p_(j))."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m, running, out = len(order), 0.0, [math.nan] * len(p_values)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
