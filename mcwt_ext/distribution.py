"""How a target sparsity is distributed over a net's layers: uniform or Erdős–Rényi-Kernel.

``uniform`` (the paper's Table 1, the default) prunes every layer to the same share, except the
layers an architecture keeps dense (:func:`mcwt_ext.models.arch_sparsity`). ``erk`` is the
Erdős–Rényi-Kernel allocation of Evci et al. (2020, "Rigging the Lottery"), as in
google-research/rigl ``rigl/sparse_utils.py`` ``get_sparsities_erdos_renyi`` (``erk_power_scale``
1): layer ``l`` keeps the share ``eps * p_l`` of its weights, with

    p_l = sum(shape_l) / prod(shape_l)    e.g. (n_out + n_in + k_h + k_w) / (n_out n_in k_h k_w)

(``(n_in + n_out) / (n_in n_out)`` for a Linear layer), and the one ``eps`` for which the pooled
layers keep in total what the uniform allocation keeps over them, ``sum of kept_count(n_l,
1 - s_l)``. A layer whose ``eps * p_l`` exceeds 1 is kept dense and ``eps`` is solved again over
the others (its weights count towards the total), as rigl does.

The pool is every layer of the uniform allocation with a sparsity above 0 except the first layer
in forward order, which ERK keeps dense and outside the total: rigl's defaults do not mask it
(``rigl/cifar_resnet/resnet_train_eval.py``: ``prune_first_layer`` False;
``rigl/imagenet_resnet/imagenet_train_eval.py``: ``first_layer_sparsity`` 0, "layer is not pruned
or masked"), so it is not among the masks ``get_sparsities_erdos_renyi`` distributes over.
Layers the architecture keeps dense stay dense and outside the total too (rigl's
``custom_sparsity_map``).

Counts are exact: layer ``l`` keeps ``floor(eps p_l n_l)`` weights, and the weights those floors
leave short of the total go one each to the layers of largest fractional part (ties: the earlier
layer in forward order). The densities returned are those counts over ``n_l``, so every consumer's
``kept_count(n, density)`` lands on them. (rigl's total is ``sum of n_l - floor(s n_l)``, ours
``sum of round(n_l (1 - s))``, the count every other path of this package keeps.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
from torch import nn

from .masks import global_goal, per_layer, prunable_layers

__all__ = ["DISTRIBUTIONS", "erk_counts", "erk_densities", "layer_sparsity"]

DISTRIBUTIONS = ("uniform", "erk")


def erk_counts(shapes: Mapping[str, Sequence[int]], total: int) -> dict[str, int]:
    """Weights each layer of ``shapes`` (in forward order) keeps under ERK, ``total`` in all.

    In exact rational arithmetic, so the caps and the rounding do not depend on float summation.
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"shapes: every layer needs at least one weight, got {dict(shapes)}")
    if not 0 <= total <= sum(sizes.values()):
        raise ValueError(f"total: must lie in [0, {sum(sizes.values())}] (the layers' size), got {total}")
    raw = {n: Fraction(sum(s), sizes[n]) for n, s in shapes.items()}
    dense: set[str] = set()
    erk = list(shapes)
    while erk:
        eps = Fraction(total - sum(sizes[n] for n in dense), sum(raw[n] * sizes[n] for n in erk))
        highest = max(raw[n] for n in erk)
        if eps * highest <= 1:
            break
        dense.update(n for n in erk if raw[n] == highest)  # rigl: the largest first, then re-solve
        erk = [n for n in shapes if n not in dense]
    exact = {n: eps * raw[n] * sizes[n] for n in erk}
    counts = {n: sizes[n] for n in dense}
    counts.update({n: math.floor(c) for n, c in exact.items()})
    short = total - sum(counts.values())  # < len(erk): the fractional parts sum to it
    by_fraction = sorted(erk, key=lambda n: exact[n] - counts[n], reverse=True)  # stable: forward order
    for n in by_fraction[:short]:
        counts[n] += 1
    return {n: counts[n] for n in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
                  ) -> dict[str, float]:
    """ERK over the layers of ``shapes`` (forward order), keeping in total what the uniform
    ``densities`` keep over them (``sum of kept_count(n, density)``): ``{name: count / n}``."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    counts = erk_counts(shapes, global_goal(sizes, densities))
    return {n: counts[n] / sizes[n] for n in shapes}


def layer_sparsity(arch: str, model: nn.Module, example_input: torch.Tensor, sparsity,
                   distribution: str = "uniform"):
    """The sparsity random pruning, pruning at init and the sampler take for ``model`` of ``arch``.

    ``uniform``: :func:`~mcwt_ext.models.arch_sparsity`, unchanged (a float, or per layer where
    the architecture keeps layers dense). ``erk``: ``{weight name: sparsity}`` over every prunable
    layer, the first (forward order) and the architecture's dense ones at 0, the rest by
    :func:`erk_densities` to the same total as uniform.
    """
    from .models import arch_sparsity

    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution: must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")
    uniform = arch_sparsity(arch, model, example_input, sparsity)
    if distribution == "uniform":
        return uniform
    device = next(model.parameters()).device
    layers = prunable_layers(model, example_input.to(device))
    names = [f"{n}.weight" for n, _ in layers]
    shares = per_layer(uniform, names, "sparsity")
    pool = {n: tuple(m.weight.shape) for n, (_, m) in zip(names[1:], layers[1:]) if shares.get(n, 0.0) > 0.0}
    if not pool and shares.get(names[0], 0.0) > 0.0:
        raise ValueError(f"distribution: erk keeps the first layer dense (as rigl), and {arch} has no "
                         f"other layer to prune")
    densities = erk_densities(pool, {n: 1.0 - shares[n] for n in pool}) if pool else {}
    empty = [n for n, d in densities.items() if d == 0.0]
    if empty:
        raise ValueError(f"distribution: erk leaves {empty} no weight at this sparsity")
    return {n: 1.0 - densities[n] if n in pool else 0.0 for n in names}
