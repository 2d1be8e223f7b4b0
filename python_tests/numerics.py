"""Tolerances for tests that compare two computation paths (marker ``numerics``).

Two paths that compute the same thing in exact arithmetic (train() and a pack, DDP and one
process, a resumed run and a whole one) differ by float rounding, and how much depends on the CPU's
instruction set and thread count (they change the order of every sum). So:

- a comparison in float32 checks one Adam step, with :func:`adam_step_tolerance` per weight;
- a comparison over many steps runs in float64 (``model.double()``, ``dataset.astype``), where
  :func:`adam_drift_bound` is 8-9 orders of magnitude below any real difference (a skipped batch,
  a wrong Adam moment: ``test_lockstep.py`` shows both fail it).

Why not float32 over many steps: Adam divides by ``sqrt(v) + eps`` (eps = 1e-8). A weight whose
gradient is near eps moves by ``lr * g / (|g| + eps)``, whose slope in g is up to ``lr / eps``:
a float32 rounding of 1e-11 in such a gradient moves the weight by 2e-7. After 100 steps train()
and a pack (test_lockstep.py) differed by 2.6e-3 natively (AVX-512 kernels, 2 threads), 1.9e-5
with SSE4.1 kernels, 4e-7 with AVX2 ones and 2.4e-7 on one thread (2-vCPU AMD EPYC, 2026-12-02):
rounding alone, magnified by an amount no bound predicts. In float64 the same runs agree to 1e-15
in all four settings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoff of float32 and float64
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which train() and the packs use


def sum_rounding(terms: int, scale: float, u: float) -> float:
    """How far two computations of a sum of ``terms`` products, each at most about ``scale``,
    in different orders (SIMD width, threads, a grouped conv against a plain one) can differ.

    Rounding errors of a long sum add up like a random walk, about sqrt(terms) * u * scale (the
    probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 2019, with lambda = 2, plus one
    path's error on each side: 2 * 2). Measured for the gradients of Conv-2 on digits (batch 60,
    3,840 terms per conv gradient): at most 23 u * scale between train() and a pack, 0.37 of
    sqrt(terms), native AVX-512 and SSE4.1 alike; the bound is 4 sqrt(terms), 11x that."""
    return 4 * math.sqrt(terms) * u * scale


def adam_step_tolerance(lr: float, grad: torch.Tensor, weight: torch.Tensor, delta: float,
                        u: float = U32) -> torch.Tensor:
    """Per weight: how far two computations of one Adam step from a fresh state can land apart
    when their gradients differ from ``grad`` by at most ``delta`` each.

    The first step moves w by ``lr * g / (|g| + eps)`` (the bias-corrected moments are g and
    g^2). Its slope in g is ``lr * eps / (|g| + eps)^2``; between two gradients within delta of
    g (mean value theorem) it is at most that at ``|g| - delta``, so the steps differ by at most
    ``lr * eps * 2 delta / (max(|g| - delta, 0) + eps)^2``, and never by more than 2 lr (each
    step lies in (-lr, lr)). On top: the rounding of the step and of ``w - step``, 2 u each of
    ``|w| + lr``, on each side."""
    slope = ADAM_EPS / ((grad.abs() - delta).clamp_min(0) + ADAM_EPS) ** 2
    return (lr * 2 * delta * slope).clamp_max(2 * lr) + 4 * u * (weight.abs() + lr)


def adam_drift_bound(steps: int, lr: float, delta: float) -> float:
    """How far two paths of ``steps`` Adam steps can drift apart when each step's gradients
    differ by at most ``delta``: each step turns that into at most ``lr * 2 delta / eps`` (Adam's
    largest slope, see :func:`adam_step_tolerance`), and the differences add up (first order: over
    these short runs the feedback of a weight difference into later gradients is far below it)."""
    return steps * lr * 2 * delta / ADAM_EPS


def sgd_drift_bound(steps: int, lr: float, momentum: float, delta: float) -> float:
    """:func:`adam_drift_bound` for SGD with momentum: the velocity sums past gradients with
    weights momentum^k, so a gradient difference of at most 2 delta per step moves the weights by
    at most ``lr * 2 delta / (1 - momentum)`` per step (``lr``: the largest rate of the schedule)."""
    return steps * lr * 2 * delta / (1 - momentum)


def float64_drift_bound(steps: int, lr: float, terms: int) -> float:
    """:func:`adam_drift_bound` in float64, the gradients' terms bounded by 1 (their largest
    element is 0.12 in these nets; a mean cross-entropy's gradient in the logits is at most 1)."""
    return adam_drift_bound(steps, lr, sum_rounding(terms, 1.0, U64))


def max_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest difference between two models' parameters and buffers."""
    return max((x.cpu().double() - y.cpu().double()).abs().max().item()
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def first_step_violations(init: nn.Module, masks: dict, x: torch.Tensor, y: torch.Tensor, lr: float,
                          a: nn.Module, b: nn.Module) -> int:
    """How many weights of ``a`` and ``b`` (each ``init`` after one masked Adam step on the batch
    ``x, y`` in float32) lie further apart than :func:`adam_step_tolerance` allows.

    The gradient is computed in float64 (the exact one, for this purpose); ``delta`` per layer is
    :func:`sum_rounding` of ``len(x) * H * W`` terms (a gradient of a conv layer sums over the batch
    and the positions; that of a linear layer over fewer) at the scale of the layer's largest
    gradient."""
    ref = _double_copy(init)
    with torch.no_grad():
        for name, m in masks.items():
            ref.get_parameter(name).mul_(m.to(torch.float64))
    F.cross_entropy(ref(x.double()), y).backward()
    terms = len(x) * x.shape[-1] * x.shape[-2]
    bad = 0
    wa, wb = a.state_dict(), b.state_dict()
    for name, p in ref.named_parameters():
        g = p.grad if name not in masks else p.grad * masks[name].to(torch.float64)
        delta = sum_rounding(terms, g.abs().max().item(), U32)
        tol = adam_step_tolerance(lr, g, wa[name].double(), delta)
        bad += int(((wa[name].double() - wb[name].double()).abs() > tol).sum())
    return bad


def _double_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).double()
