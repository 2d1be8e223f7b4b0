"""The forward pass of a pack: K nets' stacked parameters applied at once, by grouped convolutions
and batched matrix products (``grouped``) or ``torch.func.vmap`` over ``functional_call``
(``vmap``), and the per-net losses."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


IMPLS = ("grouped", "vmap")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GROUPED_LAYERS = (nn.Conv2d, nn.Linear, nn.Flatten, nn.ReLU, nn.MaxPool2d)


def grouped_layout_problem(model: nn.Module) -> str | None:
    """Why the ``grouped`` forward cannot run ``model`` (None: it can): it runs an
    ``nn.Sequential`` of Conv2d, ReLU and MaxPool2d layers, a Flatten, then Linear and ReLU
    layers (what :func:`_grouped_forward` raises on at run time, read off the structure)."""
    if not isinstance(model, nn.Sequential):
        return f"needs an nn.Sequential model, got {type(model).__name__}"
    flat = False
    for name, module in model.named_children():
        if not isinstance(module, _GROUPED_LAYERS):
            return f"does not run layer {name!r} ({type(module).__name__})"
        if isinstance(module, nn.Linear) and not flat:
            return f"needs a Flatten before the first Linear (layer {name!r})"
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.Flatten)) and flat:
            return f"runs no {type(module).__name__} after the Flatten (layer {name!r})"
        flat = flat or isinstance(module, nn.Flatten)
    return None if flat else "needs a model that ends in Linear layers after a Flatten"


def _grouped_forward(model: nn.Sequential, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                     shared_input: bool) -> torch.Tensor:
    """K nets at once: ``x`` is [K, B, ...] (or [B, ...] fed to all when ``shared_input``);
    returns [K, B, classes]. The K nets' channels sit side by side, so each conv is one grouped
    conv with K groups, and each linear layer one batched matmul."""
    k = next(iter(params.values())).shape[0]
    shared = shared_input  # h is one [B, C, H, W] input of every net (until the first conv)
    h = x if shared_input else x.transpose(0, 1).flatten(1, 2)  # [B, K*C, H, W]
    flat = False  # False: [B, K*C, H, W]; True: [K, B, F]
    for name, module in model.named_children():
        if isinstance(module, nn.Conv2d):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            # A shared input meets all K*O filters in one plain conv; after that, K groups.
            h = F.conv2d(h, w.flatten(0, 1), None if b is None else b.flatten(), module.stride,
                         module.padding, module.dilation, groups=1 if shared else k)
            shared = False
        elif isinstance(module, nn.Linear):
            if not flat:
                raise ValueError(f"layer {name!r}: the grouped pack needs a Flatten before the "
                                 f"first Linear; use impl='vmap'")
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            h = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        elif isinstance(module, nn.Flatten):
            if shared:
                h = h.expand(k, *h.shape).transpose(0, 1).flatten(1, 2)
                shared = False
            h = h.unflatten(1, (k, -1)).flatten(2).transpose(0, 1)  # [K, B, C*H*W]
            flat = True
        elif isinstance(module, (nn.ReLU, nn.MaxPool2d)):
            h = module(h)
        else:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) is not supported by the "
                             f"grouped pack; use impl='vmap'")
    if not flat:
        raise ValueError("the grouped pack needs a model that ends in Linear layers; use impl='vmap'")
    return h


def _vmap_forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                  shared_input: bool) -> torch.Tensor:
    def one(p, xb):
        return torch.func.functional_call(model, p, (xb,))
    return torch.func.vmap(one, in_dims=(0, None if shared_input else 0))(dict(params), x)


def pack_forward(impl: str, model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                 shared_input: bool = False) -> torch.Tensor:
    """Logits [K, B, classes] of the K nets whose parameters ``params`` stacks ([K, ...] each) on
    ``x`` ([K, B, ...], or [B, ...] fed to every net when ``shared_input``). ``model`` gives
    the structure (its own parameters are not used)."""
    if impl == "grouped":
        if not isinstance(model, nn.Sequential):
            raise ValueError("impl='grouped' needs an nn.Sequential model; use impl='vmap'")
        return _grouped_forward(model, params, x, shared_input)
    if impl == "vmap":
        return _vmap_forward(model, params, x, shared_input)
    raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _net_losses(logits: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy per net: [K] means or sums over the batch (``y``: [K, B] or [B])."""
    y = y.expand(logits.shape[:2])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # autocast's half: float32; float64 stays
    per = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [K, B]
    return per.mean(1) if reduction == "mean" else per.sum(1)


# --- per-net state, in train()'s checkpoint format ----------------------------------------------
