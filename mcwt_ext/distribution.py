"""How a target sparsity is distributed over a net's layers: uniform, Erdős–Rényi-Kernel, or
uniform over the layers ERK does not keep whole (ERK's control).

``uniform`` (the paper's Table 1, the default) prunes every layer to the same share, except the
layers an architecture keeps dense (:func:`mcwt_ext.models.arch_sparsity`). ``erk`` is the
Erdős–Rényi-Kernel allocation of Evci et al. (2020, "Rigging the Lottery"), as in
google-research/rigl ``rigl/sparse_utils.py`` ``get_sparsities_erdos_renyi`` (``erk_power_scale``
1): layer ``l`` of the pool keeps the share ``eps * p_l`` of its weights, with

    p_l = sum(shape_l) / prod(shape_l)    e.g. (n_out + n_in + k_h + k_w) / (n_out n_in k_h k_w)

(``(n_in + n_out) / (n_in n_out)`` for a Linear layer), and the one ``eps`` for which the pool
keeps the total below. A layer whose ``eps * p_l`` exceeds 1 is kept dense and ``eps`` is solved
again over the others (its weights count towards the total), as rigl does.

The pool is every layer of the uniform allocation with a sparsity above 0 except the first layer
in forward order, which ERK keeps dense: rigl's defaults do not mask it
(``rigl/cifar_resnet/resnet_train_eval.py``: ``prune_first_layer`` False;
``rigl/imagenet_resnet/imagenet_train_eval.py``: ``first_layer_sparsity`` 0, "layer is not pruned
or masked"). Layers the architecture keeps dense stay dense (rigl's ``custom_sparsity_map``).

**The total differs from rigl's.** rigl distributes over its masks only, so the unmasked first
layer is outside its total and an ERK net keeps the whole first layer on top of what the uniform
net keeps over the other layers: more weights in all than the uniform net (as this package did
before issue 28: +461 on digits Conv-2 at 80%, +1,382 on CIFAR-10's, conv1's size less its uniform
count), so a comparison with uniform mixed the allocation with a larger budget. Here
the first layer counts towards the total: the pool keeps the uniform net's total over every
prunable layer less the first layer's size and the architecture's dense layers (dense under both),
so an ERK net keeps exactly as many weights as the uniform net it is compared with: a like-for-like
comparison, in which the allocation (the dense first layer included) is all that differs; the
control below separates the two. A sparsity at which keeping the first layer whole leaves the
pool less than nothing is refused. Runs made with rigl's total (before this rule)
record no ``erk_total``; runs made now record :data:`ERK_TOTAL` (:func:`identity_entry`), so they
never resume from each other (:data:`mcwt_ext.runs.ADDED_KEYS`).

``uniform-erk-dense`` is ERK's control: the layers ERK keeps whole (the first, those ERK's cap
fills, the architecture's) are kept whole, and the other layers share what is left of the same
total by one share (each keeps ``n_l`` times the same density, exactly). So random pruning under
ERK minus this control is the allocation alone, and this control minus uniform random pruning is
the dense layers alone, at one total kept count throughout.

Counts are exact (rational arithmetic): layer ``l`` keeps the floor of its exact share, and the
weights those floors leave short of the total go one each to the layers of largest fractional
part (ties: the earlier layer in forward order). The densities returned are those counts over
``n_l``, so every consumer's ``kept_count(n, density)`` lands on them. (rigl's per-layer total is
``n_l - floor(s n_l)``, ours ``round(n_l (1 - s))``, the count every other path of this package
keeps.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .errors import UsageError
from .masks import global_goal, kept_count, per_layer, prunable_layers

__all__ = ["DISTRIBUTIONS", "ERK_TOTAL", "LayerCount", "erk_counts", "erk_densities", "even_counts",
           "identity_entry", "layer_counts", "layer_sparsity"]

DISTRIBUTIONS = ("uniform", "erk", "uniform-erk-dense")

#: What a run under ``erk`` or ``uniform-erk-dense`` records as ``erk_total``: ERK's pool keeps the
#: uniform net's total over every prunable layer, the dense first layer counted (see above).
ERK_TOTAL = "all-layers"

#: Why a layer keeps every weight (:attr:`LayerCount.dense`).
DENSE_REASONS = {"arch": "the architecture's", "first": "first layer", "cap": "ERK's cap",
                 "rounding": "rounding"}


def identity_entry(distribution: str) -> dict:
    """What a run's identity records of the rule behind ``distribution``'s counts: nothing for
    uniform (its runs keep their identity), ``erk_total`` for the others."""
    return {} if distribution == "uniform" else dict(erk_total=ERK_TOTAL)


def _apportion(exact: Mapping[str, Fraction], total: int) -> dict[str, int]:
    """Integer counts summing to ``total`` from the exact shares ``exact`` (which sum to it):
    floors, then one more each for the largest fractional parts (ties: the earlier name)."""
    counts = {n: math.floor(c) for n, c in exact.items()}
    short = total - sum(counts.values())  # < len(exact): the fractional parts sum to it
    by_fraction = sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)  # stable: forward order
    for n in by_fraction[:short]:
        counts[n] += 1
    return counts


def _check_total(sizes: Mapping[str, int], total: int) -> None:
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"shapes: every layer needs at least one weight, got {dict(sizes)}")
    if not 0 <= total <= sum(sizes.values()):
        raise ValueError(f"total: must lie in [0, {sum(sizes.values())}] (the layers' size), got {total}")


def erk_counts(shapes: Mapping[str, Sequence[int]], total: int) -> dict[str, int]:
    """Weights each layer of ``shapes`` (in forward order) keeps under ERK, ``total`` in all.

    In exact rational arithmetic, so the caps and the rounding do not depend on float summation.
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    _check_total(sizes, total)
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
    counts = {n: sizes[n] for n in dense}
    counts.update(_apportion({n: eps * raw[n] * sizes[n] for n in erk}, total - sum(counts.values())))
    return {n: counts[n] for n in shapes}


def even_counts(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Weights each layer of ``sizes`` (forward order) keeps at one share, ``total`` in all:
    ``total * n_l / sum(n)``, apportioned exactly."""
    _check_total(sizes, total)
    whole = sum(sizes.values())
    return _apportion({n: Fraction(total * s, whole) for n, s in sizes.items()}, total) if sizes else {}


def erk_densities(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
                  ) -> dict[str, float]:
    """ERK over the layers of ``shapes`` (forward order), keeping in total what the uniform
    ``densities`` keep over them (``sum of kept_count(n, density)``): ``{name: count / n}``."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    counts = erk_counts(shapes, global_goal(sizes, densities))
    return {n: counts[n] / sizes[n] for n in shapes}


@dataclass(frozen=True)
class LayerCount:
    """One prunable layer under a distribution: its weight's name and shape, the weights it keeps,
    and why it keeps them all (a key of :data:`DENSE_REASONS`; None: pruned)."""

    name: str
    shape: tuple[int, ...]
    kept: int
    dense: str | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def layer_counts(arch: str, model: nn.Module, example_input: torch.Tensor, sparsity,
                 distribution: str = "uniform") -> list[LayerCount]:
    """Every prunable layer of ``model`` of ``arch`` (forward order) and the weights it keeps under
    ``distribution`` at ``sparsity``; the three distributions keep the same total."""
    from .models import arch_sparsity

    if distribution not in DISTRIBUTIONS:
        raise UsageError(f"distribution: must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")
    uniform = arch_sparsity(arch, model, example_input, sparsity)
    device = next(model.parameters()).device
    layers = prunable_layers(model, example_input.to(device))
    names = [f"{n}.weight" for n, _ in layers]
    shapes = {n: tuple(m.weight.shape) for n, (_, m) in zip(names, layers)}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    shares = per_layer(uniform, names, "sparsity")
    arch_dense = {n for n in names if shares.get(n, 0.0) == 0.0}
    kept = {n: kept_count(sizes[n], 1.0 - shares.get(n, 0.0)) for n in names}
    first, reason = names[0], {n: "arch" for n in arch_dense}
    if distribution != "uniform":
        pool = [n for n in names[1:] if n not in arch_dense]
        if not pool and first not in arch_dense:
            raise UsageError(f"distribution: {distribution} keeps the first layer dense (as rigl), and {arch} "
                             f"has no other layer to prune")
        spare = sizes[first] - kept[first]  # what keeping the first layer whole takes from the pool
        total = sum(kept[n] for n in pool) - spare
        if total < 0:
            raise UsageError(f"distribution: {distribution} keeps the first layer ({sizes[first]:,} weights) "
                             f"dense within uniform's total ({sum(kept.values()):,} weights at sparsity "
                             f"{sparsity}), and that leaves nothing to the other layers; give a lower sparsity")
        reason.setdefault(first, "first")
        counts = erk_counts({n: shapes[n] for n in pool}, total)
        reason.update({n: "cap" for n in pool if counts[n] == sizes[n]})
        if distribution == "uniform-erk-dense":
            rest = [n for n in pool if n not in reason]
            counts.update(even_counts({n: sizes[n] for n in rest}, total - sum(sizes[n] for n in pool if n in reason)))
        kept = {n: counts[n] if n in pool else sizes[n] for n in names}
        empty = [n for n in pool if kept[n] == 0]
        if empty:
            raise UsageError(f"distribution: {distribution} leaves {empty} no weight at this sparsity")
    return [LayerCount(n, shapes[n], kept[n], reason.get(n, "rounding" if kept[n] == sizes[n] else None))
            for n in names]


def layer_sparsity(arch: str, model: nn.Module, example_input: torch.Tensor, sparsity,
                   distribution: str = "uniform"):
    """The sparsity random pruning, pruning at init and the sampler take for ``model`` of ``arch``.

    ``uniform``: :func:`~mcwt_ext.models.arch_sparsity`, unchanged (a float, or per layer where
    the architecture keeps layers dense). ``erk`` and ``uniform-erk-dense``: ``{weight name:
    sparsity}`` over every prunable layer, by :func:`layer_counts` (the dense ones at 0), the same
    total as uniform.
    """
    from .models import arch_sparsity

    if distribution == "uniform":
        return arch_sparsity(arch, model, example_input, sparsity)
    return {c.name: 1.0 - c.kept / c.size for c in layer_counts(arch, model, example_input, sparsity, distribution)}
