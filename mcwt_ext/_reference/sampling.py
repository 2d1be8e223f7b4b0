"""Reference (spec) of the mask-sampling ops, in plain PyTorch.

The C++/CUDA kernels (csrc/*/sampling_kernel.*) must equal these functions
bit for bit; expected_density to float64 rounding.

For a weight tensor (dim 0: outputs, dim 1: inputs) and an optional
connectivity vector g over dim 1, each weight is kept with probability

    p = sigmoid(u_mag * |w| + u_conn * g[c] + bias) = 1 / d,   d = 1 + exp(-z)

computed in float32, one rounding per operation (detmath.py), drawn with
Philox-4x32-10 keyed by seed (philox.py): kept iff uniform * d < 1 (that is,
uniform < p, decided without a division).
"""
import math
import numbers

import torch

from .detmath import det_log, sigmoid_denominator
from .philox import element_words

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_INT64 = (-(2**63), 2**63 - 1)


def check_sampling_args(op, weight, connectivity, u_mag, u_conn, bias):
    """Raise TypeError/ValueError naming the first bad argument of a sampling op."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{op}: weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    for name, value in (("u_mag", u_mag), ("u_conn", u_conn), ("bias", bias)):
        if type(value) is float and -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
            continue  # the common case, decided without the ABC check below (small-layer overhead)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name} must be a real number, got {value!r}")
        if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            raise ValueError(f"{op}: {name} must be finite in float32, got {value!r}")
    if connectivity is None:
        return
    if not isinstance(connectivity, torch.Tensor):
        raise TypeError(f"{op}: connectivity must be a tensor or None, got {type(connectivity).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"{op}: connectivity needs a weight with an input dim (dim 1), got weight of shape {tuple(weight.shape)}"
        )
    if connectivity.dim() != 1:
        raise ValueError(f"{op}: connectivity must be 1-D, got shape {tuple(connectivity.shape)}")
    if connectivity.shape[0] != weight.shape[1]:
        raise ValueError(
            f"{op}: connectivity must have length weight.size(1) = {weight.shape[1]}, got {connectivity.shape[0]}"
        )
    if connectivity.device != weight.device:
        raise ValueError(f"{op}: connectivity must be on {weight.device} like weight, got {connectivity.device}")
    if not connectivity.dtype.is_floating_point:
        raise TypeError(f"{op}: connectivity must be floating point, got {connectivity.dtype}")


def check_int64(op, name, value):
    """Raise unless value is an int in int64 range (seed, offset, k)."""
    if type(value) is int and _INT64[0] <= value <= _INT64[1]:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{op}: {name} must fit in int64, got {value}")


def check_k(op, k, numel):
    check_int64(op, "k", k)
    if not 0 <= k <= numel:
        raise ValueError(f"{op}: k must be in [0, weight.numel() = {numel}], got {k}")


def keep_denominator(weight, connectivity, u_mag, u_conn, bias):
    """Flat float32 d = 1 + exp(-z) of every weight, in row-major order: p = 1/d."""
    w = weight.detach().to(torch.float32)
    f32 = dict(dtype=torch.float32, device=w.device)
    if connectivity is None:
        g = torch.zeros((), **f32)  # no connectivity: g = 0 through the same operations
    else:
        g = connectivity.detach().to(torch.float32).reshape([1, -1] + [1] * (w.dim() - 2))
    a = w.abs() * torch.tensor(u_mag, **f32)
    b = g * torch.tensor(u_conn, **f32)
    z = a + b
    z = z + torch.tensor(bias, **f32)
    return sigmoid_denominator(z).reshape(-1)


def keep_probability(weight, connectivity, u_mag, u_conn, bias):
    """Flat float32 keep probability 1/d of every weight, in row-major order."""
    d = keep_denominator(weight, connectivity, u_mag, u_conn, bias)
    return torch.ones_like(d) / d


def uniform24(words):
    """Uniform in [0, 1) on the 2^-24 grid from 32-bit words: (bits >> 8) * 2^-24."""
    return (words >> 8).to(torch.float32) * 2.0**-24


def logistic_bernoulli(weight, connectivity=None, *, u_mag, u_conn=0.0, bias, seed, offset=0):
    """Bool mask of weight's shape: weight kept iff uniform * d < 1 (uniform < p = 1/d)."""
    check_sampling_args("logistic_bernoulli", weight, connectivity, u_mag, u_conn, bias)
    check_int64("logistic_bernoulli", "seed", seed)
    check_int64("logistic_bernoulli", "offset", offset)
    d = keep_denominator(weight, connectivity, u_mag, u_conn, bias)
    u = uniform24(element_words(d.numel(), seed, offset, d.device))
    return (u * d < 1.0).reshape(weight.shape)


def expected_density(weight, connectivity=None, *, u_mag, u_conn=0.0, bias):
    """Mean keep probability (float64 accumulation): the expected fraction kept. NaN when empty."""
    check_sampling_args("expected_density", weight, connectivity, u_mag, u_conn, bias)
    return keep_probability(weight, connectivity, u_mag, u_conn, bias).to(torch.float64).mean().item()


def topk_keys(d, words):
    """Efraimidis-Spirakis keys log(u')/p = log(u')*d, u' = 1 - uniform in (0, 1]; -inf where
    p = 1/d is not > 0 (d infinite or NaN)."""
    u = 1.0 - uniform24(words)
    key = det_log(u) * d
    key = torch.where(d < math.inf, key, torch.full_like(key, -math.inf))
    return key + 0.0  # -0 -> +0, as the kernels


def logistic_topk(weight, connectivity=None, *, u_mag, u_conn=0.0, bias, k, seed, offset=0):
    """Bool mask keeping exactly k weights, a weighted sample without replacement by p.

    The k largest keys win; equal keys go to the lower flat index.
    """
    check_sampling_args("logistic_topk", weight, connectivity, u_mag, u_conn, bias)
    check_k("logistic_topk", k, weight.numel())
    check_int64("logistic_topk", "seed", seed)
    check_int64("logistic_topk", "offset", offset)
    d = keep_denominator(weight, connectivity, u_mag, u_conn, bias)
    key = topk_keys(d, element_words(d.numel(), seed, offset, d.device))
    order = torch.sort(key, descending=True, stable=True).indices
    mask = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
    mask[order[:k]] = True
    return mask.reshape(weight.shape)


def calibrate_bias(weight, connectivity=None, *, u_mag, u_conn=0.0, density, tol=1e-7, max_iter=200,
                   mean_keep=expected_density):
    """``(bias, mean_keep(bias))``: the intercept at which the mean keep probability is
    ``density``, by bisection (``mean_keep`` is monotone in the bias), and the density there.

    Widens the bracket [-1, 1] by doubling until it holds the target (RuntimeError past 1e6),
    then halves it until it is narrower than ``tol`` (relative) or ``max_iter`` halvings are
    done. ``mean_keep``: this module's :func:`expected_density`, or the op's (the op
    ``calibrate_bias`` runs these same steps: bit for bit the same result on CPU).
    """
    if not 0.0 < density < 1.0:
        raise ValueError(f"density: must lie in (0, 1), got {density}")

    def mean_p(b):
        return mean_keep(weight, connectivity, u_mag=u_mag, u_conn=u_conn, bias=b)

    lo, hi = -1.0, 1.0
    while mean_p(lo) > density:  # logits are at most a few hundred wide
        lo *= 2
        if lo < -1e6:
            raise RuntimeError("calibrate_bias: could not bracket the target density")
    while mean_p(hi) < density:
        hi *= 2
        if hi > 1e6:
            raise RuntimeError("calibrate_bias: could not bracket the target density")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if mean_p(mid) < density:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * max(1.0, abs(mid)):
            break
    bias = 0.5 * (lo + hi)
    return bias, mean_p(bias)
