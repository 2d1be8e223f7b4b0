"""Comparing a mask set with the winning ticket it stands in for.

The overlap of a layer is the share of the ticket's kept weights that the mask also keeps. A mask
drawn at random at density d overlaps d in expectation, so overlap above the layer's density is
what a method shares with the ticket beyond chance.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["overlap_with_ticket", "total_overlap"]


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
