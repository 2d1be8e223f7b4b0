"""Masks of prunable weights: which layers are prunable, magnitude pruning, random masks.

A mask set is a dict ``{param_name: bool tensor}`` keyed by ``"<module name>.weight"`` of a
Conv2d/Linear module, True where the weight is kept. A prunable layer absent from the dict is
dense. Everything here works on any model, not only the Conv-k nets.

Models pruned with ``torch.nn.utils.prune`` (a layer holds the parameter ``weight_orig`` and the
buffer ``weight_mask``, and ``weight`` is their product) are accepted everywhere: a mask keyed
``"<module>.weight"`` resolves to the layer's dense ``weight_orig`` (:func:`dense_weight`).
:func:`to_torch_prune` and :func:`from_torch_prune` convert between the two forms.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .validate import check_rate, check_seed, check_sparsity

__all__ = ["prunable_layers", "layer_kind", "dense_masks", "apply_masks", "masked_parameters",
           "densities", "kept_count", "per_layer", "magnitude_prune", "global_magnitude_prune",
           "global_goal", "next_kept", "random_masks", "check_masks",
           "dense_weight", "is_torch_pruned", "to_torch_prune", "from_torch_prune", "dense_state_dict",
           "load_dense_state_dict"]

_PRUNABLE = (nn.Conv2d, nn.Linear)


def prunable_layers(model: nn.Module, example_input: torch.Tensor | None = None
                    ) -> list[tuple[str, nn.Module]]:
    """Conv2d/Linear modules of ``model`` in forward order, as ``(module name, module)``.

    With ``example_input`` the order is traced with forward hooks (first call wins); without,
    it is the registration order, which is the forward order for ``nn.Sequential`` nets.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _PRUNABLE)]
    if example_input is None:
        return layers
    order: dict[str, int] = {}

    def seen(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            order.setdefault(name, len(order))
        return hook

    hooks = [m.register_forward_hook(seen(name)) for name, m in layers]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    unused = [name for name, _ in layers if name not in order]
    if unused:
        raise ValueError(f"layers {unused} are never called in the forward pass; a mask on them "
                         f"would mean nothing")
    return sorted(layers, key=lambda item: order[item[0]])


def layer_kind(model: nn.Module, example_input: torch.Tensor | None = None, *,
               layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, str]:
    """Map each prunable weight name to ``"conv"``, ``"linear"`` or ``"output"`` (the last layer).

    ``layers``: the prunable layers already in forward order (skips tracing them again).
    """
    layers = prunable_layers(model, example_input) if layers is None else layers
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to prune")
    kinds = {f"{name}.weight": "conv" if isinstance(m, nn.Conv2d) else "linear" for name, m in layers}
    kinds[f"{layers[-1][0]}.weight"] = "output"
    return kinds


def dense_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All-True masks for every prunable layer (the unpruned net)."""
    return {f"{name}.weight": torch.ones_like(m.weight, dtype=torch.bool, device="cpu")
            for name, m in prunable_layers(model)}


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError unless every mask names a prunable weight of ``model`` and fits it."""
    weights = {f"{name}.weight": dense_weight(m) for name, m in prunable_layers(model)}
    for name, mask in masks.items():
        if name not in weights:
            raise ValueError(f"mask {name!r} names no Conv2d/Linear weight of the model "
                             f"(those are {list(weights)})")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must be a bool tensor")
        if mask.shape != weights[name].shape:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight has "
                             f"{tuple(weights[name].shape)}")


def masked_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor]
                      ) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """Yield ``(weight, mask)`` pairs, the mask moved to the weight's device (for a layer pruned
    with ``torch.nn.utils.prune`` the weight is its ``weight_orig`` parameter)."""
    check_masks(model, masks)
    for name, mask in masks.items():
        param = dense_weight(model.get_submodule(name.rpartition(".")[0]))
        yield param, mask.to(param.device)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place."""
    with torch.no_grad():
        for param, mask in masked_parameters(model, masks):
            param.masked_fill_(~mask, 0.0)


def densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Share of kept weights per layer."""
    return {name: mask.sum().item() / mask.numel() for name, mask in masks.items()}


def kept_count(n: int, density: float) -> int:
    """Weights a layer of ``n`` keeps at ``density``: ``round(n * density)``, the one rule used by
    IMP's last round and by the random baseline, so both land on the same count."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    return int(round(n * density))


def per_layer(value, names, what: str) -> dict[str, float]:
    """Expand a float, or a dict over some of ``names``, into ``{name: float}``; ``what`` names
    the argument in errors."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"{what} names unknown layers {sorted(unknown)}")
        return {n: float(value[n]) for n in names if n in value}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float or a dict of floats, got {type(value).__name__}")
    return {n: float(value) for n in names}


def magnitude_prune(model_weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                    rates: Mapping[str, float], target_density: Mapping[str, float]
                    ) -> dict[str, torch.Tensor]:
    """One IMP round: per layer, prune ``rates[name]`` of the remaining weights by lowest |w|.

    A layer already at ``target_density[name]`` is left alone, and a round that would overshoot
    the target keeps exactly ``kept_count(n, target)`` weights. A round always prunes at least one
    weight of a layer above its target, so IMP ends even on tiny layers. Ties in |w| keep the
    lower flat index. ``rates`` and ``target_density`` are keyed like ``masks``.
    """
    new_masks = {}
    for name, mask in masks.items():
        if name not in rates or name not in target_density:
            raise ValueError(f"layer {name!r} needs an entry in both rates and target_density")
        rate, target = check_rate(rates[name], f"rate of {name!r}"), float(target_density[name])
        weight = model_weights[name].detach().to("cpu")
        if weight.shape != mask.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(weight.shape)}, its mask "
                             f"{tuple(mask.shape)}")
        kept = int(mask.sum())
        keep = next_kept(kept, kept_count(mask.numel(), target), rate)
        new_masks[name] = mask.clone() if keep == kept else _keep_largest([weight], [mask], keep)[0]
    return new_masks


def next_kept(kept: int, goal: int, rate: float) -> int:
    """What a layer (or a pool) of ``kept`` weights keeps after one IMP round at ``rate``: a share
    ``rate`` pruned, at least one weight, never below ``goal``; all of them at the goal or at rate 0."""
    if kept <= goal or rate == 0.0:
        return kept
    return max(goal, min(int(round(kept * (1.0 - rate))), kept - 1))


def _keep_largest(weights: list[torch.Tensor], masks: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Masks keeping the ``keep`` largest |w| of the kept weights over all ``weights`` together;
    ties keep the earlier layer, then the lower flat index."""
    # Pruned weights score -1 (< any |w|) so they stay pruned.
    score = torch.cat([torch.where(m, w.abs(), torch.full_like(w, -1.0)).flatten()
                       for w, m in zip(weights, masks)])
    order = torch.sort(score, descending=True, stable=True).indices
    flat = torch.zeros(score.numel(), dtype=torch.bool)
    flat[order[:keep]] = True
    return [f.view_as(m) for f, m in zip(flat.split([m.numel() for m in masks]), masks)]


def global_magnitude_prune(model_weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                           rate: float, target_density: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """One round of global IMP (Frankle & Carbin's ResNet-20; open_lth's ``sparse_global``): prune
    ``rate`` of the weights that remain in the pooled layers, those whose ``target_density`` is
    below 1, by lowest |w| over all of them together; the other layers stay as they are.

    The pool stops at its target, ``sum of kept_count(n, target)`` over its layers (what per-layer
    IMP and global pruning at init keep in total); a round that would overshoot lands on it
    exactly, and a round prunes at least one weight of a pool above it. Ties keep the layer first
    in ``masks``, then the lower flat index.
    """
    rate = check_rate(rate, "rate")
    missing = [n for n in masks if n not in target_density or n not in model_weights]
    if missing:
        raise ValueError(f"layers {missing} need an entry in both model_weights and target_density")
    pool = [n for n in masks if float(target_density[n]) < 1.0]
    new_masks = {n: m.clone() for n, m in masks.items()}
    kept = sum(int(masks[n].sum()) for n in pool)
    keep = next_kept(kept, global_goal({n: masks[n].numel() for n in pool}, target_density), rate)
    if keep == kept:
        return new_masks
    weights = [model_weights[n].detach().to("cpu") for n in pool]
    for n, w in zip(pool, weights):
        if w.shape != masks[n].shape:
            raise ValueError(f"weight {n!r} has shape {tuple(w.shape)}, its mask {tuple(masks[n].shape)}")
    new_masks.update(zip(pool, _keep_largest(weights, [masks[n] for n in pool], keep)))
    return new_masks


def global_goal(sizes: Mapping[str, int], target_density: Mapping[str, float]) -> int:
    """Weights a pool of layers of ``sizes`` keeps in total at their target densities."""
    return sum(kept_count(n, float(target_density[name])) for name, n in sizes.items())


def random_masks(model: nn.Module, sparsity: float | Mapping[str, float], seed: int
                 ) -> dict[str, torch.Tensor]:
    """Uniform random masks pruning ``sparsity`` of each layer, exactly ``kept_count(n, 1 - s)``
    weights kept per layer, drawn from a ``torch.Generator`` seeded with ``seed`` (layers in
    registration order). A dict ``sparsity`` masks only the layers it names."""
    layers = prunable_layers(model)
    names = [f"{name}.weight" for name, _ in layers]
    sparsities = per_layer(sparsity, names, "sparsity")
    generator = torch.Generator().manual_seed(check_seed(seed))
    masks = {}
    for name, module in layers:
        key = f"{name}.weight"
        if key not in sparsities:
            continue
        s = check_sparsity(sparsities[key], f"sparsity of {key!r}")
        n = module.weight.numel()
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:kept_count(n, 1.0 - s)]] = True
        masks[key] = flat.view(module.weight.shape)
    return masks


# --- torch.nn.utils.prune interop -------------------------------------------------------------

def is_torch_pruned(module: nn.Module) -> bool:
    """Whether ``module.weight`` is pruned with ``torch.nn.utils.prune`` (``weight_orig`` and
    ``weight_mask`` registered, ``weight`` recomputed from them before each forward)."""
    return "weight_orig" in module._parameters and "weight_mask" in module._buffers


def dense_weight(module: nn.Module) -> nn.Parameter:
    """The layer's trainable, unmasked weight: ``weight_orig`` if torch-pruned, else ``weight``."""
    return module.weight_orig if is_torch_pruned(module) else module.weight


def _weight_hook(module: nn.Module):
    from torch.nn.utils import prune

    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == "weight":
            return key, hook
    raise ValueError(f"module {type(module).__name__} has weight_orig/weight_mask but no "
                     f"torch.nn.utils.prune hook on its weight")


def _unprune_keep_orig(module: nn.Module) -> None:
    """Undo torch pruning of ``weight`` without baking the mask in: ``weight`` becomes the dense
    ``weight_orig`` again (``prune.remove`` would zero the pruned initial weights)."""
    key, _ = _weight_hook(module)
    del module._forward_pre_hooks[key]
    orig = module._parameters.pop("weight_orig")
    del module._buffers["weight_mask"]
    if "weight" in module.__dict__:
        del module.__dict__["weight"]
    module.weight = orig


def to_torch_prune(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Register each mask on ``model`` with ``torch.nn.utils.prune.custom_from_mask``.

    A layer already torch-pruned has its mask replaced (its ``weight_orig`` is kept, not
    multiplied by the old mask); layers absent from ``masks`` are left as they are. Returns
    ``model``, changed in place.
    """
    from torch.nn.utils import prune

    check_masks(model, masks)
    for name, mask in masks.items():
        module = model.get_submodule(name.rpartition(".")[0])
        if is_torch_pruned(module):
            _unprune_keep_orig(module)
        prune.custom_from_mask(module, "weight", mask.to(module.weight.device))
    return model


def from_torch_prune(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of a model pruned with ``torch.nn.utils.prune``: ``{"<module>.weight": bool}``
    on the CPU, one per torch-pruned Conv2d/Linear weight (unpruned layers are absent: dense)."""
    masks = {}
    for name, module in prunable_layers(model):
        if not is_torch_pruned(module):
            continue
        mask = module.weight_mask.detach()
        binary = mask.to(torch.bool)
        if not torch.equal(binary.to(mask.dtype), mask):
            raise ValueError(f"module {name!r}: weight_mask holds values other than 0 and 1; "
                             f"only binary masks are masks")
        masks[f"{name}.weight"] = binary.cpu()
    return masks


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the unpruned model would have it: each torch-pruned
    ``"<module>.weight_orig"`` saved as ``"<module>.weight"`` (dense values) and its
    ``weight_mask`` left out, so a run directory's weights load into an unpruned model."""
    pruned = {name for name, m in model.named_modules() if is_torch_pruned(m)}
    out = {}
    for key, value in model.state_dict().items():
        module, _, attr = key.rpartition(".")
        if module in pruned and attr == "weight_mask":
            continue
        out[f"{module}.weight" if module in pruned and attr == "weight_orig" else key] = value
    return out


def load_dense_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a :func:`dense_state_dict` (a run directory's weights) into ``model``, torch-pruned
    or not: a pruned layer's ``"<module>.weight"`` goes to its ``weight_orig``, and its
    ``weight_mask`` is kept."""
    pruned = {name for name, m in model.named_modules() if is_torch_pruned(m)}
    if not pruned:
        model.load_state_dict(state)
        return
    full = dict(state)
    current = model.state_dict()
    for module in pruned:
        prefix = f"{module}." if module else ""
        if prefix + "weight" in full:
            full[prefix + "weight_orig"] = full.pop(prefix + "weight")
        full[prefix + "weight_mask"] = current[prefix + "weight_mask"]
    model.load_state_dict(full)
