"""What a finished (or partial) grid reports: Table 1 (mean ± std over seeds beside the paper's
numbers, and every row's paired difference to the WT with its interval, :mod:`.stats`), the rows
against the WT (overlap, dead units, cost), the cost of constructing each kind of mask, and the
figures (drawn by plots.py). The table's header names the layers each group of rows keeps whole
(by its distribution, :mod:`mcwt_ext.distribution`), every layer's kept count in ``layers.csv``."""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

import torch

from ..compare import dead_units, overlap_with_ticket, total_dead, total_overlap
from ..masks import densities
from ..runs import FIGURE_FILES, GRID_FILES, RunDir, atomic_write, grid_cell
from .grid import Grid
from .methods import METHODS
from .stats import COVERS_ZERO, LEVEL, MIN_SEEDS, Paired, holm, paired_difference

__all__ = ["METRICS", "method_run", "method_masks", "compare_methods", "comparison_markdown",
           "extra_cost_rows", "method_run", "collect", "write_table_csv", "read_table_csv", "table_markdown",
           "cost_rows", "cost_markdown", "figures", "report", "layer_rows", "dense_layers_markdown"]

METRICS = {
    "val_acc_early_stop": "Validation accuracy at early stop (min. validation loss)",
    "val_acc_max": "Maximum validation accuracy over training",
    "val_acc_final": "Validation accuracy at the end of training",
    "test_acc_early_stop": "Test accuracy at early stop",
}
TABLE_FIELDS = ["metric", "method", "arch", "n", "mean", "std", "paper",
                "diff_n", "diff_mean", "diff_low", "diff_high", "diff_covers_zero", "diff_p", "diff_p_holm",
                "diff_seeds"]
PER_SEED_FIELDS = ["metric", "method", "arch", "seed", "value"]
LAYER_FIELDS = ["arch", "distribution", "methods", "layer", "weight", "shape", "size", "kept", "dense"]


def method_run(grid_out: Path, arch: str, seed: int, method: str) -> RunDir | None:
    """The finished training run behind a Table 1 row, or None while it is missing."""
    m = METHODS[method]
    cell = grid_cell(grid_out, arch, seed, m.cell)
    return m.trained(cell) if cell.done() else None


def _summary(grid_out: Path, arch: str, seed: int, method: str) -> dict | None:
    rd = method_run(grid_out, arch, seed, method)
    return None if rd is None else rd.load_json(RunDir.SUMMARY)


def _per_seed(grid: Grid, arch: str, method: str, metric: str) -> dict[int, float]:
    """``{seed: metric in %}`` over the seeds whose row is finished."""
    return {seed: 100 * s[metric] for seed in grid.seeds
            if (s := _summary(grid.out, arch, seed, method)) is not None}


def _diff_fields(paired: Paired) -> dict:
    return dict(diff_n=paired.n, diff_mean=paired.mean, diff_low=paired.low, diff_high=paired.high,
                diff_covers_zero=paired.covers_zero, diff_p=paired.p, diff_p_holm=math.nan,
                diff_seeds=_seeds_text(paired.diffs))


def _seeds_text(diffs) -> str:
    """Per-seed differences as one CSV cell ("-2.1000;-3.2800"), in seed order."""
    return ";".join(f"{d:.4f}" for d in diffs)


def _seeds_of(text: str) -> tuple[float, ...]:
    return tuple(float(d) for d in text.split(";")) if text else ()


def _adjust(rows: list[dict], p: str, adjusted: str, reference: str = "wt") -> None:
    """Holm-adjusted p-values over every comparison in ``rows`` (the reference row is none)."""
    family = [r for r in rows if r["method"] != reference]
    for r, q in zip(family, holm([r[p] for r in family])):
        r[adjusted] = q


def collect(grid: Grid) -> list[dict]:
    """One row per (metric, method, arch): mean and std (in %) over seeds, the paper's number, and
    the paired difference to the WT (method minus WT, seed by seed; :mod:`.stats`)."""
    rows = []
    for metric in METRICS:
        for method in grid.methods:
            m = METHODS[method]
            for arch in grid.archs:
                per_seed = _per_seed(grid, arch, method, metric)
                vals = list(per_seed.values())
                rows.append(dict(
                    metric=metric, method=method, arch=arch, n=len(vals),
                    mean=statistics.fmean(vals) if vals else math.nan,
                    std=statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else math.nan,
                    paper=m.paper.get(arch) if metric == "val_acc_early_stop" else None,
                    **_diff_fields(paired_difference(per_seed, _per_seed(grid, arch, "wt", metric)))))
    _adjust(rows, "diff_p", "diff_p_holm")
    return rows


def per_seed_rows(grid: Grid) -> list[dict]:
    """Every value behind the table (``per_seed.csv``), so that a reader can recompute any
    interval: one row per (metric, method, arch, seed), in %."""
    return [dict(metric=metric, method=method, arch=arch, seed=seed, value=f"{value:.4f}")
            for metric in METRICS for method in grid.methods for arch in grid.archs
            for seed, value in _per_seed(grid, arch, method, metric).items()]


def _save_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    RunDir(path.parent).save_csv(path.name, rows, fieldnames)


def write_table_csv(rows: list[dict], path: Path) -> None:
    _save_csv(Path(path), [{**r, **{k: f"{r[k]:.4f}" for k in ("mean", "std", "diff_mean", "diff_low", "diff_high")},
                            **{k: f"{r[k]:.6g}" for k in ("diff_p", "diff_p_holm")},
                            "paper": "" if r["paper"] is None else f"{r['paper']:.2f}"}
                           for r in rows], TABLE_FIELDS)


def read_table_csv(path: Path) -> list[dict]:
    """Parse ``table.csv`` back into the rows :func:`collect` made (to 4 decimals)."""
    with open(path, newline="") as f:
        return [dict(metric=r["metric"], method=r["method"], arch=r["arch"], n=int(r["n"]),
                     mean=float(r["mean"]), std=float(r["std"]),
                     paper=float(r["paper"]) if r["paper"] else None, diff_n=int(r["diff_n"]),
                     **{k: float(r[k]) for k in ("diff_mean", "diff_low", "diff_high")},
                     diff_covers_zero=r["diff_covers_zero"] == "True",
                     **{k: float(r.get(k) or "nan") for k in ("diff_p", "diff_p_holm")},  # older tables: none
                     diff_seeds=r.get("diff_seeds", "")) for r in csv.DictReader(f)]


def _paired(r: dict) -> Paired:
    return Paired(r["diff_n"], r["diff_mean"], r["diff_low"], r["diff_high"], _seeds_of(r["diff_seeds"]),
                  r["diff_p"])


PAIRED_NOTE = (f"Paired difference to the WT: the row minus the WT, seed by seed (every row of a seed "
               f"shares its initial weights and batch order), mean and {LEVEL:.0%} Student-t interval "
               f"over the n seeds both have; {COVERS_ZERO}: the interval covers 0 (no difference "
               f"detected with these seeds, which is not evidence of no difference); with fewer than "
               f"{MIN_SEEDS} seeds, no interval: the per-seed differences instead (every value is in "
               f"`{GRID_FILES['per_seed_csv']}`).")


def holm_note(count: int) -> str:
    return (f"This table makes {count} comparisons to the WT at once; each p_Holm is its paired t-test's "
            f"p-value Holm-adjusted over all of them, so that the chance of any false detection in the "
            f"table stays below {1 - LEVEL:.0%}." if count else "")


#: How the header names each distribution's rows (:attr:`~.methods.Method.distribution`).
DISTRIBUTION_TITLES = {"uniform": "uniform rows", "erk": "ERK rows",
                       "uniform-erk-dense": "ERK's control (ERK's dense layers, the others at one share)"}


def layer_labels(kinds: Mapping[str, str]) -> dict[str, str]:
    """``{weight name: conv1, conv2, ..., fc1, ...}``, numbered per kind in forward order (the
    output layer is the last fc)."""
    seen = {"conv": 0, "fc": 0}
    labels = {}
    for name, kind in kinds.items():
        short = "conv" if kind == "conv" else "fc"
        seen[short] += 1
        labels[name] = f"{short}{seen[short]}"
    return labels


def _layer_model(grid: Grid, arch: str):
    """A model of ``arch`` shaped for the grid's data, and an input that traces it: from a cell's
    ``config.json`` (no data needed), else from the data."""
    from ..models import build_model, build_model_from_config

    for cell in grid.cells:
        if cell.arch == arch and cell.dir().exists(RunDir.CONFIG):
            config = cell.dir().load_json(RunDir.CONFIG)
            size = config["image_size"]
            return build_model_from_config(config), torch.zeros(1, config["in_channels"], size, size)
    from .grid import _dataset

    ds = _dataset(grid.dataset, grid.data_root)
    return build_model(arch, ds.in_channels, ds.num_classes, ds.image_size, 0), ds.example_input()


def layer_rows(grid: Grid) -> list[dict]:
    """``layers.csv``: every prunable layer of each arch under each distribution of the grid's
    pruned rows, at the protocol's sparsity, by :func:`mcwt_ext.distribution.layer_counts` (the
    rule the rows' masks are made by): its size, its kept count and why it is kept whole, if it is."""
    from ..distribution import DENSE_REASONS, layer_counts
    from ..masks import layer_kind
    from .protocol import PROTOCOLS

    groups: dict[str, list[str]] = {}
    for method in grid.methods:
        if method != "dense":  # the unpruned network
            groups.setdefault(METHODS[method].distribution, []).append(method)
    rows = []
    for arch in grid.archs:
        model, x = _layer_model(grid, arch)
        labels = layer_labels(layer_kind(model, x))
        for distribution, methods in groups.items():
            for c in layer_counts(arch, model, x, PROTOCOLS[grid.protocol].sparsity, distribution):
                rows.append(dict(arch=arch, distribution=distribution, methods=";".join(methods),
                                 layer=labels[c.name], weight=c.name, shape="x".join(map(str, c.shape)),
                                 size=c.size, kept=c.kept, dense=DENSE_REASONS[c.dense] if c.dense else ""))
    return rows


def dense_layers_markdown(rows: list[dict]) -> str:
    """The table header's note on the layers each group of rows keeps whole (from :func:`layer_rows`)."""
    if not rows:
        return ""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["distribution"]), []).append(r)
    several = len({d for _, d in groups}) > 1
    lines = [f"Layers kept whole, by the rule each row's masks are made by (every layer's count in "
             f"`{GRID_FILES['layers_csv']}`; the unpruned network aside):"]
    for (arch, distribution), layers in groups.items():
        who = ("every other pruned row" if several else "every pruned row") if distribution == "uniform" else \
            ", ".join(METHODS[m].label for m in layers[0]["methods"].split(";"))
        dense = ", ".join(f"{r['layer']} `{r['weight']}` ({r['dense']})" for r in layers if r["dense"]) or "none"
        kept, size = sum(r["kept"] for r in layers), sum(r["size"] for r in layers)
        lines.append(f"- {arch}, {DISTRIBUTION_TITLES[distribution]} ({who}): dense layers: {dense}; "
                     f"{kept:,} of {size:,} weights kept")
    if "uniform-erk-dense" in {d for _, d in groups}:
        lines.append("\nAll of them keep the same total: random pruning under ERK minus ERK's control is ERK's "
                     "allocation alone; the control minus uniform random pruning is the dense layers alone "
                     "(with the weights they take from the other layers).")
    return "\n".join(lines)


def table_markdown(rows: list[dict], archs: list[str], header: str) -> str:
    """The layout of the paper's Table 1: one row per method, one column per architecture."""
    lines = [header, ""]
    index = {(r["metric"], r["method"], r["arch"]): r for r in rows}
    for metric, title in METRICS.items():
        paper = metric == "val_acc_early_stop"
        cols = [c for a in archs for c in (f"{a.capitalize()}" + (" (paper, CIFAR-10)" if paper else ""),
                                           f"{a.capitalize()}: paired diff. to WT, {LEVEL:.0%} CI")]
        lines += [f"### {title}", "", "| Method | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for method in dict.fromkeys(r["method"] for r in rows):
            m = METHODS[method]
            cells = []
            for arch in archs:
                r = index[(metric, method, arch)]
                text = "n/a" if not r["n"] else f"{r['mean']:.2f} ± {r['std']:.2f}"
                if paper:
                    text += " (n/a)" if r["paper"] is None else f" ({r['paper']:.2f})"
                cells += [text, "(reference)" if method == "wt" else _paired(r).markdown(p_adjusted=r["diff_p_holm"])]
            lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
        lines.append("")
    n = max((r["n"] for r in rows), default=0)
    tested = sum(1 for r in rows if r["method"] != "wt" and not math.isnan(r["diff_p"]))
    lines.append(f"Mean ± std over {n} seed(s), accuracy in %. Paper numbers: Grzeszczuk & "
                 f"Kurdziel, Table 1 (CIFAR-10, validation accuracy at early stop). {PAIRED_NOTE} "
                 f"{holm_note(tested)}".rstrip())
    return "\n".join(lines) + "\n"


def cost_rows(grid: Grid) -> list[dict]:
    """What each kind of mask costs to construct, per arch (means over seeds).

    IMP: every round but the last (which trains the finished ticket). MCWT: the fit
    (once per ticket) plus sampling, connectivity included; no training at all.
    """
    sampled = ("mcwt_magnitude", "mcwt_connectivity")
    rows = []
    for arch in grid.archs:
        imp_s, imp_it, fit_s, samp = [], [], [], {m: [] for m in sampled}
        for seed in grid.seeds:
            imp = grid_cell(grid.out, arch, seed, "imp")
            if imp.done():
                secs = [imp.round(r).load_json(RunDir.SUMMARY) for r in range(imp.ticket_round())]
                imp_s.append(sum(s["wall_time_s"] for s in secs))
                imp_it.append(sum(s["iterations"] for s in secs))
            fit = grid_cell(grid.out, arch, seed, "fit")
            if fit.done():
                fit_s.append(fit.load_json(RunDir.SUMMARY)["wall_time_s"])
            for method in sampled:
                rd = grid_cell(grid.out, arch, seed, METHODS[method].cell)
                if rd.exists(RunDir.SAMPLE):
                    samp[method].append(rd.load_json(RunDir.SAMPLE)["wall_time_s"])
        mean = lambda v: statistics.fmean(v) if v else math.nan  # noqa: E731
        imp_mean = mean(imp_s)
        rows.append(dict(arch=arch, method="IMP (all rounds before the ticket)", wall_time_s=imp_mean,
                         train_iterations=mean(imp_it), ratio_to_imp=1.0))
        for method in sampled:
            label, sample = METHODS[method].label, mean(samp[method])
            rows.append(dict(arch=arch, method=f"{label}: sampling", wall_time_s=sample,
                             train_iterations=0, ratio_to_imp=sample / imp_mean))
            rows.append(dict(arch=arch, method=f"{label}: fit + sampling",
                             wall_time_s=mean(fit_s) + sample, train_iterations=0,
                             ratio_to_imp=(mean(fit_s) + sample) / imp_mean))
    return rows


def method_masks(grid_out: Path, arch: str, seed: int, method: str) -> dict | None:
    """The masks behind a finished row (the WT's: the IMP ticket's); None for the dense net or
    while the row is unfinished."""
    rd = method_run(grid_out, arch, seed, method)
    if rd is None or method == "dense":  # IMP's round 0 stores all-True masks: no pruning to compare
        return None
    if method == "wt":
        rd = grid_cell(grid_out, arch, seed, "imp")
    if rd.exists(RunDir.FINAL_MASKS):  # dynamic sparse training: the masks it ended with
        return rd.load_tensors(RunDir.FINAL_MASKS)
    return rd.load_tensors(RunDir.MASKS) if rd.exists(RunDir.MASKS) else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


COMPARISON_FIELDS = ["arch", "method", "label", "group", "n", "val_acc_mean", "val_acc_std", "gap_to_wt",
                     "gap_low", "gap_high", "gap_n", "gap_covers_zero", "gap_p", "gap_p_holm", "gap_seeds",
                     "overlap_mean", "overlap_std", "dead_out_mean", "dead_out_std", "dead_in_mean",
                     "dead_in_std", "cost_s_mean", "cost_s_std", "cost_n"]
OVERLAP_FIELDS = ["arch", "method", "seed", "layer", "overlap", "density", "dead_out", "dead_in"]


def compare_methods(grid: Grid, metric: str = "val_acc_early_stop") -> tuple[list[dict], list[dict]]:
    """Every row of the grid against the winning ticket, per arch: accuracy (%, mean ± std over
    seeds), its paired difference to the WT (points, mean and interval over seeds, :mod:`.stats`),
    the share of the WT's kept weights its mask also keeps, the shares of dead output and input
    units (:func:`~mcwt_ext.compare.dead_units`; totals over layers, per layer in the second list)
    and what one mask cost to construct (seconds, :attr:`Method.cost`)."""
    rows, per_layer = [], []
    for arch in grid.archs:
        wt_masks = {seed: method_masks(grid.out, arch, seed, "wt") for seed in grid.seeds}
        wt_acc = _per_seed(grid, arch, "wt", metric)
        for method in grid.methods:
            m = METHODS[method]
            acc, overlap, dead_out, dead_in, cost = {}, [], [], [], []
            for seed in grid.seeds:
                summary = _summary(grid.out, arch, seed, method)
                if summary is None:
                    continue
                acc[seed] = 100 * summary[metric]
                masks, ticket = method_masks(grid.out, arch, seed, method), wt_masks[seed]
                if masks is not None:
                    outs, ins = total_dead(masks)
                    dead_out.append(outs)
                    dead_in.append(ins)
                if masks is not None and ticket is not None:
                    overlap.append(total_overlap(masks, ticket))
                    density, dead = densities(masks), dead_units(masks)
                    for layer, share in overlap_with_ticket(masks, ticket).items():
                        outs, ins = dead.get(layer, (0.0, 0.0))
                        per_layer.append(dict(arch=arch, method=method, seed=seed, layer=layer,
                                              overlap=share, density=density.get(layer, 1.0),
                                              dead_out=outs, dead_in=ins))
                if m.cost is not None:
                    c = m.cost(lambda cell, s=None, seed=seed: grid_cell(grid.out, arch, seed if s is None else s,
                                                                        cell), grid.seeds)
                    if c is not None:
                        cost.append(c)
            (am, asd), (om, osd), (cm, csd) = _mean_std(list(acc.values())), _mean_std(overlap), _mean_std(cost)
            (dom, dosd), (dim, disd) = _mean_std(dead_out), _mean_std(dead_in)
            gap = paired_difference(acc, wt_acc)
            rows.append(dict(arch=arch, method=method, label=m.label, group=m.group, n=len(acc),
                             val_acc_mean=am, val_acc_std=asd, gap_to_wt=gap.mean, gap_low=gap.low,
                             gap_high=gap.high, gap_n=gap.n, gap_covers_zero=gap.covers_zero, gap_p=gap.p,
                             gap_p_holm=math.nan, gap_seeds=_seeds_text(gap.diffs),
                             overlap_mean=om, overlap_std=osd, dead_out_mean=dom, dead_out_std=dosd,
                             dead_in_mean=dim, dead_in_std=disd, cost_s_mean=cm, cost_s_std=csd,
                             cost_n=len(cost)))
    _adjust(rows, "gap_p", "gap_p_holm")
    return rows, per_layer


def _fmt(mean: float, std: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["### Against the winning ticket", "",
             f"| Arch | Method | Val. acc. at early stop (%) | Gap to WT, paired (points, {LEVEL:.0%} CI) "
             "| Overlap with WT mask | Dead units (out / in) | Construction (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "(reference)" if r["method"] == "wt" else \
            Paired(r["gap_n"], r["gap_to_wt"], r["gap_low"], r["gap_high"], _seeds_of(r["gap_seeds"]),
                   r["gap_p"]).markdown(p_adjusted=r["gap_p_holm"])
        dead = "—" if math.isnan(r["dead_out_mean"]) else \
            f"{r['dead_out_mean']:.3f} / {r['dead_in_mean']:.3f}"
        lines.append(f"| {r['arch']} | {r['label']} | {_fmt(r['val_acc_mean'], r['val_acc_std'])} | {gap} | "
                     f"{_fmt(r['overlap_mean'], r['overlap_std'], 3)} | {dead} | "
                     f"{_fmt(r['cost_s_mean'], r['cost_s_std'], 1)} |")
    tested = sum(1 for r in rows if r["method"] != "wt" and not math.isnan(r["gap_p"]))
    lines += ["", f"{PAIRED_NOTE} {holm_note(tested)}".rstrip(), "",
              "Overlap: the share of the WT's kept weights that the row's mask also keeps, over all "
              "layers (a random mask at 80% sparsity overlaps about 0.2). Dead units: the share of "
              "output filters/units that keep no weight, and of input channels/units that no kept "
              "weight reads, over all layers (mean over seeds; per layer, with the overlap, in "
              f"`{GRID_FILES['overlap_csv']}`). Construction: seconds to make one mask on this "
              "machine (IMP: the rounds before the ticket; MCWT: fit + sampling; ablations: IMP + "
              "the ablation; transfer: seed 0's IMP and fit shared by the transfer seeds, plus "
              "sampling); the dense net has none."]
    return "\n".join(lines) + "\n"


def extra_cost_rows(comparison: list[dict], imp_rows: list[dict],
                    iterations: Mapping[str, int] | None = None) -> list[dict]:
    """Cost-table rows for the methods beyond the paper's (their numbers are the comparison's);
    ``iterations``: of one Table 1 training per arch (dynamic sparse training's rows train once)."""
    imp = {r["arch"]: r for r in imp_rows if r["ratio_to_imp"] == 1.0}
    out = []
    for r in comparison:
        if r["group"] == "paper":
            continue
        base = imp.get(r["arch"], {})
        iterations_ = {"ablation": base.get("train_iterations", math.nan),
                       "dst": (iterations or {}).get(r["arch"], math.nan)}.get(r["group"], 0)
        out.append(dict(arch=r["arch"], method=r["label"], wall_time_s=r["cost_s_mean"],
                        train_iterations=iterations_,
                        ratio_to_imp=r["cost_s_mean"] / base.get("wall_time_s", math.nan)))
    return out


def cost_figure(grid: Grid, comparison: list[dict]) -> list[Path]:
    """Accuracy against construction cost, one point per method (error bars over seeds), per arch."""
    from ..plots import accuracy_vs_cost

    out = []
    for arch in grid.archs:
        points = {r["label"]: dict(method=r["method"], cost_s=r["cost_s_mean"], cost_s_std=r["cost_s_std"],
                                   val_acc=r["val_acc_mean"], val_acc_std=r["val_acc_std"], n=r["n"])
                  for r in comparison if r["arch"] == arch and r["n"] and not math.isnan(r["cost_s_mean"])}
        if points:
            out.append(accuracy_vs_cost(points, grid.out / GRID_FILES["figures"] / arch / FIGURE_FILES["cost"],
                                        dataset=grid.dataset, arch=arch, seed=grid.seeds))
    return out


def dst_note(grid: Grid) -> str:
    """How often the grid's dynamic sparse training rows updated their masks, per arch ("" when
    it has none): the count and the interval, as RigL's paper states them."""
    from .methods import grid_dst_config

    if not grid.cells or not any(METHODS[m].group == "dst" for m in grid.methods):
        return ""
    settings, parts = grid.cells[0].settings, []
    for arch in grid.archs:
        iterations = settings.protocol.train_config(arch, 0, iterations=settings.iterations).iterations
        dst = grid_dst_config("rigl", iterations)
        steps = dst.update_steps(iterations)
        parts.append(f"{arch}: {len(steps)} mask updates in {iterations:,} steps, every {dst.update_every} "
                     f"from step 0 to {steps[-1]:,}")
    return ("\nDynamic sparse training rows (RigL's control flow: each RigL update replaces an optimiser step, "
            "the first at step 0 with drop fraction 0.3, cosine-annealed to 0 at 75% of the training; SET "
            "updates after steps 1, 1 + ΔT, ...): " + "; ".join(parts) + ".\n")


def cost_markdown(rows: list[dict], header: str = "") -> str:
    lines = ([header, ""] if header else []) + ["### Cost to construct one mask", "",
             "| Arch | Method | Wall time (s) | Training iterations | Share of IMP's time |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['method']} | {r['wall_time_s']:.1f} | "
                     f"{r['train_iterations']:.0f} | {r['ratio_to_imp']:.4f} |")
    lines += ["", "The fit is made once per winning ticket and serves any number of samples; "
                  "IMP's last round (training the finished ticket) is evaluation, not construction."]
    return "\n".join(lines) + "\n"


def figures(grid: Grid, seed: int | None = None, samples: int = 2000) -> list[Path]:
    """Fig. 1, Fig. 2b and the accuracy curves of each architecture (one seed)."""
    from ..data import load_dataset
    from ..plots import accuracy_curves, ticket_figures
    from ..runs import load_ticket

    seed = grid.seeds[0] if seed is None else seed
    ds = load_dataset(grid.dataset, grid.data_root)
    out = []
    for arch in grid.archs:
        cells = {m: grid_cell(grid.out, arch, seed, METHODS[m].cell)
                 for m in ("wt", "mcwt_connectivity", "random")}
        if not all(rd.done() for rd in cells.values()):
            continue
        ticket = load_ticket(cells["wt"].path)
        masks = {m: rd.load_tensors(RunDir.MASKS) for m, rd in cells.items()}
        fig_dir = grid.out / GRID_FILES["figures"] / arch
        about = dict(dataset=grid.dataset, arch=arch, seed=seed)
        out += ticket_figures(ticket.model, masks, ds.train.tensors[0], fig_dir, samples, **about)
        histories = {key: rd.load_csv(RunDir.METRICS) for key in grid.methods
                     if (rd := method_run(grid.out, arch, seed, key)) is not None}
        out.append(accuracy_curves(histories, fig_dir / FIGURE_FILES["curves"], **about))
    return out


def report(grid: Grid) -> dict[str, Path]:
    """Write table.md/csv, cost.md/csv and the figures; return their paths."""
    from .protocol import PROTOCOLS

    rows = collect(grid)
    proto = PROTOCOLS[grid.protocol]
    what = f"{grid.dataset}: {', '.join(grid.archs)}, seeds {grid.seeds}, {proto.name} protocol"
    protocol = f"Protocol: `{json.dumps(grid.settings())}`"
    paths = {k: grid.out / name for k, name in GRID_FILES.items()}
    comparison, overlaps = compare_methods(grid)
    layers = layer_rows(grid)
    dense = dense_layers_markdown(layers)
    atomic_write(paths["table_md"], table_markdown(rows, grid.archs, f"## Table 1 on {what}\n\n{protocol}"
                                                   + (f"\n\n{dense}" if dense else ""))
                 + "\n" + comparison_markdown(comparison) + dst_note(grid))
    write_table_csv(rows, paths["table_csv"])
    _save_csv(paths["per_seed_csv"], per_seed_rows(grid), PER_SEED_FIELDS)
    _save_csv(paths["methods_csv"], comparison, COMPARISON_FIELDS)
    _save_csv(paths["overlap_csv"], overlaps, OVERLAP_FIELDS)
    _save_csv(paths["layers_csv"], layers, LAYER_FIELDS)
    costs = cost_rows(grid)
    settings = grid.cells[0].settings if grid.cells else None
    costs += extra_cost_rows(comparison, costs, {a: settings.protocol.train_config(
        a, 0, iterations=settings.iterations).iterations for a in grid.archs} if settings else None)
    atomic_write(paths["cost_md"], cost_markdown(costs, f"## Cost on {what}\n\n{protocol}"))
    _save_csv(paths["cost_csv"], costs)
    figures(grid)
    cost_figure(grid, comparison)
    return paths
