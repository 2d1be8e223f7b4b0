"""Connectivity: the mean activation entering each prunable layer of a masked net.

For a conv weight ``w[k, c, i, j]`` the connectivity is the mean of input channel
``c`` over inputs and positions; for a linear weight ``w[j, i]`` the mean of input
feature ``i`` (the last dimension). It depends on the masks of all earlier layers, so
the sampler walks the net from input to output with a *stream*: each ``advance(mask)``
masks the current layer and returns the next layer's connectivity. Layers are taken
in the order the forward pass first reaches them. :func:`open_stream` picks one of two
streams; both measure on the same masked net and agree to float rounding.

**Fused stream** (:class:`ActivationStream`), for a flat ``nn.Sequential`` whose
children are prunable layers and parameter-free modules. Each ``advance`` pushes the
data through one more *stage* (a prunable layer and the modules after it up to the
next prunable layer). Stages of the common shapes go through the fused ops, which
produce the next activation and its per-channel sums in one pass:

* ``Conv2d -> ReLU [-> MaxPool2d(2)] [-> Flatten]``  -> ``ops.masked_conv_block``
* ``Linear -> ReLU``                                 -> ``ops.masked_linear_block``

Any other stage runs module by module on masked weights.

**Hook stream** (:class:`HookStream`), for any other ``nn.Module`` (residual adds,
BatchNorm, adaptive pooling, ...): no topology is assumed. The connectivity of layer
``l`` is read by a forward pre-hook on ``l`` while the model's own ``forward`` runs on
the weights masked so far (``torch.func.functional_call``, so the model is not
modified). Two things keep this from costing a full forward pass per layer:

* *Stop at the target.* The pre-hook raises once it has summed ``l``'s input, so
  nothing after ``l`` is computed.
* *Prefix cache.* One traced pass records, for every submodule, when it is entered
  and left and how often it is called. A submodule called once that has returned
  before ``l`` is entered only used layers before ``l``, whose masks are final when
  ``l`` is measured; its output can never change again. The outermost such modules
  (e.g. ``conv1``, ``layer1``, ``layer2.0`` of a ResNet) have their outputs recorded
  per batch during the pass that first reaches past them, and in later passes their
  ``forward`` is replaced by a replay of the recorded output; the caches of their own
  submodules are then dropped. Nothing is copied: an output that an in-place op
  changes later (``ReLU(inplace=True)`` after a BatchNorm, ``out += identity``) shows a
  new tensor version counter after the pass, and its cache entry is dropped. Each layer's pass thus only computes the glue between the cached
  frontier and ``l``: every layer runs once per batch over the whole walk (on
  torchvision's ResNet-18, 2.5x the time of one forward pass, against 15x without
  the cache: per-pass hook overhead, float64 sums, the recomputed glue). Outputs are cached while they fit ``cache_bytes``; a module
  that does not fit is recomputed, which is slower but gives the same numbers.

While connectivity is measured the model runs in eval mode (restored afterwards; both streams):
BatchNorm normalises with its running statistics, which for a net at its initial
weights are the init statistics (mean 0, variance 1), so measuring neither depends on
the batch composition nor updates the statistics; dropout is off. The forward pass
must take the same path for every batch (no data-dependent control flow), must reach
each prunable layer once, and no two prunable layers may share a weight: each of
these is checked, with an error naming the layer.

Layers pruned with ``torch.nn.utils.prune`` are measured on their dense
``weight_orig`` times the mask given here; their own ``weight_mask`` is ignored.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from . import distributed
from .models import eval_mode
from .masks import _PRUNABLE, dense_weight, is_torch_pruned, prunable_layers

#: Activations entering a stage are kept in memory while they fit this budget;
#: otherwise they are recomputed from the last cached stage.
DEFAULT_CACHE_BYTES = 2 << 30


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
    from . import ops  # the compiled extension loads only when connectivity is measured

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


class _Stop(Exception):
    """Raised by the target layer's pre-hook: the rest of the forward pass is not needed."""


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@dataclass
class _Trace:
    """What one forward pass did: per module name, calls and the ticks it was entered/left."""

    calls: dict[str, int] = field(default_factory=dict)
    enter: dict[str, int] = field(default_factory=dict)
    leave: dict[str, int] = field(default_factory=dict)
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)


@torch.no_grad()
def _trace(model: nn.Module, x: torch.Tensor) -> _Trace:
    """Run ``model(x)`` once (eval mode) with hooks on every submodule; check the layers."""
    trace, tick = _Trace(), iter(range(1 << 62))
    modules = dict(model.named_modules())

    def pre(name):
        def hook(module, args):
            trace.calls[name] = trace.calls.get(name, 0) + 1
            trace.enter.setdefault(name, next(tick))
        return hook

    def post(name):
        def hook(module, args, output):
            trace.leave.setdefault(name, next(tick))
        return hook

    handles = [h for name, m in modules.items() if name
               for h in (m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name)))]
    try:
        with eval_mode(model):
            model(x)
    except Exception as error:
        raise ValueError(f"data: the model's forward pass fails on a batch of shape "
                         f"{list(x.shape)} ({type(error).__name__}: {error})") from error
    finally:
        for h in handles:
            h.remove()
    prunable = [(name, m) for name, m in modules.items() if name and isinstance(m, _PRUNABLE)]
    if not prunable:
        raise ValueError("model: has no prunable (Conv2d or Linear) layers")
    unused = [name for name, _ in prunable if name not in trace.calls]
    if unused:
        raise ValueError(f"model: layers {unused} are never called in the forward pass; a mask on "
                         f"them would mean nothing")
    twice = {name: trace.calls[name] for name, _ in prunable if trace.calls[name] > 1}
    if twice:
        raise ValueError(f"model: layers {twice} (name: calls) are reached more than once in one "
                         f"forward pass; their connectivity (mean input) would be ambiguous")
    owner: dict[int, str] = {}
    for name, m in prunable:
        other = owner.setdefault(id(dense_weight(m)), name)
        if other != name:
            raise ValueError(f"model: layers {other!r} and {name!r} share one weight tensor; a mask "
                             f"per layer would be ambiguous")
    trace.layers = sorted(prunable, key=lambda item: trace.enter[item[0]])
    return trace


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class _Output:
    """One recorded module output and the version counters its tensors had when recorded."""

    def __init__(self, value):
        self.value = value
        self.versions = [t._version for t in _tensors(value)]
        self.nbytes = sum(t.numel() * t.element_size() for t in _tensors(value))

    def intact(self) -> bool:
        """False once an in-place op has changed any of the tensors since recording."""
        return [t._version for t in _tensors(self.value)] == self.versions


class HookStream:
    """Walks any ``nn.Module`` layer by layer, measuring each layer's connectivity with hooks.

    Same interface as :class:`ActivationStream`; see the module docstring for the design
    (stop at the target layer, replay the outputs of finished submodules).
    """

    def __init__(self, model: nn.Module, data, *, max_samples=None, batch_size=500,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.model = model
        self.device = _device(model)
        self.cache_bytes = cache_bytes
        self._batches = input_batches(data, max_samples=max_samples, batch_size=batch_size)
        self.num_samples = sum(len(x) for x in self._batches)
        self._trace = _trace(model, self._batches[0][:2].to(self.device))  # the path, not the values
        self.layers = self._trace.layers
        self._modules = dict(model.named_modules())
        self._overrides: dict[str, torch.Tensor] = {}  # masked weights of the layers passed
        self._cache: dict[str, list] = {}              # module name -> its output per batch
        self._cached_bytes = 0
        self._batch = 0
        self._position = 0

    @property
    def position(self) -> int:
        """Index of the layer that is the next to be masked."""
        return self._position

    def _finished_before(self, index: int) -> list[str]:
        """The outermost submodules, called once, that return before layer ``index`` is entered."""
        t = self._trace
        start = t.enter[self.layers[index][0]]
        done = {n for n, c in t.calls.items() if c == 1 and t.leave.get(n, start) < start}
        return [n for n in done if n.rpartition(".")[0] not in done]

    def _replay(self, name, *args, **kwargs):
        return self._cache[name][self._batch].value

    @torch.no_grad()
    def advance(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Mask the current layer; return the next layer's connectivity (float64 vector)."""
        index = self._position
        if index + 1 >= len(self.layers):
            raise IndexError("advance: the last prunable layer has no next layer")
        name, layer = self.layers[index]
        weight = dense_weight(layer)
        if mask is not None and mask.shape != weight.shape:
            raise ValueError(f"mask for {name + '.weight'!r}: shape {list(mask.shape)} does not match "
                             f"the weight's {list(weight.shape)}")
        if is_torch_pruned(layer):  # measure on weight_orig * our mask, not torch's mask
            self._overrides[f"{name}.weight_mask"] = torch.ones_like(layer.weight_mask)
            key = f"{name}.weight_orig"
        else:
            key = f"{name}.weight"
        if mask is not None:
            self._overrides[key] = weight.detach() * mask.to(weight.device, weight.dtype)
        self._position += 1
        return self._measure(self._position)

    def _measure(self, index: int) -> torch.Tensor:
        target_name, target = self.layers[index]
        record = [n for n in self._finished_before(index) if n not in self._cache] \
            if self.cache_bytes > 0 else []
        recorded: dict[str, list] = {n: [] for n in record}
        total, count = None, 0

        def capture(module, args):
            nonlocal total, count
            x = args[0]
            dims = list(range(x.dim() - 1)) if isinstance(module, nn.Linear) else \
                [0] + list(range(2, x.dim()))
            sums = x.sum(dims, dtype=torch.float64)
            total = sums if total is None else total + sums
            count += x.numel() // sums.numel()
            raise _Stop

        def keep(name):
            def hook(module, args, output):
                recorded[name].append(_Output(output))
            return hook

        handles = [target.register_forward_pre_hook(capture)]
        handles += [self._modules[n].register_forward_hook(keep(n)) for n in record]
        for n in self._cache:
            self._modules[n].forward = functools.partial(self._replay, n)
        try:
            with eval_mode(self.model):
                for self._batch, x in enumerate(self._batches):
                    try:
                        functional_call(self.model, self._overrides, (x.to(self.device),))
                    except _Stop:
                        continue
                    raise RuntimeError(f"layer {target_name!r} was not reached on batch {self._batch}: "
                                       f"the forward pass must take the same path for every batch")
        finally:
            for h in handles:
                h.remove()
            for n in self._cache:
                del self._modules[n].forward
        for n in [n for n, outputs in self._cache.items() if not all(o.intact() for o in outputs)]:
            self._drop(n)  # changed in place downstream: no longer the module's output
        self._admit(recorded)
        return distributed.all_reduce_mean(total, count)  # under torchrun: over all ranks' shares

    def _drop(self, name: str) -> None:
        self._cached_bytes -= sum(o.nbytes for o in self._cache.pop(name))

    def _admit(self, recorded: dict[str, list]) -> None:
        """Cache the newly finished modules' outputs that fit the budget; drop what they cover."""
        for name in sorted(recorded, key=lambda n: self._trace.leave[n]):
            outputs = recorded[name]
            if len(outputs) != len(self._batches) or not all(o.intact() for o in outputs):
                continue
            inner = [n for n in self._cache if n.startswith(name + ".")]
            freed = sum(o.nbytes for n in inner for o in self._cache[n])
            size = sum(o.nbytes for o in outputs)
            if self._cached_bytes - freed + size > self.cache_bytes:
                continue
            for n in inner:
                self._drop(n)
            self._cache[name] = outputs
            self._cached_bytes += size
