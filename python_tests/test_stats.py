"""The paired difference to the WT with its t-interval, and the dead-unit shares, on hand-computed
cases (issue 19: every table gives both)."""
import math

import pytest
import torch

from mcwt_ext.compare import dead_units, total_dead
from mcwt_ext.experiments.stats import COVERS_ZERO, holm, paired_difference, t_quantile

# Student-t 0.975 quantiles from printed tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2), to the
# digits given there: df 2 and 4.
T975 = {2: 4.303, 4: 2.776}


def test_t_quantiles_match_the_printed_table():
    for df, value in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)  # the table's rounding
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=5e-4)  # the normal's, beyond


def test_paired_difference_by_hand():
    # seeds 0, 1, 2 paired (seed 3 only in b): differences 2, 1, 4; mean 7/3; sd sqrt(7/3)
    a, b = {0: 90.0, 1: 92.0, 2: 91.0}, {0: 88.0, 1: 91.0, 2: 87.0, 3: 99.0}
    p = paired_difference(a, b)
    half = t_quantile(0.975, 2) * math.sqrt(7 / 3) / math.sqrt(3)  # 3.7946
    assert (p.n, p.mean) == (3, pytest.approx(7 / 3, rel=1e-15))
    assert (p.low, p.high) == (pytest.approx(7 / 3 - half, rel=1e-12), pytest.approx(7 / 3 + half, rel=1e-12))
    assert p.low == pytest.approx(-1.4613, abs=5e-4) and p.high == pytest.approx(6.1279, abs=5e-4)
    assert p.covers_zero and p.markdown() == f"+2.33 [-1.46, +6.13] {COVERS_ZERO} (n=3)"
    # differences -4, -5, -3, -6, -4: mean -4.4, sd sqrt(1.3); the interval excludes 0
    q = paired_difference({s: 90.0 + d for s, d in enumerate((-4, -5, -3, -6, -4))}, dict.fromkeys(range(5), 90.0))
    assert q.low == pytest.approx(-4.4 - 2.776445 * math.sqrt(1.3 / 5), abs=1e-5)  # -5.8157
    assert not q.covers_zero and q.markdown() == "-4.40 [-5.82, -2.98] (n=5)"


def test_too_few_seeds():
    one = paired_difference({0: 3.0}, {0: 1.0, 1: 5.0})
    assert (one.n, one.mean) == (1, 2.0) and math.isnan(one.low) and not one.covers_zero
    assert one.markdown() == "+2.00 (n=1: +2.00; no interval below 3 seeds)"
    none = paired_difference({1: 3.0}, {0: 1.0})
    assert none.n == 0 and math.isnan(none.mean) and none.markdown() == "n/a"
    # two seeds: the t quantile is 12.7, so no interval and no p-value: the per-seed differences
    two = paired_difference({0: 90.0, 1: 88.0}, {0: 92.1, 1: 91.28})
    assert math.isnan(two.low) and math.isnan(two.high) and math.isnan(two.p) and not two.covers_zero
    assert two.markdown() == "-2.69 (n=2: -2.10, -3.28; no interval below 3 seeds)"


def test_equal_differences_on_every_seed_say_so():
    same = paired_difference({s: 80.0 + s for s in range(4)}, {s: 77.5 + s for s in range(4)})
    assert (same.low, same.high, same.p) == (2.5, 2.5, 0.0)
    assert same.markdown() == "+2.50 (all 4 seeds equal)"
    assert paired_difference(dict.fromkeys(range(3), 1.0), dict.fromkeys(range(3), 1.0)).p == 1.0


def test_p_value_of_the_paired_t_test_and_holm_by_hand():
    # differences 2, 1, 4: t = (7/3) / (sqrt(7/3) / sqrt(3)) = sqrt(7) = 2.6458, df 2;
    # two-sided p = 1 - 2 * sqrt(7) / (2 * sqrt(2 + 7)) ... = 1 - sqrt(7)/3 (t with 2 df: closed form)
    p = paired_difference({0: 90.0, 1: 92.0, 2: 91.0}, {0: 88.0, 1: 91.0, 2: 87.0})
    assert p.p == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-12)  # 0.11808
    assert p.markdown(p_adjusted=0.2362) == f"+2.33 [-1.46, +6.13] {COVERS_ZERO} (n=3, p_Holm=0.236)"
    # Holm over four p-values (one NaN, not in the family): 0.005 x 3, 0.01 x 2, 0.04 x 1, running max
    assert holm([0.01, 0.04, math.nan, 0.005]) == [pytest.approx(0.02), pytest.approx(0.04), pytest.approx(math.nan,
                                                    nan_ok=True), pytest.approx(0.015)]
    assert holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1, then the max


def test_dead_units_by_hand():
    conv = torch.zeros(4, 3, 3, 3, dtype=torch.bool)  # 4 filters over 3 input channels
    conv[0, 0, 1, 1] = conv[2, 0, 0, 0] = conv[2, 1, 2, 2] = True  # filters 1, 3 and channel 2 dead
    fc = torch.ones(5, 8, dtype=torch.bool)
    fc[:, 7] = False  # input unit 7 dead
    assert dead_units({"conv.weight": conv, "fc.weight": fc}) == {"conv.weight": (0.5, 1 / 3),
                                                                  "fc.weight": (0.0, 1 / 8)}
    assert total_dead({"conv.weight": conv, "fc.weight": fc}) == (2 / 9, 2 / 11)
