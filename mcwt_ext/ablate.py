"""Winning-ticket ablations: which part of the ticket carries what it knows.

Each ablation changes one thing of the winning ticket (WT) and keeps the rest:

==============  =============================================  =====================================
kind            masks                                          initial weights
==============  =============================================  =====================================
shuffle-mask    the WT's, permuted within each layer            the WT's
reinit          the WT's                                       fresh, from another seed
shuffle-values  the WT's                                       the WT's kept values permuted among
                                                               the kept positions of each layer
==============  =============================================  =====================================

Every ablation keeps each layer's kept count. Permutations come from one ``torch.Generator``
seeded with ``seed``, layers in forward order, so the same seed gives the same ablation.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import UsageError
from .masks import check_masks, prunable_layers

__all__ = ["KINDS", "ablate", "shuffle_mask", "shuffle_values"]

KINDS = ("shuffle-mask", "reinit", "shuffle-values")

State = dict[str, torch.Tensor]
Masks = dict[str, torch.Tensor]


def _ordered(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """The masked weights in forward order (a mask file's order may be alphabetical)."""
    return [f"{n}.weight" for n, _ in prunable_layers(model) if f"{n}.weight" in masks]


def shuffle_mask(model: nn.Module, masks: Mapping[str, torch.Tensor], seed: int) -> Masks:
    """Each layer's mask permuted uniformly at random (same kept count, positions forgotten)."""
    check_masks(model, masks)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in _ordered(model, masks):
        flat = masks[name].flatten()
        out[name] = flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)].view_as(masks[name])
    return out


def shuffle_values(model: nn.Module, masks: Mapping[str, torch.Tensor], seed: int) -> State:
    """``model``'s state with each masked layer's kept initial values permuted among its kept
    positions (the pruned positions and every other tensor unchanged)."""
    check_masks(model, masks)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in _ordered(model, masks):
        weight, kept = state[name].view(-1), masks[name].flatten().to(state[name].device)
        index = torch.nonzero(kept).flatten()
        perm = torch.randperm(index.numel(), generator=generator).to(index.device)
        weight[index] = weight[index[perm]]
    return state


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: must be an int, got {type(seed).__name__}")


def ablate(model: nn.Module, masks: Mapping[str, torch.Tensor], kind: str, seed: int, *,
           build: Callable[[int], nn.Module] | None = None) -> tuple[State, Masks]:
    """One ablation of a winning ticket.

    Args:
        model: the net holding the ticket's initial weights (left unchanged).
        masks: the ticket, ``{"<module>.weight": bool tensor}``.
        kind: one of :data:`KINDS`.
        seed: draws the permutation (shuffle-*), or is the seed ``build`` initialises the fresh
            weights with (reinit); for reinit it must differ from the ticket's own init seed.
        build: for ``reinit`` only: ``seed -> model`` with the same architecture, freshly
            initialised from ``seed`` (e.g. ``lambda s: build_model("conv2", seed=s)``).

    Returns:
        ``(initial state_dict, masks)`` of the ablated ticket; the masks keep each layer's count.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {list(KINDS)}, got {kind!r}")
    _check_seed(seed)
    check_masks(model, masks)
    if kind != "reinit" and build is not None:
        raise ValueError(f"build: only reinit initialises fresh weights, not {kind}")
    if kind == "shuffle-mask":
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, shuffle_mask(model, masks, seed)
    kept = {n: masks[n].clone() for n in _ordered(model, masks)}
    if kind == "shuffle-values":
        return shuffle_values(model, masks, seed), kept
    if build is None:
        raise ValueError("build: reinit needs a function seed -> freshly initialised model")
    fresh = build(seed).state_dict()
    ours = model.state_dict()
    if fresh.keys() != ours.keys() or any(fresh[k].shape != ours[k].shape for k in ours):
        raise ValueError("build: the fresh model's parameters do not match the ticket's "
                         "(another architecture?)")
    if all(torch.equal(fresh[n].cpu(), ours[n].detach().cpu()) for n in kept):
        raise UsageError(f"seed: {seed} gives the ticket's own initial weights; reinit needs "
                         f"another seed")
    return {k: v.detach().clone().to(ours[k].device) for k, v in fresh.items()}, kept
