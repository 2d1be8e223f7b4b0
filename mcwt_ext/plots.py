"""The paper's figures, as PNG with their numbers saved beside them (JSON).

* Fig. 1  - histograms of the initial values of kept weights (dense, WT, MCWT), per layer type.
* Fig. 2b - distributions of the connectivity of kept weights (WT, MCWT, random), per layer type.
* Curves  - validation accuracy against training iteration, one line per method.

Values are normalised per layer before layers are pooled into one histogram: initial
weights by the layer's std, connectivity by the layer's mean in the dense net, so that
layers of different scale share one axis.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .fit import magnitude_scale
from .runs import FIGURE_FILES, atomic_write

KIND_OF = {"conv": "conv", "linear": "linear", "output": "linear"}
#: Legend labels of the figures, by method key (the keys of Table 1's rows).
LEGEND = {"dense": "dense", "wt": "WT", "mcwt_connectivity": "MCWT", "mcwt_magnitude": "MCWT w/o conn.",
          "random": "random"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, numbers: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(numbers, indent=1) + "\n")
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)
    return out


def _histograms(values: Mapping[str, Mapping[str, np.ndarray]], bins: np.ndarray) -> dict:
    """``values[kind][method]`` -> normalised histogram counts over shared ``bins``."""
    return {kind: {method: np.histogram(v, bins=bins, density=True)[0].tolist()
                   for method, v in per.items()} for kind, per in values.items()}


def _plot_histograms(hist: dict, bins: np.ndarray, xlabel: str, title: str, out: Path) -> Path:
    plt = _pyplot()
    kinds = list(hist)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    centres = 0.5 * (bins[1:] + bins[:-1])
    for ax, kind in zip(axes[0], kinds):
        for method, counts in hist[kind].items():
            ax.step(centres, counts, where="mid", label=method)
        ax.set_title(f"{kind} layers")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    numbers = {"bins": bins.tolist(), "histograms": hist, "xlabel": xlabel}
    return _save(fig, numbers, out)


def fig1_initial_weights(init: Mapping[str, torch.Tensor], kinds: Mapping[str, str],
                         masks: Mapping[str, Mapping[str, torch.Tensor]], out: str | Path,
                         bins: int = 81) -> Path:
    """Fig. 1: initial values (in units of the layer's std) of the weights each method keeps.

    ``masks`` maps a legend label ("WT", "MCWT", ...) to its mask set; "dense" (every
    weight) is added first.
    """
    values: dict[str, dict[str, list]] = {}
    for name, kind in kinds.items():
        w = init[name].double()
        scaled = (w / magnitude_scale(w)).flatten()
        per = values.setdefault(KIND_OF[kind], {})
        per.setdefault("dense", []).append(scaled.numpy())
        for method, m in masks.items():
            per.setdefault(method, []).append(scaled[m[name].flatten()].numpy())
    joined = {k: {m: np.concatenate(v) for m, v in per.items()} for k, per in values.items()}
    edges = np.linspace(-4, 4, bins + 1)
    return _plot_histograms(_histograms(joined, edges), edges, "initial weight / layer std",
                            "Fig. 1: initial values of kept weights", Path(out))


def fig2b_connectivity(kinds: Mapping[str, str], dense_connectivity: Mapping[str, torch.Tensor],
                       nets: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                       out: str | Path, bins: int = 60) -> Path:
    """Fig. 2b: connectivity of kept weights, each in its own masked net.

    ``nets`` maps a method to ``(masks, connectivity)``, its connectivity measured on the
    net it masks (``measure_connectivity``). A kept weight ``w[k, c, ...]`` contributes
    ``g[c]`` divided by the layer's mean connectivity in the dense net.
    """
    values: dict[str, dict[str, list]] = {}
    for name, kind in kinds.items():
        if name not in dense_connectivity:
            continue  # the first layer has no connectivity
        scale = dense_connectivity[name].double().mean()
        for method, (masks, conn) in nets.items():
            g = conn[name].double() / scale if scale > 0 else conn[name].double()
            m = masks[name]
            per_input = m.transpose(0, 1).reshape(m.shape[1], -1).sum(1)  # kept weights per input
            values.setdefault(KIND_OF[kind], {}).setdefault(method, []).append(
                np.repeat(g.numpy(), per_input.numpy()))
    joined = {k: {m: np.concatenate(v) for m, v in per.items()} for k, per in values.items()}
    top = max(float(np.quantile(v, 0.995)) for per in joined.values() for v in per.values() if len(v))
    edges = np.linspace(0, max(top, 1e-6), bins + 1)
    return _plot_histograms(_histograms(joined, edges), edges,
                            "connectivity / dense-net layer mean",
                            "Fig. 2b: connectivity of kept weights", Path(out))


def accuracy_curves(histories: Mapping[str, list[Mapping]], out: str | Path, title: str = "") -> Path:
    """Validation accuracy against iteration, one line per method (``history`` rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    numbers = {}
    for method, rows in histories.items():
        it = [int(r["iteration"]) for r in rows]
        acc = [float(r["val_acc"]) for r in rows]
        numbers[method] = {"iteration": it, "val_acc": acc}
        ax.plot(it, acc, label=method)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title or "validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, numbers, Path(out))


def accuracy_vs_cost(points: Mapping[str, Mapping[str, float]], out: str | Path, title: str = "") -> Path:
    """Accuracy against the seconds one mask took to construct (log scale), one point per method
    (``points[label]``: ``cost_s``, ``cost_s_std``, ``val_acc``, ``val_acc_std`` in %), error bars
    over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>Pp*hX"
    for i, (label, p) in enumerate(points.items()):
        # 10 distinct colours, then the next marker: no two points alike, up to 120 (tab20's light
        # and dark shades of one hue were hard to tell apart once the rows passed 20)
        ax.errorbar(p["cost_s"], p["val_acc"], xerr=p["cost_s_std"], yerr=p["val_acc_std"],
                    fmt=markers[i // 10 % len(markers)], color=plt.cm.tab10(i % 10), markersize=7,
                    capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("construction cost of one mask (s, log scale)")
    ax.set_ylabel("validation accuracy at early stop (%)")
    ax.set_title(title or "accuracy against construction cost")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, {"xlabel": "construction cost (s)", "points": dict(points)}, Path(out))


def ticket_figures(model, masks: Mapping[str, Mapping[str, torch.Tensor]], data, out_dir: str | Path,
                   max_samples: int | None = 2000) -> list[Path]:
    """Fig. 1 and Fig. 2b for one net (``model`` holding its initial weights).

    ``masks`` maps method keys (``LEGEND``: "wt", "mcwt_connectivity", "random", ...) to mask
    sets. Fig. 1 shows all but random beside the dense net; Fig. 2b shows every method.
    Connectivity is measured on the first ``max_samples`` inputs of ``data``, once for the dense
    net and once per method.
    """
    from .connectivity import measure_connectivity
    from .masks import layer_kind

    init = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kinds = layer_kind(model)
    dense = measure_connectivity(model, {}, data, max_samples=max_samples)
    unknown = set(masks) - set(LEGEND)
    if unknown:
        raise ValueError(f"masks: keys must be method keys {sorted(LEGEND)}, got {sorted(unknown)}")
    nets = {LEGEND[m]: (ms, measure_connectivity(model, ms, data, max_samples=max_samples))
            for m, ms in masks.items()}
    out = Path(out_dir)
    return [fig1_initial_weights(init, kinds, {LEGEND[m]: ms for m, ms in masks.items() if m != "random"},
                                 out / FIGURE_FILES["fig1"]),
            fig2b_connectivity(kinds, dense, nets, out / FIGURE_FILES["fig2b"])]
