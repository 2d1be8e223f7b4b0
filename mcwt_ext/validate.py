"""One check per concept the package takes from its users: a sparsity, a prune rate, a seed.

Each returns the value normalised (a float share, an int seed) and raises with the argument's
name (``what``) in the message, so the library, the grid and the command line say the same thing.
"""
from __future__ import annotations

import numbers

from .errors import UsageError

__all__ = ["check_sparsity", "check_rate", "check_seed"]


def _share(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise UsageError(f"{what} must lie in [0, 1), got {value!r}")
    return float(value)


def check_sparsity(value, what: str = "sparsity") -> float:
    """The share of a layer's weights pruned: a number in [0, 1)."""
    return _share(value, what)


def check_rate(value, what: str = "rate") -> float:
    """The share of a layer's remaining weights one IMP round prunes: a number in [0, 1)."""
    return _share(value, what)


def check_seed(value, what: str = "seed") -> int:
    """A seed: an int >= 0 (bools are not seeds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise UsageError(f"{what} must be an int >= 0, got {value!r}")
    return int(value)
