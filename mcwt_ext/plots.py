"""The paper's figures, as PNG with their numbers saved beside them (JSON).

* Fig. 1  - histograms of the initial values of kept weights (dense, WT, MCWT), per layer type.
* Fig. 2b - distributions of the connectivity of kept weights (WT, MCWT, random), per layer type.
* Curves  - validation accuracy (%) against training iteration, one line per method.
* Cost    - validation accuracy (%) against the cost of constructing one mask, one point per method.

Values are normalised per layer before layers are pooled into one histogram: initial
weights by the layer's std, connectivity by the layer's mean in the dense net, so that
layers of different scale share one axis.

Every figure draws a method in the colour and marker of :func:`style` (one table, so a method
looks the same in all of them) and says in its title which net, dataset, seed(s) and MCWT
variant(s) it shows (:func:`title`).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .fit import magnitude_scale
from .runs import FIGURE_FILES, atomic_write

KIND_OF = {"conv": "conv", "linear": "linear", "output": "linear"}
#: Legend labels of Fig. 1 and 2b, by method key (the other figures use the registry's labels).
LEGEND = {"dense": "dense", "wt": "WT", "mcwt_connectivity": "MCWT", "mcwt_magnitude": "MCWT w/o conn.",
          "random": "random"}
#: Colour and marker of the paper's rows, by method key (tab10 hues).
STYLES = {"dense": ("#7f7f7f", "s"), "wt": ("#1f77b4", "o"), "mcwt_connectivity": ("#ff7f0e", "D"),
          "mcwt_magnitude": ("#d62728", "^"), "random": ("#2ca02c", "v")}
# The other rows: tab10 less the fixed hues, then black and indigo. 7 colours against 8 markers
# (coprime) give the first 56 of them distinct pairs, none in a fixed colour.
OTHER_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#000000", "#393b79")
OTHER_MARKERS = ("P", "X", "p", "*", "h", "<", ">", "d")
#: What a title says of the MCWT rows it shows, by method key.
VARIANTS = {"mcwt_connectivity": "with", "mcwt_magnitude": "without"}
#: Histogram axes end near this quantile of the plotted values when a thin tail would stretch them.
TAIL_QUANTILE = 0.995
ACCURACY = "validation accuracy (%)"


def _registry() -> dict:
    from .experiments.methods import METHODS  # lazily: the registry imports the training code

    return METHODS


def style(key: str) -> tuple[str, str]:
    """``(colour, marker)`` of method ``key``: fixed for the paper's rows (:data:`STYLES`), else
    by the key's place among the registry's other rows (an unregistered key: by a stable hash)."""
    if key in STYLES:
        return STYLES[key]
    others = [k for k in _registry() if k not in STYLES]
    i = others.index(key) if key in others else len(others) + zlib.crc32(key.encode()) % 1000
    return OTHER_COLOURS[i % len(OTHER_COLOURS)], OTHER_MARKERS[i % len(OTHER_MARKERS)]


def style_table() -> dict[str, tuple[str, str]]:
    """:func:`style` of every registered method, the paper's rows first."""
    return {k: style(k) for k in dict.fromkeys([*STYLES, *_registry()])}


def _label(key: str) -> str:
    return _registry()[key].label if key in _registry() else key


def _seeds(seed: int | Sequence[int] | None) -> str:
    """"seed 3", "seeds 0, 2", or a run of seeds as "seeds 0-9"."""
    seeds = sorted([seed] if isinstance(seed, int) else list(seed or []))
    if len(seeds) < 2:
        return f"seed {seeds[0]}" if seeds else ""
    run = len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1))
    return f"seeds {seeds[0]}-{seeds[-1]}" if run else "seeds " + ", ".join(map(str, seeds))


def title(what: str, methods: Sequence[str], *, dataset: str | None = None, arch: str | None = None,
          seed: int | Sequence[int] | None = None) -> str:
    """``what``, then which net, dataset, seed(s) and MCWT variant(s) (of ``methods``, method keys)
    it shows; the parts not given are left out."""
    shown = [text for key, text in VARIANTS.items() if key in methods]
    parts = [" on ".join(p for p in (arch, dataset) if p), _seeds(seed),
             f"MCWT {' and '.join(shown)} connectivity" if shown else "no MCWT"]
    return f"{what}\n" + ", ".join(p for p in parts if p)


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


def _style_json(key: str) -> dict:
    colour, marker = style(key)
    return {"method": key, "color": colour, "marker": marker}


def _axis_end(values: np.ndarray) -> float:
    """The largest value within 10% above the :data:`TAIL_QUANTILE` quantile: a thin tail beyond
    is cut (the figure says how much); without one, nothing is."""
    if not values.size:
        return 1.0
    top = 1.1 * float(np.quantile(values, TAIL_QUANTILE))
    return max(float(values[values <= top].max()), 1e-6)


def _join(values: Mapping[str, Mapping[str, list]]) -> dict[str, dict[str, np.ndarray]]:
    return {k: {m: np.concatenate(v) for m, v in per.items()} for k, per in values.items()}


def _panel(ax, per: Mapping[str, np.ndarray], edges: np.ndarray, xlabel: str) -> tuple[dict, dict]:
    """One layer kind's step histograms (``per[method key]``) over the shared ``edges``, its axis
    fitted to its own values; its legend-labelled densities and each method's share of values
    beyond the axis."""
    centres, hist = 0.5 * (edges[1:] + edges[:-1]), {}
    for key, v in per.items():
        counts = np.histogram(v, bins=edges, density=True)[0]
        colour, marker = style(key)
        ax.step(centres, counts, where="mid", color=colour, marker=marker, markersize=4,
                markevery=max(1, len(centres) // 8), label=LEGEND[key])
        hist[LEGEND[key]] = counts.tolist()
    symmetric = edges[0] < 0
    pooled = np.concatenate(list(per.values()))
    end = min(_axis_end(np.abs(pooled) if symmetric else pooled), edges[-1])
    lo = -end if symmetric else edges[0]
    beyond = {LEGEND[k]: float(np.mean((v < lo) | (v > end))) if v.size else 0.0 for k, v in per.items()}
    worst = max(beyond.values(), default=0.0)
    note = f"\n(tail cut: up to {worst:.1%} of a method's values lie beyond the axis)" if worst else ""
    ax.set(xlim=(lo, end), xlabel=xlabel + note, ylabel="density")
    ax.legend(fontsize=8)
    return hist, beyond


def _histogram_figure(values: Mapping[str, Mapping[str, np.ndarray]], edges: np.ndarray, xlabel: str,
                      what: str, about: dict, out: Path) -> Path:
    """``values[kind][method key]`` as step histograms over shared ``edges``, one panel per kind."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 4), squeeze=False)
    hist, beyond = {}, {}
    for ax, (kind, per) in zip(axes[0], values.items()):
        hist[kind], beyond[kind] = _panel(ax, per, edges, xlabel)
        ax.set_title(f"{kind} layers")
    methods = list(dict.fromkeys(k for per in values.values() for k in per))
    heading = title(what, methods, **about)
    fig.suptitle(heading)
    fig.tight_layout()
    numbers = {"title": heading, "bins": edges.tolist(), "histograms": hist, "xlabel": xlabel,
               "share_beyond_axis": beyond, "styles": {LEGEND[k]: _style_json(k) for k in methods}}
    return _save(fig, numbers, out)


def fig1_initial_weights(init: Mapping[str, torch.Tensor], kinds: Mapping[str, str],
                         masks: Mapping[str, Mapping[str, torch.Tensor]], out: str | Path,
                         bins: int = 81, **about) -> Path:
    """Fig. 1: initial values (in units of the layer's std) of the weights each method keeps.

    ``masks`` maps method keys (:data:`LEGEND`) to mask sets; "dense" (every weight) is added
    first. ``about``: ``dataset``, ``arch``, ``seed`` for the title (:func:`title`).
    """
    values: dict[str, dict[str, list]] = {}
    for name, kind in kinds.items():
        w = init[name].double()
        scaled = (w / magnitude_scale(w)).flatten()
        per = values.setdefault(KIND_OF[kind], {})
        per.setdefault("dense", []).append(scaled.numpy())
        for key, m in masks.items():
            per.setdefault(key, []).append(scaled[m[name].flatten()].numpy())
    joined = _join(values)
    end = _axis_end(np.abs(np.concatenate([v for per in joined.values() for v in per.values()])))
    edges = np.linspace(-end, end, bins + 1)
    return _histogram_figure(joined, edges, "initial weight / layer std",
                             "Fig. 1: initial values of kept weights", about, Path(out))


def fig2b_connectivity(kinds: Mapping[str, str], dense_connectivity: Mapping[str, torch.Tensor],
                       nets: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                       out: str | Path, bins: int = 60, **about) -> Path:
    """Fig. 2b: connectivity of kept weights, each in its own masked net.

    ``nets`` maps a method key to ``(masks, connectivity)``, its connectivity measured on the
    net it masks (``measure_connectivity``). A kept weight ``w[k, c, ...]`` contributes
    ``g[c]`` divided by the layer's mean connectivity in the dense net. ``about``: as Fig. 1's.
    """
    values: dict[str, dict[str, list]] = {}
    for name, kind in kinds.items():
        if name not in dense_connectivity:
            continue  # the first layer has no connectivity
        scale = dense_connectivity[name].double().mean()
        for key, (masks, conn) in nets.items():
            g = conn[name].double() / scale if scale > 0 else conn[name].double()
            m = masks[name]
            per_input = m.transpose(0, 1).reshape(m.shape[1], -1).sum(1)  # kept weights per input
            values.setdefault(KIND_OF[kind], {}).setdefault(key, []).append(
                np.repeat(g.numpy(), per_input.numpy()))
    joined = _join(values)
    # a few inputs of high connectivity would stretch the axis far past the bulk of the mass
    end = _axis_end(np.concatenate([v for per in joined.values() for v in per.values()]))
    edges = np.linspace(0, end, bins + 1)
    return _histogram_figure(joined, edges, "connectivity / dense-net layer mean",
                             "Fig. 2b: connectivity of kept weights", about, Path(out))


def accuracy_curves(histories: Mapping[str, list[Mapping]], out: str | Path, **about) -> Path:
    """Validation accuracy (%) against iteration, one line per method: ``histories[method key]``
    its ``metrics.csv`` rows. The JSON keeps the rows' ``val_acc`` (a fraction, as metrics.csv
    has it) beside the plotted ``val_acc_pct``. ``about``: as Fig. 1's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    numbers = {}
    for key, rows in histories.items():
        it = [int(r["iteration"]) for r in rows]
        acc = [float(r["val_acc"]) for r in rows]
        pct = [100 * a for a in acc]
        colour, marker = style(key)
        ax.plot(it, pct, color=colour, marker=marker, markersize=4, markevery=max(1, len(it) // 12),
                label=_label(key))
        numbers[_label(key)] = {**_style_json(key), "iteration": it, "val_acc": acc, "val_acc_pct": pct}
    ax.set(xlabel="training iteration", ylabel=ACCURACY)
    ax.set_title(title("Validation accuracy during training", list(histories), **about), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, numbers, Path(out))


def accuracy_vs_cost(points: Mapping[str, Mapping], out: str | Path, **about) -> Path:
    """Accuracy against the seconds one mask took to construct (log scale), one point per method
    (``points[label]``: ``method`` (its key), ``cost_s``, ``cost_s_std``, ``val_acc``,
    ``val_acc_std`` in %), error bars over seeds. ``about``: as Fig. 1's (``seed``: the seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, p in points.items():
        colour, marker = style(p["method"])
        ax.errorbar(p["cost_s"], p["val_acc"], xerr=p["cost_s_std"], yerr=p["val_acc_std"], fmt=marker,
                    color=colour, markersize=7, capsize=3, label=label)
    ax.set_xscale("log")
    xlabel, ylabel = "construction cost of one mask (s, log scale)", "validation accuracy at early stop (%)"
    heading = title("Accuracy against construction cost (mean ± std over seeds)",
                    [p["method"] for p in points.values()], **about)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(heading, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    numbers = {"title": heading, "xlabel": xlabel, "ylabel": ylabel,
               "points": {label: {**p, **_style_json(p["method"])} for label, p in points.items()}}
    return _save(fig, numbers, Path(out))


def ticket_figures(model, masks: Mapping[str, Mapping[str, torch.Tensor]], data, out_dir: str | Path,
                   max_samples: int | None = 2000, **about) -> list[Path]:
    """Fig. 1 and Fig. 2b for one net (``model`` holding its initial weights).

    ``masks`` maps method keys (``LEGEND``: "wt", "mcwt_connectivity", "random", ...) to mask
    sets. Fig. 1 shows all but random beside the dense net; Fig. 2b shows every method.
    Connectivity is measured on the first ``max_samples`` inputs of ``data``, once for the dense
    net and once per method. ``about``: ``dataset``, ``arch``, ``seed`` for the titles.
    """
    from .connectivity import measure_connectivity
    from .masks import layer_kind

    init = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kinds = layer_kind(model)
    dense = measure_connectivity(model, {}, data, max_samples=max_samples)
    unknown = set(masks) - set(LEGEND)
    if unknown:
        raise ValueError(f"masks: keys must be method keys {sorted(LEGEND)}, got {sorted(unknown)}")
    nets = {m: (ms, measure_connectivity(model, ms, data, max_samples=max_samples)) for m, ms in masks.items()}
    out = Path(out_dir)
    return [fig1_initial_weights(init, kinds, {m: ms for m, ms in masks.items() if m != "random"},
                                 out / FIGURE_FILES["fig1"], **about),
            fig2b_connectivity(kinds, dense, nets, out / FIGURE_FILES["fig2b"], **about)]
