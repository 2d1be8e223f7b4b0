"""One check per concept: sparsity, rate, seed."""
import math

import pytest

from mcwt_ext.validate import check_rate, check_seed, check_sparsity


@pytest.mark.parametrize("check", [check_sparsity, check_rate])
def test_shares(check):
    assert check(0) == 0.0 and isinstance(check(0), float) and check(0.8) == 0.8
    for bad in (1.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"arg must lie in \[0, 1\)"):
            check(bad, "arg")
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="arg must be a number"):
            check(bad, "arg")


def test_seed():
    assert check_seed(0) == 0 and check_seed(2**40) == 2**40
    with pytest.raises(ValueError, match="split_seed must be an int >= 0"):
        check_seed(-1, "split_seed")
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="seed must be an int"):
            check_seed(bad)
