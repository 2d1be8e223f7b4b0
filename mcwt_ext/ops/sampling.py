"""Fused mask sampling (ops ``logistic_bernoulli``, ``expected_density``, ``logistic_topk``,
``calibrate_bias``).

Each weight w of a layer (dim 0: outputs, dim 1: inputs) is kept with
probability ``p = sigmoid(u_mag*|w| + u_conn*g + bias)``, g the connectivity
of w's input channel or unit. One kernel pass computes the logit, the sigmoid
and the draw, with a counter-based RNG (Philox-4x32-10 keyed by ``seed``), so a
seed gives the same mask bit for bit on CPU and CUDA, at any thread count.
``offset`` selects an independent stream for the same seed (e.g. one per layer).

The spec is ``mcwt_ext._reference.sampling``. Sampling is not differentiable:
the inputs are detached.
"""
import math

import torch

from .. import _extension
from .._reference.sampling import check_int64, check_k, check_sampling_args

__all__ = ["logistic_bernoulli", "expected_density", "logistic_topk", "calibrate_bias"]


def _checked(op, weight, connectivity, u_mag, u_conn, bias):
    """Validated op arguments: detached tensors, float coefficients."""
    check_sampling_args(op, weight, connectivity, u_mag, u_conn, bias)
    if weight.is_cuda:
        _extension.require_kernels(weight, op)
    # detach() only where needed: on a small layer every microsecond of Python shows.
    if weight.requires_grad:
        weight = weight.detach()
    if connectivity is not None and connectivity.requires_grad:
        connectivity = connectivity.detach()
    return weight, connectivity, float(u_mag), float(u_conn), float(bias)


def logistic_bernoulli(weight, connectivity=None, *, u_mag, u_conn=0.0, bias, seed, offset=0):
    """Sample a mask: bool tensor of weight's shape, True where the weight is kept.

    Args:
        weight: float16/bfloat16/float32/float64 tensor, dim 0 outputs, dim 1 inputs.
        connectivity: optional 1-D tensor of length ``weight.size(1)`` on weight's device.
        u_mag, u_conn, bias: logit coefficients (finite).
        seed, offset: int64 Philox key and stream.
    """
    op = "logistic_bernoulli"
    args = _checked(op, weight, connectivity, u_mag, u_conn, bias)
    check_int64(op, "seed", seed)
    check_int64(op, "offset", offset)
    return torch.ops.mcwt_ext.logistic_bernoulli(*args, int(seed), int(offset))


def expected_density(weight, connectivity=None, *, u_mag, u_conn=0.0, bias):
    """Mean keep probability over the weights: the expected density of a sampled mask.

    Used to calibrate ``bias`` to a target density. NaN for an empty weight.
    """
    args = _checked("expected_density", weight, connectivity, u_mag, u_conn, bias)
    return torch.ops.mcwt_ext.expected_density(*args).item()


def logistic_topk(weight, connectivity=None, *, u_mag, u_conn=0.0, bias, k, seed, offset=0):
    """Sample a mask that keeps exactly k weights, drawn with the same relative probabilities.

    A weighted sample without replacement (Efraimidis-Spirakis keys log(u)/p,
    the k largest kept; ties go to the lower flat index). Arguments as
    :func:`logistic_bernoulli`, plus ``k`` in ``[0, weight.numel()]``.
    """
    op = "logistic_topk"
    args = _checked(op, weight, connectivity, u_mag, u_conn, bias)
    check_k(op, k, weight.numel())
    check_int64(op, "seed", seed)
    check_int64(op, "offset", offset)
    return torch.ops.mcwt_ext.logistic_topk(*args, int(k), int(seed), int(offset))


def calibrate_bias(weight, connectivity=None, *, u_mag, u_conn=0.0, density, tol=1e-7, max_iter=200):
    """``(bias, expected density at it)``: the intercept at which :func:`expected_density` is
    ``density``, by the reference's bisection (``mcwt_ext._reference.sampling.calibrate_bias``)
    run inside the op: on CUDA one launch, and this function's one read of the result is the only
    host synchronisation. Bit for bit the reference's result on CPU."""
    op = "calibrate_bias"
    if not 0.0 < density < 1.0:
        raise ValueError(f"density: must lie in (0, 1), got {density}")
    args = _checked(op, weight, connectivity, u_mag, u_conn, 0.0)[:4]
    bias, expected = torch.ops.mcwt_ext.calibrate_bias(*args, float(density), float(tol), int(max_iter)).tolist()
    if math.isnan(bias):  # CUDA's way of saying what the CPU kernel raises (raising there would sync)
        raise RuntimeError("calibrate_bias: could not bracket the target density")
    return bias, expected


@torch.library.register_fake("mcwt_ext::logistic_bernoulli")
def _logistic_bernoulli_fake(weight, connectivity, u_mag, u_conn, bias, seed, offset):
    return torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


@torch.library.register_fake("mcwt_ext::expected_density")
def _expected_density_fake(weight, connectivity, u_mag, u_conn, bias):
    return torch.empty((), dtype=torch.float64, device=weight.device)


@torch.library.register_fake("mcwt_ext::calibrate_bias")
def _calibrate_bias_fake(weight, connectivity, u_mag, u_conn, density, tol, max_iter):
    return torch.empty(2, dtype=torch.float64, device=weight.device)


@torch.library.register_fake("mcwt_ext::logistic_topk")
def _logistic_topk_fake(weight, connectivity, u_mag, u_conn, bias, k, seed, offset):
    return torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
