"""Comparing a mask set with the winning ticket it stands in for, and the structure a mask leaves.

The overlap of a layer is the share of the ticket's kept weights that the mask also keeps. A mask
drawn at random at density d overlaps d in expectation, so overlap above the layer's density is
what a method shares with the ticket beyond chance.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["overlap_with_ticket", "total_overlap", "dead_units", "total_dead"]


def _shared_and_kept(masks: Mapping[str, torch.Tensor], ticket_masks: Mapping[str, torch.Tensor]
                     ) -> dict[str, tuple[int, int]]:
    """Per layer of the ticket: (weights both keep, weights the ticket keeps)."""
    unknown = sorted(set(masks) - set(ticket_masks))
    if unknown:
        raise ValueError(f"masks: layers {unknown} are not in the ticket")
    out = {}
    for name, ticket in ticket_masks.items():
        mask = masks.get(name)
        if mask is None:  # a layer the masks leave dense keeps all the ticket keeps
            mask = torch.ones_like(ticket, dtype=torch.bool)
        if mask.dtype != torch.bool or ticket.dtype != torch.bool:
            raise ValueError(f"masks: {name!r} must be bool tensors")
        if mask.shape != ticket.shape:
            raise ValueError(f"masks: {name!r} has shape {tuple(mask.shape)}, the ticket's "
                             f"{tuple(ticket.shape)}")
        out[name] = int((mask.to(ticket.device) & ticket).sum()), int(ticket.sum())
    return out


def overlap_with_ticket(masks: Mapping[str, torch.Tensor], ticket_masks: Mapping[str, torch.Tensor]
                        ) -> dict[str, float | None]:
    """Per layer of the ticket, ``|mask & ticket| / |ticket|``; None where the ticket keeps nothing.

    Both arguments are mask sets ``{"<module>.weight": bool tensor}``; a layer of the ticket that
    ``masks`` does not name counts as dense (overlap 1).
    """
    return {name: shared / kept if kept else None
            for name, (shared, kept) in _shared_and_kept(masks, ticket_masks).items()}


def total_overlap(masks: Mapping[str, torch.Tensor], ticket_masks: Mapping[str, torch.Tensor]
                  ) -> float | None:
    """The same share over all the ticket's layers together."""
    counts = _shared_and_kept(masks, ticket_masks).values()
    kept = sum(k for _, k in counts)
    return sum(s for s, _ in counts) / kept if kept else None


def _dead_counts(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(dead outputs, outputs, dead inputs, inputs) of one layer's mask [out, in, ...]: an output
    filter or unit with no kept weight, an input channel or unit that no kept weight reads."""
    if mask.dtype != torch.bool or mask.dim() < 2:
        raise ValueError(f"masks: a layer's mask must be a bool tensor [out, in, ...], got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    out_alive = mask.flatten(1).any(1)
    in_alive = mask.transpose(0, 1).flatten(1).any(1)
    return (int((~out_alive).sum()), out_alive.numel(), int((~in_alive).sum()), in_alive.numel())


def dead_units(masks: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per layer, ``(dead outputs, dead inputs)`` as shares: output filters (conv) or units
    (linear) that keep no weight, and input channels or units that no kept weight reads. A pruned
    net with dead units trains a narrower net than its density says."""
    out = {}
    for name, mask in masks.items():
        d_out, n_out, d_in, n_in = _dead_counts(mask)
        out[name] = (d_out / n_out, d_in / n_in)
    return out


def total_dead(masks: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """The same shares over all layers together: dead outputs / outputs, dead inputs / inputs."""
    counts = [_dead_counts(m) for m in masks.values()]
    outputs, inputs = sum(c[1] for c in counts), sum(c[3] for c in counts)
    return (sum(c[0] for c in counts) / outputs if outputs else 0.0,
            sum(c[2] for c in counts) / inputs if inputs else 0.0)
