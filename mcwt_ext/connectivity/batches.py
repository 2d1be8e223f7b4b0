"""The images connectivity is measured on, as a list of input batches, and the memory budget
of the activations the streams keep."""
from __future__ import annotations

from typing import Iterable

import torch

from .. import distributed

#: Activations entering a stage are kept in memory while they fit this budget;
#: otherwise they are recomputed from the last cached stage.
DEFAULT_CACHE_BYTES = 2 << 30


def input_batches(data, *, max_samples: int | None = None, batch_size: int = 500):
    """Normalise ``data`` (tensor, DataLoader, or iterable of batches) to a list of inputs.

    A batch may be a tensor or a tuple/list whose first item is the input. The list is
    built once so that every stage can re-read it; ``max_samples`` keeps a prefix.
    """
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples: must be positive, got {max_samples}")
    if isinstance(data, torch.Tensor):
        data = data[:max_samples] if max_samples else data
        data = data[distributed.share(len(data))]  # under torchrun: this rank's share
        batches: Iterable = data.split(batch_size)
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        batches = data
    out, seen = [], 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"data: batches must be tensors or (input, target) pairs, got {type(x).__name__}")
        if max_samples is not None:
            x = x[: max_samples - seen]
        if len(x):
            out.append(x)
            seen += len(x)
        if max_samples is not None and seen >= max_samples:
            break
    if not out:
        raise ValueError("data: no samples")
    return out
