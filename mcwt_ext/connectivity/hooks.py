"""**Hook stream** (:class:`HookStream`), for any other ``nn.Module`` (residual adds,
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
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from .. import distributed
from ..masks import _PRUNABLE, dense_weight, is_torch_pruned
from ..models import eval_mode
from .batches import DEFAULT_CACHE_BYTES, input_batches


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

    def path(self, index: int) -> str:
        """What computes layer ``index``: the model's own modules (``"torch"``)."""
        return "torch"

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
