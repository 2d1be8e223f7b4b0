"""Fit: logistic models of "kept in the winning ticket" on per-weight features.

Features of a weight ``w`` of layer ``l`` (normalised per layer, so one model serves
layers of different scale):

* magnitude    ``|w| / std(initial weights of l)``
* connectivity ``g / mean(g over l's inputs)``, where ``g`` is the mean activation
  entering ``w`` in the untrained net masked by the ticket's earlier layers.

Two variants are fitted, magnitude only and magnitude + connectivity (the first layer,
whose input is the data, has no connectivity and only feeds the magnitude models), at
one of three granularities:

* ``kind`` (the paper's, the default): one model per layer kind, conv or linear (the
  output layer counts as linear), on the normalised features: four models;
* ``layer``: one model per layer, on the normalised features;
* ``pooled-raw`` (the paper's text taken literally): one model per kind on raw ``|w|``
  and raw ``g``, pooled over the kind's layers without normalisation.

The sampler later replaces each model's intercept per layer to hit that layer's target
density, so what transfers are the slopes; :meth:`LogisticFit.slopes` gives them in the
units the sampling ops take.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import MissingFileError, UsageError
from .connectivity import measure_connectivity
from .masks import layer_kind, prunable_layers
from .runs import atomic_write

FORMAT = "mcwt-fit/1"
KINDS = ("conv", "linear")
VARIANTS = ("magnitude", "connectivity")
GRANULARITIES = ("kind", "layer", "pooled-raw")
_NORMALISED = {"magnitude": "|w| / std of the layer's initial weights",
               "connectivity": "g / mean of g over the layer's inputs"}
NORMALISATION = {"kind": _NORMALISED, "layer": _NORMALISED,
                 "pooled-raw": {"magnitude": "|w|, raw", "connectivity": "g, raw"}}


def _kind_group(kind: str) -> str:
    """The per-kind model a layer of ``kind`` ("conv", "linear" or "output") uses."""
    return "conv" if kind == "conv" else "linear"


def _check_granularity(granularity) -> None:
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity: must be one of {list(GRANULARITIES)}, got {granularity!r}")


@dataclass
class LogisticModel:
    """``p(keep) = sigmoid(u_mag * magnitude + u_conn * connectivity + bias)`` on normalised features."""

    u_mag: float
    u_conn: float
    bias: float


@dataclass
class LogisticFit:
    """The fitted models, keyed ``models[group][variant]`` (group: the layer kind, or the layer's
    weight name for granularity ``layer``), with per-layer diagnostics."""

    models: dict[str, dict[str, LogisticModel]]
    layers: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    granularity: str = "kind"

    def __post_init__(self):
        _check_granularity(self.granularity)

    def _lookup(self, group: str, use_connectivity: bool, what: str) -> LogisticModel:
        variant = "connectivity" if use_connectivity else "magnitude"
        try:
            return self.models[group][variant]
        except KeyError:
            raise UsageError(
                f"fit: has no {variant} model for {what} (it was fitted on a ticket without "
                f"such layers); fitted: { {k: sorted(v) for k, v in self.models.items()} }") from None

    def model(self, kind: str, use_connectivity: bool) -> LogisticModel:
        """The model for a layer kind ("conv", "linear" or "output") of a per-kind fit."""
        if self.granularity == "layer":
            raise ValueError("fit: has one model per layer, not per kind; use model_for")
        return self._lookup(_kind_group(kind), use_connectivity, f"{_kind_group(kind)} layers")

    def model_for(self, name: str, kind: str, use_connectivity: bool) -> LogisticModel:
        """The model for layer ``name`` (its weight's name) of kind ``kind``, at any granularity."""
        if self.granularity == "layer":
            return self._lookup(name, use_connectivity, f"layer {name!r}")
        return self.model(kind, use_connectivity)

    def slopes(self, name: str, kind: str, weight: torch.Tensor,
               connectivity: torch.Tensor | None) -> tuple[float, float]:
        """Layer ``name``'s slopes in the units the sampling ops take: on raw ``|w|``, and on
        :func:`normalised_connectivity` of its raw connectivity ``g`` (None: magnitude model).

        A raw-feature (``pooled-raw``) slope on ``g`` becomes ``u * mean(g)`` on ``g / mean(g)``.
        """
        coef = self.model_for(name, kind, connectivity is not None)
        if self.granularity == "pooled-raw":
            u_conn = 0.0
            if connectivity is not None:
                mean = float(connectivity.double().mean())
                u_conn = coef.u_conn * mean if mean > 0 else 0.0  # a dead layer: g = 0
            return coef.u_mag, u_conn
        return coef.u_mag / magnitude_scale(weight), coef.u_conn if connectivity is not None else 0.0

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "granularity": self.granularity,
            "normalisation": NORMALISATION[self.granularity],
            "models": {k: {v: asdict(m) for v, m in vs.items()} for k, vs in self.models.items()},
            "layers": self.layers,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: dict) -> "LogisticFit":
        if obj.get("format") != FORMAT:
            raise UsageError(f"fit: not an mcwt fit file (format {obj.get('format')!r}, "
                             f"expected {FORMAT!r})")
        models = {k: {v: LogisticModel(**m) for v, m in vs.items()} for k, vs in obj["models"].items()}
        # Files written before granularities existed are per-kind fits.
        return cls(models, obj.get("layers", []), obj.get("source", {}),
                   obj.get("granularity", "kind"))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n")


def load_fit(fit: "LogisticFit | str | os.PathLike") -> LogisticFit:
    """A fitted object as it is, or one read from a JSON file."""
    if isinstance(fit, LogisticFit):
        return fit
    if not isinstance(fit, (str, os.PathLike)):
        raise TypeError(f"fit: expected a LogisticFit or a path, got {type(fit).__name__}")
    if not os.path.isfile(fit):
        raise MissingFileError(f"fit: no such file {str(fit)!r} (make one with `mcwt fit`)")
    try:
        with open(fit, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"fit: {fit} is not JSON ({e}); make one with `mcwt fit`") from None
    if not isinstance(obj, dict):
        raise UsageError(f"fit: {fit} is not an mcwt fit file (JSON {type(obj).__name__}, expected an object)")
    try:
        loaded = LogisticFit.from_json(obj)
        for group, variants in loaded.models.items():
            for variant, m in variants.items():
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in (m.u_mag, m.u_conn, m.bias)):
                    raise TypeError(f"model {group}/{variant} has non-numeric coefficients")
        return loaded
    except (KeyError, TypeError, AttributeError) as e:  # the right tag, a broken body
        raise UsageError(f"fit: {fit} is not a complete mcwt fit file ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise UsageError(f"fit: {fit}: {str(e).removeprefix('fit: ')}") from None


def magnitude_scale(weight: torch.Tensor) -> float:
    """What ``|w|`` is divided by: the std of the layer's initial weights (1 if undefined or 0)."""
    std = float(weight.detach().double().std()) if weight.numel() > 1 else 1.0
    return std if std > 0 else 1.0


def layer_features(weight: torch.Tensor, connectivity: torch.Tensor | None, *,
                   normalise: bool = True) -> dict[str, torch.Tensor]:
    """Feature tensors of one layer, each of ``weight``'s shape, normalised (or raw)."""
    weight = weight.detach().double()
    feats = {"magnitude": weight.abs() / magnitude_scale(weight) if normalise else weight.abs()}
    if connectivity is not None:
        g = normalised_connectivity(connectivity) if normalise else connectivity.double()
        feats["connectivity"] = g.view(1, -1, *([1] * (weight.dim() - 2))).expand_as(weight)
    return feats


#: Normalised connectivity is rounded to this grid. CPU and CUDA convolutions round
#: differently in the last bits; on a grid far coarser than that most values agree, so
#: masks differ on CPU and CUDA only where a value lies within a rounding error of a
#: grid boundary: a bounded fraction of weights (python_tests/test_ops_cross_device.py).
#: The keep-probabilities move by at most ``u_conn / 8192``.
CONNECTIVITY_GRID = 1.0 / 4096


def normalised_connectivity(g: torch.Tensor) -> torch.Tensor:
    """``g / mean(g)`` rounded to :data:`CONNECTIVITY_GRID`; a dead layer (all zero) stays zero."""
    g = g.double()
    mean = g.mean()
    if not mean > 0:
        return torch.zeros_like(g)
    return torch.round(g / mean / CONNECTIVITY_GRID) * CONNECTIVITY_GRID


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> LogisticModel:
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():
        raise UsageError("fit: the ticket keeps all or none of these weights, nothing to fit")
    # Unregularised in effect (large C): the coefficients are the model, not a prediction tool.
    clf = LogisticRegression(C=1e6, max_iter=1000).fit(x, y)
    coef = clf.coef_[0]
    return LogisticModel(u_mag=float(coef[0]), u_conn=float(coef[1]) if len(coef) > 1 else 0.0,
                         bias=float(clf.intercept_[0]))


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def fit_ticket(model: nn.Module, masks: dict[str, torch.Tensor], data, *, max_samples=None,
               max_weights_per_layer: int = 200_000, seed: int = 0, batch_size: int = 500,
               device: str | torch.device | None = None, granularity: str = "kind") -> LogisticFit:
    """Fit the logistic models to a winning ticket.

    ``model`` holds the ticket's initial weights; ``masks`` are the ticket; ``data``
    (tensor, DataLoader or batches) is what connectivity is measured on. Each layer
    contributes at most ``max_weights_per_layer`` weights (a seeded subsample), which
    bounds the fitting time and keeps large layers from drowning small ones. ``device``
    is where connectivity is measured (default: the model's); ``model`` is not moved.
    ``granularity`` is one of :data:`GRANULARITIES` (see the module's docstring).
    """
    _check_granularity(granularity)
    layers = prunable_layers(model)
    kinds = layer_kind(model)
    missing = [f"{n}.weight" for n, _ in layers if f"{n}.weight" not in masks]
    if missing:
        raise UsageError(f"masks: the ticket has no mask for {missing}")
    net = model if device is None else copy.deepcopy(model).to(device)
    conn = measure_connectivity(net, masks, data, max_samples=max_samples, batch_size=batch_size)
    conn = {name: g.cpu() for name, g in conn.items()}
    rng = np.random.default_rng(seed)

    rows: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    per_layer = []
    for index, (name, module) in enumerate(layers):
        param = f"{name}.weight"
        group = param if granularity == "layer" else _kind_group(kinds[param])
        g = conn.get(param) if index > 0 else None
        feats = {k: v.flatten().cpu().numpy() for k, v in layer_features(
            module.weight, g, normalise=granularity != "pooled-raw").items()}
        y = masks[param].flatten().cpu().numpy().astype(np.int64)
        if y.all():  # a layer the ticket keeps whole (resnet20's output layer) tells nothing
            continue
        take = (rng.choice(len(y), max_weights_per_layer, replace=False)
                if len(y) > max_weights_per_layer else np.arange(len(y)))
        mag = feats["magnitude"][take][:, None]
        rows.setdefault((group, "magnitude"), []).append((mag, y[take]))
        if g is not None:
            both = np.concatenate([mag, feats["connectivity"][take][:, None]], axis=1)
            rows.setdefault((group, "connectivity"), []).append((both, y[take]))
        per_layer.append({
            "name": param, "kind": kinds[param], "group": group, "weights": int(len(y)),
            "keep_rate": float(y.mean()),
            "weight_std": float(module.weight.detach().double().std()),
            "connectivity_mean": float(g.double().mean()) if g is not None else None,
            "_take": take, "_feats": feats, "_y": y,
        })

    models: dict[str, dict[str, LogisticModel]] = {}
    for (group, variant), parts in rows.items():
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        models.setdefault(group, {})[variant] = _fit_logistic(x, y)

    for info in per_layer:  # diagnostics: how well each model ranks this layer's weights
        take, feats, y = info.pop("_take"), info.pop("_feats"), info.pop("_y")
        info["auc"] = {}
        for variant, m in models.get(info.pop("group"), {}).items():
            if variant == "connectivity" and "connectivity" not in feats:
                continue
            score = m.u_mag * feats["magnitude"][take]
            if variant == "connectivity":
                score = score + m.u_conn * feats["connectivity"][take]
            info["auc"][variant] = _auc(y[take], score)
    return LogisticFit(models, per_layer, granularity=granularity)

