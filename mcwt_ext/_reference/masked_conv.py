"""Reference (spec) of the fused masked-layer ops: plain PyTorch composition.

Each function returns the activation entering the next layer and that
activation's per-channel sums in float64 -- the sums, divided by the number
of positions averaged over, are the connectivity of the next layer's inputs.
"""
import torch
import torch.nn.functional as F


def masked_conv_block(input, weight, mask, bias=None, *, padding=1, pool=False):
    """``[max_pool2d(2)](relu(conv2d(input, weight * mask, bias, padding)))`` and its
    per-channel sums."""
    y = F.relu(F.conv2d(input, weight * mask, bias, stride=1, padding=padding))
    if pool:
        y = F.max_pool2d(y, 2)
    return y, y.sum(dim=(0, 2, 3), dtype=torch.float64)


def masked_linear_block(input, weight, mask, bias=None):
    """``relu(input @ (weight * mask).T + bias)`` and its per-unit sums over the batch."""
    y = F.relu(F.linear(input, weight * mask, bias))
    return y, y.sum(dim=0, dtype=torch.float64)
