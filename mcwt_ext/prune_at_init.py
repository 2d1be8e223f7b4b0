"""Pruning at initialisation: the baselines MCWT is compared with (Synaptic-Flow's set).

Each score is a small function of ``(model, batches)`` that rates every prunable weight of the
untrained net; allocation turns scores into masks as a separate step:

=========== ================================ ==========================================
method      score of weight ``w``            keeps
=========== ================================ ==========================================
magnitude   ``|w|``                          the highest
snip        ``|w * dL/dw|``                  the highest  (Lee et al. 2019)
grasp       ``S = -w * (H g)``               the lowest   (Wang et al. 2020; H g by double
                                                           backprop, logits divided by T)
synflow     ``|w * dR/dw|``, ``R = sum of    the highest, pruned over 100 rounds with the
            the linearised net's output``                 exponential schedule (Tanaka et al. 2020)
=========== ================================ ==========================================

``L`` is the mean cross-entropy over the scoring samples (a class-balanced, seeded draw from
the training data: 10 per class by default, as in GraSP and Synaptic-Flow), so scores do not
depend on the batch size. SynFlow is data-free: its net is a float64 copy with every parameter
and buffer replaced by its absolute value, fed one all-ones input; round ``r`` of ``R`` keeps
``density ** (r / R)`` of the weights, pruned weights staying pruned.

Allocation ``"layer"`` (default) keeps exactly ``kept_count(n, density)`` weights of each layer,
the count of IMP's last round and of the random baseline; ``"global"`` keeps the same total
count, the best scores over all layers. Ties keep the lower flat index (layers in forward order
for global allocation), so masks are deterministic.

Scores see the net as it is evaluated: the model is put in eval mode while scoring (BatchNorm uses
its running statistics and is not updated, dropout is off) and given back in its own mode. The
model's weights and ``.grad`` are never changed.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models import eval_mode
from .masks import global_goal, kept_count, per_layer, prunable_layers
from .progress import Progress

__all__ = ["METHODS", "ALLOCATIONS", "prune_at_init", "magnitude_scores", "snip_scores",
           "grasp_scores", "synflow_scores", "synflow_masks", "synflow_schedule", "allocate",
           "scoring_batches"]

METHODS = ("magnitude", "snip", "grasp", "synflow")
ALLOCATIONS = ("layer", "global")
#: GraSP's temperature (the logits are divided by it), as in the GraSP and Synaptic-Flow code.
GRASP_TEMPERATURE = 200.0
SYNFLOW_ROUNDS = 100

Scores = dict[str, torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


# --- helpers -------------------------------------------------------------------------------------

def _weight_names(model: nn.Module) -> list[str]:
    names = [f"{name}.weight" for name, _ in prunable_layers(model)]
    if not names:
        raise ValueError("model: has no prunable (Conv2d or Linear) layers")
    return names


def _leaf_params(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Every parameter and buffer as a detached tensor, the prunable weights as fresh leaves that
    require grad: functional calls on them leave the model's own tensors and ``.grad`` alone."""
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update({k: v for k, v in model.named_buffers()})
    weights = []
    for name in names:
        state[name] = state[name].clone().requires_grad_(True)
        weights.append(state[name])
    return state, weights


def _loss_sum(model, state, x, y, temperature: float = 1.0) -> torch.Tensor:
    logits = functional_call(model, state, (x,))
    return F.cross_entropy(logits / temperature, y, reduction="sum")


def scoring_batches(data, *, samples_per_class: int | None = 10, seed: int = 0,
                    batch_size: int = 256, device=None, dtype=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The samples SNIP and GraSP score on: ``samples_per_class`` of each class (all of a class
    that has fewer), drawn with a ``torch.Generator`` seeded with ``seed``; None takes every sample.

    ``data`` is a ``(inputs, targets)`` pair of tensors, a ``TensorDataset``, or a map-style
    dataset of ``(input, target)`` pairs. Returns ``(inputs, targets)`` batches on ``device``,
    inputs cast to ``dtype``.
    """
    if isinstance(data, torch.utils.data.TensorDataset):
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        pairs = [data[i] for i in range(len(data))]
        if not pairs:
            raise ValueError("data: no samples")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        raise TypeError(f"data: expected an (inputs, targets) pair of tensors or a dataset of "
                        f"(input, target) pairs, got {type(data).__name__}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"data: needs as many targets as inputs, at least one; got {len(x)} "
                         f"inputs and {len(y)} targets")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.dim() != 1:
        raise ValueError(f"data: targets must be a 1-D tensor of class indices, got {y.dtype} {tuple(y.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    y = y.long()
    if samples_per_class is not None:
        if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
            raise ValueError(f"samples_per_class: must be a positive int or None, got {samples_per_class!r}")
        labels = y.cpu()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        picked = [order[labels[order] == c][:samples_per_class] for c in torch.unique(labels).tolist()]
        index = torch.sort(torch.cat(picked)).values.to(x.device)
        x, y = x[index], y[index.to(y.device)]
    return [(xb.to(device=device, dtype=dtype), yb.to(device)) for xb, yb in
            zip(x.split(batch_size), y.split(batch_size))]


def _check_batches(batches: Batches | None, method: str) -> None:
    if not batches:
        raise ValueError(f"data: {method} scores on training batches; none given")


def _check_finite(scores: Scores, method: str) -> None:
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise FloatingPointError(f"{method}: non-finite scores in {name!r} (overflow in the "
                                     f"model's dtype?)")


# --- scores: higher means more important unless said otherwise -----------------------------------

@torch.no_grad()
def magnitude_scores(model: nn.Module, batches: Batches | None = None) -> Scores:
    """``|w|`` of every prunable weight (``batches`` is not used)."""
    return {name: model.get_parameter(name).detach().abs() for name in _weight_names(model)}


def snip_scores(model: nn.Module, batches: Batches) -> Scores:
    """SNIP's connection sensitivity ``|w * dL/dw|``, L the mean cross-entropy over ``batches``."""
    _check_batches(batches, "snip")
    names = _weight_names(model)
    total = sum(len(y) for _, y in batches)
    with eval_mode(model):
        state, weights = _leaf_params(model, names)
        grads = [torch.zeros_like(w) for w in weights]
        for x, y in batches:
            for g, d in zip(grads, torch.autograd.grad(_loss_sum(model, state, x, y) / total, weights)):
                g += d
    return {name: (w.detach() * g).abs() for name, w, g in zip(names, weights, grads)}


def grasp_scores(model: nn.Module, batches: Batches, *, temperature: float = GRASP_TEMPERATURE
                 ) -> Scores:
    """GraSP's score ``S = -w * (H g)``: ``g`` the gradient of L (the mean cross-entropy of the
    logits divided by ``temperature``) over ``batches``, ``H`` its Hessian. GraSP removes the
    weights of highest S (whose removal reduces the gradient flow least), so it *keeps the lowest*.
    """
    _check_batches(batches, "grasp")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a positive number, got {temperature!r}")
    names = _weight_names(model)
    total = sum(len(y) for _, y in batches)
    with eval_mode(model):
        state, weights = _leaf_params(model, names)
        g = [torch.zeros_like(w) for w in weights]
        for x, y in batches:  # g, without a graph
            for acc, d in zip(g, torch.autograd.grad(_loss_sum(model, state, x, y, temperature) / total,
                                                     weights)):
                acc += d
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in batches:  # H g = d(g_stopped . dL/dw)/dw, by double backprop
            grads = torch.autograd.grad(_loss_sum(model, state, x, y, temperature) / total, weights,
                                        create_graph=True)
            dot = sum((gs * d).sum() for gs, d in zip(g, grads))
            for acc, d in zip(hg, torch.autograd.grad(dot, weights)):
                acc += d
    return {name: -(w.detach() * h) for name, w, h in zip(names, weights, hg)}


class _LinearisedNet:
    """SynFlow's net: a float64 copy of ``model`` with |every parameter and buffer|, in eval mode."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        self.model = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if t.is_floating_point():
                    t.abs_()
        self.names = _weight_names(self.model)
        self.state = {k: v.detach() for k, v in self.model.named_parameters()}
        self.state.update(dict(self.model.named_buffers()))
        device = next(self.model.parameters()).device
        self.ones = torch.ones(1, *input_shape, dtype=torch.float64, device=device)

    def scores(self, masks: Mapping[str, torch.Tensor] | None = None) -> Scores:
        """``|w * dR/dw|`` with the pruned weights (False in ``masks``) set to zero."""
        state = dict(self.state)
        weights = []
        for name in self.names:
            w = state[name]
            if masks is not None and name in masks:
                w = w * masks[name].to(w.device)
            state[name] = w.clone().requires_grad_(True)
            weights.append(state[name])
        flow = functional_call(self.model, state, (self.ones,)).sum()
        grads = torch.autograd.grad(flow, weights)
        return {name: (w.detach() * g).abs() for name, w, g in zip(self.names, weights, grads)}


def _input_shape(batches: Batches | None, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        shape = tuple(input_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"input_shape: must be positive ints (one sample, no batch dim), got {input_shape!r}")
        return shape
    if not batches:
        raise ValueError("input_shape: synflow is data-free but needs the shape of one input; give "
                         "input_shape or data")
    return tuple(batches[0][0].shape[1:])


def synflow_scores(model: nn.Module, batches: Batches | None = None, *,
                   masks: Mapping[str, torch.Tensor] | None = None,
                   input_shape: Sequence[int] | None = None) -> Scores:
    """One round of SynFlow: ``|w * dR/dw|``, ``R`` the sum of the outputs of the linearised net
    (|parameters|, float64) on an all-ones input, pruned weights zero. ``batches`` only give the
    input shape (or pass ``input_shape``). For a chain of linear layers this is
    ``(1^T |W_L|..|W_l+1|)_i |W_l[i, j]| (|W_l-1|..|W_1| 1)_j``."""
    return _LinearisedNet(model, _input_shape(batches, input_shape)).scores(masks)


def synflow_schedule(density: float, rounds: int) -> list[float]:
    """SynFlow's exponential schedule: the density after round r = 1..rounds, ``density ** (r / rounds)``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: must be a positive int, got {rounds!r}")
    return [density ** (r / rounds) for r in range(1, rounds + 1)]


def synflow_masks(model: nn.Module, densities: Mapping[str, float], *, allocation: str = "layer",
                  rounds: int = SYNFLOW_ROUNDS, batches: Batches | None = None,
                  input_shape: Sequence[int] | None = None, progress: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Iterative SynFlow over the layers named in ``densities``: each round scores the masked
    linearised net and prunes to :func:`synflow_schedule`'s density, per layer or of the total
    (global allocation); the last round lands on :func:`allocate`'s exact counts."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    net = _LinearisedNet(model, _input_shape(batches, input_shape))
    sizes = {n: model.get_parameter(n).numel() for n in densities}
    total, final = sum(sizes.values()), global_goal(sizes, densities)
    layer_schedule = {n: synflow_schedule(d, rounds) for n, d in densities.items()}
    global_schedule = synflow_schedule(final / total if total else 1.0, rounds)
    masks = None
    with Progress(rounds, "synflow", unit="round", noun="round", leave=False, enabled=progress) as bar:
        for r in range(rounds):
            scores = {n: s for n, s in net.scores(masks).items() if n in densities}
            if r == 0:  # masking only lowers the flow: finite on the dense net, finite after
                _check_finite(scores, "synflow")
            last = r == rounds - 1
            if allocation == "global":
                count = final if last else int(round(total * global_schedule[r]))
                masks = allocate(scores, densities, "global", keep=masks, global_count=count)
            else:
                counts = {n: kept_count(sizes[n], densities[n] if last else layer_schedule[n][r])
                          for n in scores}
                masks = allocate(scores, densities, "layer", keep=masks, layer_counts=counts)
            bar.update(1)
    return masks


# --- allocation ----------------------------------------------------------------------------------

def _top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the ``k`` highest scores; ties keep the lower index. O(n), no sort."""
    n = score.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    threshold = torch.kthvalue(score, n - k + 1).values
    mask = score > threshold
    ties = torch.nonzero(score == threshold).flatten()[: k - int(mask.sum())]
    mask[ties] = True
    return mask


def allocate(scores: Mapping[str, torch.Tensor], densities: Mapping[str, float],
             allocation: str = "layer", *, keep: Mapping[str, torch.Tensor] | None = None,
             layer_counts: Mapping[str, int] | None = None, global_count: int | None = None
             ) -> dict[str, torch.Tensor]:
    """Masks keeping the highest ``scores``.

    ``"layer"``: each layer keeps ``kept_count(n, densities[name])`` (or ``layer_counts[name]``).
    ``"global"``: ``sum of those counts`` (or ``global_count``) over all layers together, ties
    keeping the layer that comes first in ``scores``. Weights False in ``keep`` stay pruned.
    Masks are bool, on the CPU, keyed like ``scores``.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    unknown = sorted(set(densities) ^ set(scores))
    if unknown:
        raise ValueError(f"densities: must name exactly the scored layers; mismatched {unknown}")
    ranked = {}
    for name, s in scores.items():
        s = s.detach().double().flatten()
        if torch.isnan(s).any():
            raise ValueError(f"scores: NaN in {name!r}")
        if keep is not None and name in keep:
            s = s.masked_fill(~keep[name].to(s.device).flatten(), -math.inf)
        ranked[name] = s
    if allocation == "layer":
        counts = layer_counts or {n: kept_count(s.numel(), densities[n]) for n, s in ranked.items()}
        return {n: _top_k(s, counts[n]).cpu().view(scores[n].shape) for n, s in ranked.items()}
    count = global_goal({n: s.numel() for n, s in ranked.items()}, densities) \
        if global_count is None else global_count
    flat = _top_k(torch.cat(list(ranked.values())), count).cpu()
    return {n: m.view(scores[n].shape)
            for n, m in zip(ranked, flat.split([s.numel() for s in ranked.values()]))}


# --- the public entry point ----------------------------------------------------------------------

def _importance(method: str) -> Callable[..., Scores]:
    """Each method as "higher keeps": GraSP keeps its lowest S."""
    if method == "grasp":
        return lambda model, batches, **kw: {n: -s for n, s in grasp_scores(model, batches, **kw).items()}
    return {"magnitude": magnitude_scores, "snip": snip_scores}[method]


def prune_at_init(model: nn.Module, method: str, data=None, sparsity: float | Mapping[str, float] = 0.8,
                  seed: int = 0, allocation: str = "layer", *, samples_per_class: int | None = 10,
                  batch_size: int = 256, rounds: int = SYNFLOW_ROUNDS,
                  temperature: float = GRASP_TEMPERATURE, input_shape: Sequence[int] | None = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Prune ``model`` (which holds its initial weights) at initialisation by ``method``.

    Args:
        model: any net of Conv2d/Linear layers; left unchanged.
        method: one of :data:`METHODS`: ``magnitude``, ``snip``, ``grasp``, ``synflow``.
        data: the training data SNIP and GraSP score on (see :func:`scoring_batches`); SynFlow
            reads only the input shape from it (or from ``input_shape``); magnitude needs none.
        sparsity: share of each layer to prune, a float or ``{weight name: float}`` in [0, 1)
            (a dict prunes only the layers it names); a layer at 0 is kept whole (all-True mask)
            and is neither scored nor part of the global pool.
        seed: draws SNIP's and GraSP's samples; magnitude and SynFlow are deterministic.
        allocation: ``"layer"`` (each layer keeps exactly ``kept_count(n, 1 - sparsity)``) or
            ``"global"`` (the same total, best scores over all layers).
        samples_per_class: scoring samples per class for SNIP and GraSP (None: all of ``data``).
        rounds: SynFlow's pruning rounds. temperature: GraSP's logit temperature.

    Returns:
        ``{"<module>.weight": bool tensor}`` (CPU), True where the weight is kept.
    """
    if method not in METHODS:
        raise ValueError(f"method: must be one of {list(METHODS)}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: must be an int, got {type(seed).__name__}")
    names = _weight_names(model)
    sparsities = per_layer(sparsity, names, "sparsity")
    for name, s in sparsities.items():
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity: must lie in [0, 1), got {s} for {name!r}")
    # A layer at sparsity 0 is kept whole and stays out of the scoring: under global allocation
    # it would otherwise enter the pool and lose weights (resnet20's dense output layer).
    whole = {n: torch.ones(model.get_parameter(n).shape, dtype=torch.bool)
             for n, s in sparsities.items() if s == 0.0}
    densities = {n: 1.0 - s for n, s in sparsities.items() if n not in whole}
    if not densities:
        return whole
    param = next(model.parameters())

    batches = None
    if method in ("snip", "grasp"):
        if data is None:
            raise ValueError(f"data: {method} needs training data to score on")
        batches = scoring_batches(data, samples_per_class=samples_per_class, seed=seed,
                                  batch_size=batch_size, device=param.device, dtype=param.dtype)
    elif method == "synflow" and data is not None and input_shape is None:
        batches = scoring_batches(data, samples_per_class=1, batch_size=1)[:1]

    if method == "synflow":
        masks = synflow_masks(model, densities, allocation=allocation, rounds=rounds,
                              batches=batches, input_shape=input_shape, progress=progress)
    else:
        kwargs = {"temperature": temperature} if method == "grasp" else {}
        scores = {n: s for n, s in _importance(method)(model, batches, **kwargs).items() if n in densities}
        _check_finite(scores, method)
        masks = allocate(scores, densities, allocation)
    return {n: masks[n] if n in masks else whole[n] for n in names if n in masks or n in whole}
