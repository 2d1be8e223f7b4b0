"""The mask update of dynamic sparse training: the cosine drop fraction and one layer's
drop-and-grow, pure functions of tensors (the training loop that calls them is in schedule.py).

Transcribed from google-research/rigl, ``rigl/sparse_optimizers_base.py``
(``SparseSETOptimizerBase._get_update_op``, ``get_drop_fraction``; RigL's and SET's
``generic_mask_update``), with two deliberate differences, both only where the reference is
random or ill-defined:

- ties are broken by the lower flat index (what TF's ``top_k`` does for equal scores) instead of
  the reference's N(0, 1e-5) noise on the drop scores, so an update is a function of the weights,
  the grow scores and the fraction alone (exact resume, the same result on every device);
- only kept weights compete to stay: the reference ranks every position by ``|mask * w|``, where
  a pruned position (score 0 plus noise) can outrank a kept weight smaller than the noise and be
  "kept" in its place. Here a pruned position never does; with kept weights of nonzero
  magnitude (the case the reference intends) the two agree.

As in the reference, a weight dropped in an update may be grown back in the same update (the
grow candidates are all positions outside the kept set); it then keeps its value and its
optimiser state (the reference's ``reinit_when_same=False``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["drop_fraction", "drop_count", "drop_and_grow"]


def drop_fraction(step: int, alpha: float, end: int) -> float:
    """The share of a layer's kept weights replaced at ``step``: ``alpha/2 * (1 + cos(pi * step /
    end))`` (the reference's ``cosine`` anneal, TF's ``cosine_decay`` with ``decay_steps = end``),
    0 from ``end`` on."""
    if end <= 0 or step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


def drop_count(kept: int, fraction: float) -> int:
    """Weights dropped (and grown) in a layer of ``kept`` weights: the reference's
    ``int32(float32(n_ones) * drop_fraction)``, in float32 as there, so counts agree at the
    boundaries."""
    return int(np.float32(kept) * np.float32(fraction))


def drop_and_grow(mask: torch.Tensor, weight: torch.Tensor, grow_score: torch.Tensor,
                  fraction: float) -> torch.Tensor:
    """One layer's new mask: drop the ``drop_count(kept, fraction)`` kept weights of least
    ``|weight|``, then grow as many positions outside the remaining kept set with the largest
    ``grow_score`` (RigL: ``|dense gradient|``; SET: uniform noise). The kept count is unchanged.
    Ties: the lower flat index stays, and is grown, first (a stable descending sort's order, as TF's
    ``top_k``). All tensors of one shape and device."""
    if not mask.shape == weight.shape == grow_score.shape:
        raise ValueError(f"mask, weight and grow_score must have one shape, got {tuple(mask.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(grow_score.shape)}")
    flat = mask.flatten()
    kept = int(flat.sum())
    n = drop_count(kept, fraction)
    if n == 0:
        return mask.clone()
    # at least float32: exact for float32 and bfloat16 values (no ties made by rounding)
    dtype = torch.promote_types(torch.promote_types(weight.dtype, grow_score.dtype), torch.float32)
    drop = _top(torch.where(flat, -weight.detach().flatten().abs().to(dtype), -math.inf), n, low_index_first=False)
    stay = flat & ~drop
    grow = _top(torch.where(stay, -math.inf, grow_score.detach().flatten().to(dtype)), n, low_index_first=True)
    return (stay | grow).view_as(mask)


def _top(score: torch.Tensor, k: int, *, low_index_first: bool) -> torch.Tensor:
    """The ``k`` largest of a flat ``score`` as a bool mask; among scores equal to the ``k``-th
    largest, the lowest indices (else the highest) are taken. A stable sort's order, without
    sorting: one ``topk`` for the threshold."""
    threshold = torch.topk(score, k).values[-1]
    top = score > threshold
    tied = (score == threshold).nonzero().flatten()
    need = k - int(top.sum())
    top[tied[:need] if low_index_first else tied[tied.numel() - need:]] = True
    return top
