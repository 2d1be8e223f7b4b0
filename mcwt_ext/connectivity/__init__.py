"""Connectivity: the mean activation entering each prunable layer of a masked net.

For a conv weight ``w[k, c, i, j]`` the connectivity is the mean of input channel
``c`` over inputs and positions; for a linear weight ``w[j, i]`` the mean of input
feature ``i`` (the last dimension). It depends on the masks of all earlier layers, so
the sampler walks the net from input to output with a *stream*: each ``advance(mask)``
masks the current layer and returns the next layer's connectivity. Layers are taken
in the order the forward pass first reaches them. :func:`open_stream` picks one of two
streams; both measure on the same masked net and agree to float rounding.

While connectivity is measured the model runs in eval mode (restored afterwards; both streams):
BatchNorm normalises with its running statistics, which for a net at its initial
weights are the init statistics (mean 0, variance 1), so measuring neither depends on
the batch composition nor updates the statistics; dropout is off. The forward pass
must take the same path for every batch (no data-dependent control flow), must reach
each prunable layer once, and no two prunable layers may share a weight: each of
these is checked, with an error naming the layer.

Layers pruned with ``torch.nn.utils.prune`` are measured on their dense
``weight_orig`` times the mask given here; their own ``weight_mask`` is ignored.

Modules: :mod:`.batches` (the input batches), :mod:`.fused` (the fused stream), :mod:`.hooks`
(the hook stream).
"""
from __future__ import annotations

import torch
from torch import nn

from ..masks import prunable_layers
from .batches import DEFAULT_CACHE_BYTES, input_batches
from .fused import ActivationStream, Stage, _flat_stages, run_stage, split_stages
from .hooks import HookStream, _device, _trace

__all__ = ["measure_connectivity", "open_stream", "forward_layers", "ActivationStream", "HookStream",
           "Stage", "split_stages", "run_stage", "input_batches", "DEFAULT_CACHE_BYTES"]


@torch.no_grad()
def measure_connectivity(model: nn.Module, masks: dict[str, torch.Tensor], data, *,
                         max_samples=None, batch_size=500, cache_bytes=DEFAULT_CACHE_BYTES,
                         fused: bool = True) -> dict[str, torch.Tensor]:
    """Connectivity of every prunable layer but the first, in the net masked by ``masks``.

    Returns ``{param name: float64 vector}`` (per input channel for conv, per input feature
    for linear), in forward order. Layers missing from ``masks`` count as dense.
    ``fused=False`` measures with hooks even where the fused stream applies.
    """
    stream = open_stream(model, data, max_samples=max_samples, batch_size=batch_size,
                         cache_bytes=cache_bytes, fused=fused)
    names = [f"{name}.weight" for name, _ in stream.layers]
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise ValueError(f"masks: {unknown} name no prunable layer of the model (those are {names})")
    return {nxt: stream.advance(masks.get(cur)) for cur, nxt in zip(names, names[1:])}


def open_stream(model: nn.Module, data, *, max_samples=None, batch_size=500,
                cache_bytes: int = DEFAULT_CACHE_BYTES, fused: bool = True):
    """The stream that measures ``model``: fused for a flat ``nn.Sequential`` (unless
    ``fused=False``), hooks otherwise. Both have ``layers`` (forward order), ``advance(mask)``
    and ``num_samples``."""
    kwargs = dict(max_samples=max_samples, batch_size=batch_size, cache_bytes=cache_bytes)
    if fused and _flat_stages(model)[0] is not None:
        return ActivationStream(model, data, **kwargs)
    return HookStream(model, data, **kwargs)


def forward_layers(model: nn.Module, data=None) -> list[tuple[str, nn.Module]]:
    """The prunable layers in the order the forward pass first reaches them.

    A flat ``nn.Sequential``, or any model when ``data`` is None, gives the registration
    order; otherwise one traced pass on the first batch of ``data`` decides (with the
    checks of :class:`HookStream`).
    """
    if data is None or _flat_stages(model)[0] is not None:
        return prunable_layers(model)
    batches = input_batches(data, max_samples=2)
    return _trace(model, batches[0].to(_device(model))).layers
