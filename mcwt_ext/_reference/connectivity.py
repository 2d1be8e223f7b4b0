"""Reference connectivity: forward pre-hooks on a masked copy of the model, a separate mean.

Slow (one full forward pass per call, every activation materialised) but obviously right;
``mcwt_ext.connectivity`` must agree with it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..masks import apply_masks, prunable_layers


@torch.no_grad()
def measure_connectivity(model: nn.Module, masks: dict[str, torch.Tensor], data: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
    """``{param name: mean input per channel (conv) or unit (linear)}`` for all but the first layer."""
    net = copy.deepcopy(model).eval()  # BatchNorm on its (init) running statistics, as measured
    apply_masks(net, masks)
    layers = prunable_layers(net)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].double()
            dims = [0] + list(range(2, x.dim()))
            sums[name] = sums.get(name, 0) + x.sum(dims)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]
        return record

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in layers[1:]]
    try:
        net(data)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}
