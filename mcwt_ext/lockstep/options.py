"""How a pack computes: :class:`PackOptions` (a module of its own, so that the pack's parts and
its capability check import it without importing the package)."""
from __future__ import annotations

from dataclasses import dataclass

from .forward import IMPLS, PRECISIONS

__all__ = ["PackOptions"]


@dataclass(kw_only=True)
class PackOptions:
    """How a pack computes; none of it changes the result beyond float rounding, except
    ``precision``.

    ``impl``: "grouped" (grouped convolutions + batched matmuls, the default: measured faster on
    CPU, see benchmarks/RESULTS.md) or "vmap" (``torch.func.vmap`` over ``functional_call``, for
    any parameter-only model). ``cuda_graph``: capture the training step in a CUDA graph (CUDA
    only). ``precision``: "float32" (default; TF32 convolutions where PyTorch enables them), or
    autocast to "bfloat16"/"float16" (opt-in; recorded in each net's summary and checkpoint, and a
    run trained in one precision refuses to resume in another)."""

    impl: str = "grouped"
    cuda_graph: bool = False
    precision: str = "float32"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, got {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool, got {self.cuda_graph!r}")
