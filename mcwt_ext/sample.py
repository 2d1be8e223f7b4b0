"""Sample: draw Monte Carlo Winning Tickets from a fitted logistic model.

Greedy, from input to output: layer ``l``'s connectivity is measured on the net with
the masks sampled so far, the layer's intercept is calibrated so its expected density
equals its target, and its mask is drawn with the fused Bernoulli op (or, with
``exact=True``, exactly the target count with the fused top-k op). Layer ``l`` uses
Philox stream ``(seed, offset=l)``: the same seed and the same connectivity give the same
masks on CPU and CUDA; measured connectivity differs in the last bits between the devices,
so their masks agree on all but a bounded fraction of weights (test_ops_cross_device.py).

Any ``nn.Module`` works: layers are taken in the order the forward pass first reaches
them, and connectivity is measured by a stream from :mod:`mcwt_ext.connectivity`
(fused ops for a flat ``nn.Sequential``, forward hooks with a prefix cache for anything
else, BatchNorm in eval mode). A model pruned with ``torch.nn.utils.prune`` is sampled
from its dense ``weight_orig``; its current ``weight_mask`` plays no part.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .connectivity import DEFAULT_CACHE_BYTES, forward_layers, open_stream
from .fit import LogisticFit, load_fit, normalised_connectivity
from .masks import dense_weight, kept_count, layer_kind, prunable_layers
from .validate import check_seed, check_sparsity


@dataclass
class LayerDraw:
    """How one layer was sampled (for summaries and figures)."""

    name: str
    kind: str
    target_density: float
    expected_density: float
    density: float
    u_mag: float            # slope on raw |w|: the fit's slope over the layer's weight scale
    u_conn: float           # slope on normalised g (g / its mean over the layer's inputs)
    bias: float             # the calibrated intercept
    # what computed the previous layer, whose sums are this layer's connectivity: on CUDA the conv
    # path ("cudnn"/"direct", csrc/conv_path.h), else "cpu" or "torch" (hooks); None: no connectivity
    connectivity_path: str | None = None
    connectivity: list[float] | None = field(default=None, repr=False)


def calibrate_bias(weight, connectivity, *, u_mag: float, u_conn: float, density: float,
                   tol: float = 1e-7, max_iter: int = 200) -> float:
    """The intercept at which the layer's expected density (mean keep-probability) is ``density``.

    Bisection on the fused ``expected_density`` reduction, which is monotone in the bias, run
    inside the op ``calibrate_bias`` (on a GPU: one launch and one host synchronisation).
    """
    from . import ops

    return ops.calibrate_bias(weight, connectivity, u_mag=u_mag, u_conn=u_conn, density=density, tol=tol,
                              max_iter=max_iter)[0]


def _target_densities(sparsity, names: list[str]) -> dict[str, float]:
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(names))
        missing = [n for n in names if n not in sparsity]
        if unknown or missing:
            raise ValueError(f"sparsity: per-layer dict must name exactly the prunable weights "
                             f"{names}; unknown {unknown}, missing {missing}")
        per_layer = {n: sparsity[n] for n in names}
    else:
        per_layer = {n: sparsity for n in names}
    return {n: 1.0 - check_sparsity(s, f"sparsity of {n!r}") for n, s in per_layer.items()}


def check_fit_covers(fit: LogisticFit, names: list[str], kinds: dict[str, str],
                     targets: dict[str, float], use_connectivity: bool) -> None:
    """Raise if ``fit`` lacks a model one of the layers ``names`` (in forward order) needs; a
    layer kept dense (target density 1) needs none, the first layer no connectivity model."""
    for name in names:
        if targets[name] < 1.0:
            fit.model_for(name, kinds[name], use_connectivity and name != names[0])


def sample_ticket(model: nn.Module, fit, data=None, *, sparsity=0.8, use_connectivity: bool = True,
                  exact: bool = False, seed: int = 0, max_samples: int | None = None,
                  batch_size: int = 500, cache_bytes: int = DEFAULT_CACHE_BYTES,
                  progress: bool = False, fused: bool = True
                  ) -> tuple[dict[str, torch.Tensor], list[LayerDraw]]:
    """:func:`sample_masks`, also returning how each layer was drawn.

    ``fused=False`` measures connectivity with hooks even where the fused stream applies
    (the two agree to float rounding; for tests and benchmarks).
    """
    from . import ops

    fit = load_fit(fit)
    check_seed(seed)
    if not prunable_layers(model):
        raise ValueError(f"model: {type(model).__name__} has no prunable (Conv2d or Linear) layers")
    stream = None
    if use_connectivity and len(prunable_layers(model)) > 1:
        if data is None:
            raise ValueError("data: connectivity needs data to measure activations on "
                             "(or pass use_connectivity=False)")
        stream = open_stream(model, data, max_samples=max_samples, batch_size=batch_size,
                             cache_bytes=cache_bytes, fused=fused)
        layers = stream.layers
    else:
        layers = forward_layers(model, data)
    kinds = layer_kind(model, layers=layers)
    names = [f"{n}.weight" for n, _ in layers]
    targets = _target_densities(sparsity, names)
    check_fit_covers(fit, names, kinds, targets, use_connectivity)  # before any work

    masks: dict[str, torch.Tensor] = {}
    draws: list[LayerDraw] = []
    with _progress(len(layers), progress) as bar:  # closed on an error too
        for index, (name, module) in enumerate(layers):
            param = names[index]
            weight = dense_weight(module).detach()
            g = stream.advance(masks[names[index - 1]]) if stream is not None and index > 0 else None
            density = targets[param]
            u_mag, u_conn = fit.slopes(param, kinds[param], weight, g) if density < 1.0 else (0.0, 0.0)
            g_norm = None if g is None else normalised_connectivity(g).to(weight.device, weight.dtype)
            k = kept_count(weight.numel(), density)
            if density >= 1.0 or k == weight.numel():
                mask, bias, expected = torch.ones_like(weight, dtype=torch.bool), math.inf, density
            else:
                bias, expected = ops.calibrate_bias(weight, g_norm, u_mag=u_mag, u_conn=u_conn, density=density)
                args = dict(u_mag=u_mag, u_conn=u_conn, bias=bias, seed=seed, offset=index)
                mask = (ops.logistic_topk(weight, g_norm, k=k, **args) if exact
                        else ops.logistic_bernoulli(weight, g_norm, **args))
            masks[param] = mask
            draws.append(LayerDraw(
                name=param, kind=kinds[param], target_density=density, expected_density=expected,
                density=float(mask.double().mean()) if mask.numel() else 0.0,
                u_mag=u_mag, u_conn=u_conn, bias=bias,
                connectivity_path=None if g is None else stream.path(index - 1),
                connectivity=None if g is None else g.cpu().tolist()))
            bar.update(1)
    return masks, draws


def sample_masks(model: nn.Module, fit: "LogisticFit | str | os.PathLike", data=None, *,
                 sparsity: float | Mapping[str, float] = 0.8, use_connectivity: bool = True,
                 exact: bool = False, seed: int = 0, max_samples: int | None = None,
                 batch_size: int = 500, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Sample a Monte Carlo Winning Ticket for ``model`` (which holds its initial weights).

    Args:
        model: any ``nn.Module`` whose Conv2d/Linear layers are pruned (each reached once per
            forward pass, no shared weights; torch-pruned layers count by ``weight_orig``);
            its current weights are the initial weights. A flat ``nn.Sequential`` of
            Conv2d/Linear, ReLU, 2x2 max-pool and Flatten goes through the fused ops.
        fit: a :class:`~mcwt_ext.fit.LogisticFit` or the path of its JSON (``mcwt fit``).
        data: the inputs connectivity is measured on: a tensor, a DataLoader, a Dataset, or
            an iterable of batches (tensors or ``(input, target)`` pairs). Also fixes the
            layer order of a non-Sequential model (its first forward pass); without data
            the order is the modules' registration order.
        sparsity: share of each layer to prune, a float or ``{param name: float}``, in [0, 1).
        use_connectivity: use the magnitude + connectivity models (False: magnitude only).
        exact: keep exactly ``round(n * (1 - sparsity))`` weights per layer (else Bernoulli,
            whose expected density is the target).
        seed: Philox seed; the same seed gives the same masks on CPU and CUDA.
        max_samples: measure connectivity on the first ``max_samples`` inputs only.

    Returns:
        ``{"<module>.weight": bool tensor}``, True where the weight is kept.
    """
    masks, _ = sample_ticket(model, fit, data, sparsity=sparsity, use_connectivity=use_connectivity,
                             exact=exact, seed=seed, max_samples=max_samples,
                             batch_size=batch_size, cache_bytes=cache_bytes, progress=progress)
    return masks


def sample_record(draws: list[LayerDraw], wall_time_s: float) -> dict:
    """What ``sample.json`` in a run directory holds: the time and each layer's draw.

    A dense layer's intercept (+inf) is written as null, so the file stays strict JSON.
    """
    layers = [{k: v for k, v in asdict(d).items() if k != "connectivity"} for d in draws]
    for layer in layers:
        if not math.isfinite(layer["bias"]):
            layer["bias"] = None
    return dict(wall_time_s=wall_time_s, layers=layers)


def _progress(total: int, enabled: bool):
    from .progress import Progress

    return Progress(total, "sample", unit="layer", noun="layer", leave=False, enabled=enabled)

