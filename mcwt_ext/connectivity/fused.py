"""**Fused stream** (:class:`ActivationStream`), for a flat ``nn.Sequential`` whose
children are prunable layers and parameter-free modules. Each ``advance`` pushes the
data through one more *stage* (a prunable layer and the modules after it up to the
next prunable layer). Stages of the common shapes go through the fused ops, which
produce the next activation and its per-channel sums in one pass:

* ``Conv2d -> ReLU [-> MaxPool2d(2)] [-> Flatten]``  -> ``ops.masked_conv_block``
* ``Linear -> ReLU``                                 -> ``ops.masked_linear_block``

Any other stage runs module by module on masked weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..masks import dense_weight, prunable_layers
from ..models import eval_mode
from .batches import DEFAULT_CACHE_BYTES, input_batches


@dataclass
class Stage:
    """A prunable layer and the parameter-free modules that follow it."""

    name: str            # module name of the prunable layer ("0", "features.3", ...)
    layer: nn.Module     # the Conv2d or Linear
    tail: list[nn.Module]

    @property
    def param(self) -> str:
        return f"{self.name}.weight"

    def fused_kind(self) -> str | None:
        """Which fused op computes this stage, or None for the generic path."""
        tail = [type(m) for m in self.tail]
        if isinstance(self.layer, nn.Conv2d) and _plain_conv(self.layer):
            if tail and tail[-1] is nn.Flatten:
                tail = tail[:-1]
            if tail == [nn.ReLU]:
                return "conv"
            if tail == [nn.ReLU, nn.MaxPool2d] and _plain_pool(self.tail[1]):
                return "conv_pool"
        if isinstance(self.layer, nn.Linear) and tail == [nn.ReLU]:
            return "linear"
        return None


def _plain_conv(conv: nn.Conv2d) -> bool:
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def _plain_pool(pool: nn.MaxPool2d) -> bool:
    k, s = pool.kernel_size, pool.stride
    return (k in (2, (2, 2)) and s in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode)


def _flat_stages(model: nn.Module) -> tuple[list[Stage] | None, str]:
    """The stages of a flat ``nn.Sequential``, or ``(None, why not)``."""
    if not isinstance(model, nn.Sequential):
        return None, (f"model: the fused stream needs a flat nn.Sequential (the activation "
                      f"entering each layer must be the output of the modules before it); got "
                      f"{type(model).__name__}")
    prunable = {id(m): name for name, m in prunable_layers(model)}
    stages: list[Stage] = []
    for name, module in model.named_children():
        if id(module) in prunable:
            stages.append(Stage(name, module, []))
        elif not stages:
            return None, f"model: module {name!r} comes before the first prunable layer"
        elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return None, f"model: module {name!r} has parameters or buffers but is not a prunable layer"
        else:
            stages[-1].tail.append(module)
    if not stages:
        return None, "model: has no prunable (Conv2d or Linear) layers"
    return stages, ""


def split_stages(model: nn.Module) -> list[Stage]:
    """Cut a flat ``nn.Sequential`` into one stage per prunable layer (the fused stream's unit)."""
    stages, why = _flat_stages(model)
    if stages is None:
        raise (TypeError if "nn.Sequential" in why else ValueError)(why)
    return stages


def _check_input(stage: Stage, x: torch.Tensor) -> None:
    layer = stage.layer
    if isinstance(layer, nn.Conv2d):
        ok = x.dim() == 4 and x.shape[1] == layer.in_channels
        want = f"[N, {layer.in_channels}, H, W]"
    else:
        ok = x.dim() == 2 and x.shape[1] == layer.in_features
        want = f"[N, {layer.in_features}]"
    if not ok:
        raise ValueError(f"data: layer {stage.name!r} expects input of shape {want}, got {list(x.shape)}")


def run_stage(stage: Stage, x: torch.Tensor, mask: torch.Tensor):
    """The activation leaving ``stage`` (its layer masked) and its per-channel sums.

    Sums are over batch and space per channel for 4-D outputs, per unit for 2-D.
    """
    from .. import ops  # the compiled extension loads only when connectivity is measured

    layer, kind = stage.layer, stage.fused_kind()
    weight = dense_weight(layer)
    if kind in ("conv", "conv_pool"):
        y, sums = ops.masked_conv_block(x, weight, mask, layer.bias, padding=layer.padding,
                                        pool=kind == "conv_pool")
        if stage.tail and isinstance(stage.tail[-1], nn.Flatten):
            y = stage.tail[-1](y)
            sums = y.sum(0, dtype=torch.float64)  # the next layer is linear: per-unit sums
        return y, sums
    if kind == "linear":
        return ops.masked_linear_block(x, weight, mask, layer.bias)
    y = _masked_layer(layer, x, weight * mask)
    for module in stage.tail:
        y = module(y)
    dims = [0] + list(range(2, y.dim()))
    return y, y.sum(dims, dtype=torch.float64)


def _masked_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with ``weight`` in place of its own (torch-pruned layers included)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def _count(y: torch.Tensor) -> int:
    return y.numel() // y.shape[1] if y.dim() > 1 else y.numel()


class ActivationStream:
    """Walks a masked net stage by stage, measuring each layer's connectivity.

    ``advance(mask)`` applies ``mask`` to the current stage, pushes the data through it
    and returns the connectivity (float64 vector) of the next prunable layer. Inputs to
    the current stage are cached while they fit ``cache_bytes``, else recomputed from
    the deepest cached stage (activations shrink with depth, so the anchor moves on).
    """

    def __init__(self, model: nn.Module, data, *, max_samples=None, batch_size=500,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, device=None):
        self.stages = split_stages(model)
        self.layers = [(stage.name, stage.layer) for stage in self.stages]
        self._model = model
        self.device = device or next(model.parameters()).device
        self.cache_bytes = cache_bytes
        self._anchor = 0  # stage whose inputs are cached
        self._cache = input_batches(data, max_samples=max_samples, batch_size=batch_size)
        _check_input(self.stages[0], self._cache[0].to(self.device))
        self._masks: list[torch.Tensor] = []  # masks of the stages passed so far
        self.num_samples = sum(len(x) for x in self._cache)

    @property
    def position(self) -> int:
        """Index of the stage whose layer is the next to be masked."""
        return len(self._masks)

    def _inputs_to(self, index: int):
        """Yield, batch by batch, the activation entering stage ``index``."""
        for x in self._cache:
            x = x.to(self.device, non_blocking=True)
            for j in range(self._anchor, index):
                x, _ = run_stage(self.stages[j], x, self._masks[j])
            yield x

    def path(self, index: int) -> str:
        """What computes stage ``index`` (``ops.layer_path``; ``"torch"`` for a stage the fused
        ops do not cover): recorded beside the connectivity it measures."""
        from .. import ops

        stage = self.stages[index]
        kind = stage.fused_kind()
        return "torch" if kind is None else ops.layer_path(kind, dense_weight(stage.layer), self.device)

    @torch.no_grad()
    def advance(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Mask the current stage's layer; return the next layer's connectivity."""
        index = self.position
        if index + 1 >= len(self.stages):
            raise IndexError("advance: the last prunable layer has no next layer")
        stage = self.stages[index]
        weight = dense_weight(stage.layer)
        if mask is not None and mask.shape != weight.shape:
            raise ValueError(f"mask for {stage.param!r}: shape {list(mask.shape)} does not match "
                             f"the weight's {list(weight.shape)}")
        self._masks.append(torch.ones_like(weight, dtype=torch.bool) if mask is None  # dense: once,
                           else mask.to(weight.device))                               # not per batch
        with eval_mode(self._model):  # a Dropout in a stage's tail is off, as in the hook stream
            return self._advance(index, stage)

    def _advance(self, index: int, stage: Stage) -> torch.Tensor:
        total, count, outputs, size = None, 0, [], 0
        for x in self._inputs_to(index):
            y, sums = run_stage(stage, x, self._masks[index])
            total = sums if total is None else total + sums
            count += _count(y)
            size += y.numel() * y.element_size()
            outputs.append(y if size <= self.cache_bytes else None)
        if size <= self.cache_bytes:  # the next stage's inputs fit: cache them, move the anchor
            self._cache, self._anchor = outputs, index + 1
        _check_input(self.stages[index + 1], y)
        return distributed.all_reduce_mean(total, count)  # under torchrun: over all ranks' shares
