"""Reproduce the paper's Table 1: a resumable grid of cells per architecture and seed.

Per (arch, seed), all from the same initial weights, every pruned net at the same
per-layer sparsity::

    imp                 IMP: round 0 is the dense net ("Unpruned network"), the last
                        round trains the winning ticket ("Original Winning Ticket")
    random              uniform random masks, exact per-layer count, trained
    fit                 the four logistic models fitted on the IMP ticket
    mcwt_magnitude      MCWT w/o connectivity: sampled from the fit, trained
    mcwt_connectivity   MCWT with connectivity: sampled greedily, trained

Layout: ``DIR/<arch>/seed_<s>/<cell>/`` (each a run directory), ``DIR/table.{md,csv}``,
``DIR/cost.{md,csv}``, ``DIR/figures/``. A cell is finished when its ``summary.json``
exists; a rerun skips finished cells and resumes the others (IMP at its round,
training at its checkpoint). ``jobs > 1`` runs independent cells in parallel processes.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import load_dataset
from .models import ARCHS, arch_spec, build_model
from .runs import RunDir, atomic_write

# Paper Table 1 (validation accuracy, %, CIFAR-10, 80% pruned per layer).
PAPER = {
    "dense": {"conv2": 67.20, "conv4": 74.62, "conv6": 77.40},
    "random": {"conv2": 66.90, "conv4": 73.20, "conv6": 73.14},
    "wt": {"conv2": 70.42, "conv4": 74.92, "conv6": 78.04},
    "mcwt_magnitude": {"conv2": 69.47, "conv4": 76.39, "conv6": 78.10},
    "mcwt_connectivity": {"conv2": 68.40, "conv4": 76.21, "conv6": 78.17},
}
METHODS = {
    "dense": "Unpruned network",
    "random": "Randomly pruned network",
    "wt": "Original Winning Ticket (IMP)",
    "mcwt_magnitude": "MCWT w/o connectivity",
    "mcwt_connectivity": "MCWT with connectivity",
}
METRICS = {
    "val_acc_early_stop": "Validation accuracy at early stop (min. validation loss)",
    "val_acc_final": "Validation accuracy at the end of training",
    "test_acc_early_stop": "Test accuracy at early stop",
}
CELLS = ("imp", "random", "fit", "mcwt_magnitude", "mcwt_connectivity")
DEPENDS = {"fit": ("imp",), "mcwt_magnitude": ("fit",), "mcwt_connectivity": ("fit",)}


@dataclass(frozen=True)
class Protocol:
    """What differs between the full F&C protocol and the reduced CPU one."""

    name: str
    iterations: dict[str, int] | None      # per arch; None: the architecture's protocol value
    rates: dict[str, float] | None         # IMP rates by layer kind; None: the protocol's
    eval_every: int
    connectivity_samples: int | None       # inputs connectivity is measured on; None: all
    sparsity: float = 0.8

    def describe(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS = {
    # Frankle & Carbin App. H: 20K/25K/30K iterations, rates conv 10% (15% conv6),
    # linear 20%, output 10%, connectivity over all 45,000 training images.
    "full": Protocol("full", None, None, eval_every=100, connectivity_samples=None),
    # For 2-core CPUs: a twentieth of the iterations (1,000 for conv2: 1.3 epochs of
    # CIFAR-10), IMP reaching 80% in two rounds (60% of the remaining weights per round,
    # the last round landing on the target), evaluations (validation + test, 15,000
    # CIFAR images) every 200 iterations, connectivity on 10,000 training images.
    "reduced": Protocol("reduced", {a: ARCHS[a].iterations // 20 for a in ARCHS},
                        {"conv": 0.6, "linear": 0.6, "output": 0.6}, eval_every=200,
                        connectivity_samples=10_000),
}


@dataclass(frozen=True)
class Cell:
    """One unit of work of the grid; picklable, so it can run in a worker process."""

    kind: str
    arch: str
    seed: int
    dataset: str
    data_root: str | None
    protocol: Protocol
    root: str
    iterations: int | None = None   # overrides the protocol's
    eval_every: int | None = None   # overrides the protocol's
    device: str = "cpu"
    threads: int = 0
    progress: bool = False          # training progress bars (only with one job: bars would interleave)

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.arch, self.seed, self.kind)

    def dir(self, kind: str | None = None) -> RunDir:
        return RunDir(Path(self.root) / self.arch / f"seed_{self.seed}" / (kind or self.kind))

    def done(self) -> bool:
        return self.dir().exists(RunDir.SUMMARY)


# --- the cells ---------------------------------------------------------------------------------

def _context(cell: Cell):
    from .imp import ImpConfig
    from .train import TrainConfig

    if cell.threads:
        torch.set_num_threads(cell.threads)
    ds = load_dataset(cell.dataset, cell.data_root)
    model = build_model(cell.arch, ds.in_channels, ds.num_classes, ds.image_size, cell.seed)
    iterations = cell.iterations or (cell.protocol.iterations or {}).get(cell.arch)
    train_cfg = TrainConfig.for_arch(cell.arch, iterations=iterations, seed=cell.seed,
                                     eval_every=cell.eval_every or cell.protocol.eval_every,
                                     device=cell.device)
    imp_cfg = ImpConfig.for_arch(cell.arch, train=train_cfg, rates=cell.protocol.rates or {},
                                 sparsity=cell.protocol.sparsity)
    config = dict(command=f"reproduce:{cell.kind}", arch=cell.arch, dataset=cell.dataset,
                  data_root=cell.data_root, split_seed=0, val_size=None,
                  in_channels=ds.in_channels, image_size=ds.image_size,
                  num_classes=ds.num_classes, seed=cell.seed, protocol=cell.protocol.describe(),
                  train=dataclasses.asdict(train_cfg))
    return ds, model, train_cfg, imp_cfg, config


def _desc(cell: Cell) -> str:
    return f"{cell.arch} seed {cell.seed} {cell.kind}"


def _run_imp(cell: Cell) -> None:
    from .imp import run_imp

    ds, model, _, imp_cfg, config = _context(cell)
    rd = cell.dir()
    rd.save_json(RunDir.CONFIG, config)
    run_imp(model, ds, imp_cfg, rd, progress=cell.progress)


def _run_random(cell: Cell) -> None:
    from .masks import random_masks
    from .train import train

    ds, model, train_cfg, _, config = _context(cell)
    rd = cell.dir()
    rd.save_json(RunDir.CONFIG, config)
    masks = random_masks(model, cell.protocol.sparsity, cell.seed)
    rd.save_tensors(RunDir.INIT, model.state_dict())
    rd.save_tensors(RunDir.MASKS, masks)
    train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


def _run_fit(cell: Cell) -> None:
    from .fit import fit_ticket

    ds, model, _, _, config = _context(cell)
    ticket = cell.dir("imp")
    model.load_state_dict(ticket.load_tensors(RunDir.INIT))
    start = time.perf_counter()
    fit = fit_ticket(model, ticket.load_tensors(RunDir.MASKS), ds.train.tensors[0],
                     max_samples=cell.protocol.connectivity_samples, seed=cell.seed)
    fit.source = dict(ticket=str(ticket.path), arch=cell.arch, dataset=cell.dataset)
    wall = time.perf_counter() - start
    rd = cell.dir()
    fit.save(rd.file("fit.json"))
    rd.save_json(RunDir.SUMMARY, dict(wall_time_s=wall, models=fit.to_json()["models"]))


def _run_mcwt(cell: Cell) -> None:
    from .sample import sample_record, sample_ticket
    from .train import train

    ds, model, train_cfg, _, config = _context(cell)
    rd = cell.dir()
    connectivity = cell.kind == "mcwt_connectivity"
    rd.save_json(RunDir.CONFIG, dict(config, connectivity=connectivity))
    if rd.exists(RunDir.MASKS):  # sampled before a kill: train what was sampled
        masks = rd.load_tensors(RunDir.MASKS)
    else:
        start = time.perf_counter()
        masks, draws = sample_ticket(model, cell.dir("fit").file("fit.json"), ds.train.tensors[0],
                                     sparsity=cell.protocol.sparsity, connectivity=connectivity,
                                     seed=cell.seed, max_samples=cell.protocol.connectivity_samples,
                                     progress=cell.progress)
        wall = time.perf_counter() - start
        rd.save_json("sample.json", sample_record(draws, wall))
        rd.save_tensors(RunDir.INIT, model.state_dict())
        rd.save_tensors(RunDir.MASKS, masks)
    train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


RUNNERS = {"imp": _run_imp, "random": _run_random, "fit": _run_fit,
           "mcwt_magnitude": _run_mcwt, "mcwt_connectivity": _run_mcwt}


def run_cell(cell: Cell) -> tuple:
    RUNNERS[cell.kind](cell)
    return cell.key


# --- the grid ----------------------------------------------------------------------------------

@dataclass
class Grid:
    archs: list[str]
    seeds: list[int]
    dataset: str
    out: Path
    data_root: str | None = None
    protocol: str = "reduced"
    jobs: int = 1
    iterations: int | None = None
    eval_every: int | None = None
    device: str = "cpu"
    progress: bool = True
    cells: list[Cell] = field(init=False)

    def __post_init__(self):
        for arch in self.archs:
            arch_spec(arch)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs: must be a positive int, got {self.jobs!r}")
        threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0
        self.out = Path(self.out)
        self.cells = [Cell(kind, arch, seed, self.dataset, self.data_root, PROTOCOLS[self.protocol],
                           str(self.out), self.iterations, self.eval_every, self.device, threads,
                           self.progress and self.jobs == 1)
                      for arch in self.archs for seed in self.seeds for kind in CELLS]

    def settings(self) -> dict:
        return dict(dataset=self.dataset, protocol=PROTOCOLS[self.protocol].describe(),
                    iterations_override=self.iterations, eval_every_override=self.eval_every)

    def check_out(self) -> None:
        """Refuse to mix a grid into a directory made under other settings."""
        rd = RunDir(self.out)
        if rd.exists(RunDir.CONFIG):
            stored = rd.load_json(RunDir.CONFIG)
            if stored.get("settings") != self.settings():
                raise ValueError(f"out: {self.out} holds a grid made under other settings "
                                 f"({stored.get('settings')}); pick a new --out")
        rd.save_json(RunDir.CONFIG, dict(settings=self.settings(), archs=self.archs,
                                         seeds=self.seeds, data_root=self.data_root))

    def run(self) -> None:
        """Run every unfinished cell, each after the cells it depends on."""
        from tqdm.auto import tqdm

        self.check_out()
        pending = {c.key: c for c in self.cells if not c.done()}
        finished = {c.key for c in self.cells if c.done()}
        bar = tqdm(total=len(self.cells), initial=len(finished), desc="reproduce", unit="cell",
                   disable=not (self.progress and sys.stderr.isatty()))

        def ready():
            return [c for c in pending.values()
                    if all((c.arch, c.seed, d) in finished for d in DEPENDS.get(c.kind, ()))]

        def finish(key):
            pending.pop(key)
            finished.add(key)
            bar.set_postfix_str("/".join(map(str, key)))
            bar.update(1)

        try:
            if self.jobs == 1:
                while pending:
                    cell = ready()[0]
                    finish(run_cell(cell))
                return
            with cf.ProcessPoolExecutor(self.jobs) as pool:
                running: dict[cf.Future, tuple] = {}
                while pending:
                    for cell in ready():
                        if cell.key not in running.values():
                            running[pool.submit(run_cell, cell)] = cell.key
                    done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        running.pop(fut)
                        finish(fut.result())
        finally:
            bar.close()


# --- results -----------------------------------------------------------------------------------

def method_run(grid_out: Path, arch: str, seed: int, method: str) -> RunDir | None:
    """The finished training run behind a Table 1 row, or None while it is missing.

    "dense" is IMP's round 0 (the same init, seed and protocol) and "wt" its last round.
    """
    base = RunDir(grid_out / arch / f"seed_{seed}")
    if method in ("dense", "wt"):
        imp = base.subdir("imp")
        if not imp.exists(RunDir.SUMMARY):
            return None
        last = imp.load_json(RunDir.SUMMARY)["rounds"][-1]["round"]
        return imp.subdir(f"round_{0 if method == 'dense' else last:02d}")
    rd = base.subdir(method)
    return rd if rd.exists(RunDir.SUMMARY) else None


def _summary(grid_out: Path, arch: str, seed: int, method: str) -> dict | None:
    rd = method_run(grid_out, arch, seed, method)
    return None if rd is None else rd.load_json(RunDir.SUMMARY)


def collect(grid: Grid) -> list[dict]:
    """One row per (metric, method, arch): mean and std (in %) over seeds, the paper's number."""
    rows = []
    for metric in METRICS:
        for method in METHODS:
            for arch in grid.archs:
                vals = [100 * s[metric] for seed in grid.seeds
                        if (s := _summary(grid.out, arch, seed, method)) is not None]
                rows.append(dict(
                    metric=metric, method=method, arch=arch, n=len(vals),
                    mean=statistics.fmean(vals) if vals else math.nan,
                    std=statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else math.nan,
                    paper=PAPER[method][arch] if metric == "val_acc_early_stop" else None))
    return rows


def write_table_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["metric", "method", "arch", "n", "mean", "std", "paper"],
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "mean": f"{r['mean']:.4f}", "std": f"{r['std']:.4f}",
                         "paper": "" if r["paper"] is None else f"{r['paper']:.2f}"})
    atomic_write(path, buf.getvalue())


def read_table_csv(path: Path) -> list[dict]:
    """Parse ``table.csv`` back into the rows :func:`collect` made (to 4 decimals)."""
    with open(path, newline="") as f:
        return [dict(metric=r["metric"], method=r["method"], arch=r["arch"], n=int(r["n"]),
                     mean=float(r["mean"]), std=float(r["std"]),
                     paper=float(r["paper"]) if r["paper"] else None) for r in csv.DictReader(f)]


def table_markdown(rows: list[dict], archs: list[str], header: str) -> str:
    """The layout of the paper's Table 1: one row per method, one column per architecture."""
    lines = [header, ""]
    index = {(r["metric"], r["method"], r["arch"]): r for r in rows}
    for metric, title in METRICS.items():
        paper = metric == "val_acc_early_stop"
        cols = [f"{a.capitalize()}" + (" (paper, CIFAR-10)" if paper else "") for a in archs]
        lines += [f"### {title}", "", "| Method | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(archs)]
        for method, label in METHODS.items():
            cells = []
            for arch in archs:
                r = index[(metric, method, arch)]
                text = "n/a" if not r["n"] else f"{r['mean']:.2f} ± {r['std']:.2f}"
                if paper:
                    text += f" ({r['paper']:.2f})"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    n = max((r["n"] for r in rows), default=0)
    lines.append(f"Mean ± std over {n} seed(s), accuracy in %. Paper numbers: Grzeszczuk & "
                 f"Kurdziel, Table 1 (CIFAR-10, validation accuracy at early stop).")
    return "\n".join(lines) + "\n"


def cost_rows(grid: Grid) -> list[dict]:
    """What each kind of mask costs to construct, per arch (means over seeds).

    IMP: every round but the last (which trains the finished ticket). MCWT: the fit
    (once per ticket) plus sampling, connectivity included; no training at all.
    """
    rows = []
    for arch in grid.archs:
        imp_s, imp_it, fit_s, samp = [], [], [], {"mcwt_magnitude": [], "mcwt_connectivity": []}
        for seed in grid.seeds:
            base = grid.out / arch / f"seed_{seed}"
            imp = RunDir(base / "imp")
            if imp.exists(RunDir.SUMMARY):
                rounds = imp.load_json(RunDir.SUMMARY)["rounds"]
                secs = [RunDir(base / "imp" / f"round_{r['round']:02d}").load_json(RunDir.SUMMARY)
                        for r in rounds[:-1]]
                imp_s.append(sum(s["wall_time_s"] for s in secs))
                imp_it.append(sum(s["iterations"] for s in secs))
            fit = RunDir(base / "fit")
            if fit.exists(RunDir.SUMMARY):
                fit_s.append(fit.load_json(RunDir.SUMMARY)["wall_time_s"])
            for method in samp:
                rd = RunDir(base / method)
                if rd.exists("sample.json"):
                    samp[method].append(rd.load_json("sample.json")["wall_time_s"])
        mean = lambda v: statistics.fmean(v) if v else math.nan  # noqa: E731
        imp_mean = mean(imp_s)
        rows.append(dict(arch=arch, method="IMP (all rounds before the ticket)", wall_time_s=imp_mean,
                         train_iterations=mean(imp_it), ratio_to_imp=1.0))
        for method, label in (("mcwt_magnitude", "MCWT w/o connectivity"),
                              ("mcwt_connectivity", "MCWT with connectivity")):
            sample = mean(samp[method])
            rows.append(dict(arch=arch, method=f"{label}: sampling", wall_time_s=sample,
                             train_iterations=0, ratio_to_imp=sample / imp_mean))
            rows.append(dict(arch=arch, method=f"{label}: fit + sampling",
                             wall_time_s=mean(fit_s) + sample, train_iterations=0,
                             ratio_to_imp=(mean(fit_s) + sample) / imp_mean))
    return rows


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


def _rows_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def figures(grid: Grid, seed: int | None = None, samples: int = 2000) -> list[Path]:
    """Fig. 1, Fig. 2b and the accuracy curves of each architecture (one seed)."""
    from .plots import accuracy_curves, ticket_figures

    seed = grid.seeds[0] if seed is None else seed
    ds = load_dataset(grid.dataset, grid.data_root)
    out = []
    for arch in grid.archs:
        base = RunDir(grid.out / arch / f"seed_{seed}")
        runs = {"WT": base.subdir("imp"), "MCWT": base.subdir("mcwt_connectivity"),
                "random": base.subdir("random")}
        if not all(rd.exists(RunDir.SUMMARY) for rd in runs.values()):
            continue
        model = build_model(arch, ds.in_channels, ds.num_classes, ds.image_size, seed)
        model.load_state_dict(runs["WT"].load_tensors(RunDir.INIT))
        fig_dir = grid.out / "figures" / arch
        masks = {m: rd.load_tensors(RunDir.MASKS) for m, rd in runs.items()}
        out += ticket_figures(model, masks, ds.train.tensors[0], fig_dir, samples)
        histories = {label: method_run(grid.out, arch, seed, method).load_csv(RunDir.METRICS)
                     for method, label in METHODS.items()}
        out.append(accuracy_curves(histories, fig_dir / "val_accuracy.png",
                                   f"{arch} on {grid.dataset} (seed {seed})"))
    return out


def report(grid: Grid) -> dict[str, Path]:
    """Write table.md/csv, cost.md/csv and the figures; return their paths."""
    rows = collect(grid)
    proto = PROTOCOLS[grid.protocol]
    what = f"{grid.dataset}: {', '.join(grid.archs)}, seeds {grid.seeds}, {proto.name} protocol"
    protocol = f"Protocol: `{json.dumps(grid.settings())}`"
    paths = {"table_md": grid.out / "table.md", "table_csv": grid.out / "table.csv",
             "cost_md": grid.out / "cost.md", "cost_csv": grid.out / "cost.csv"}
    atomic_write(paths["table_md"], table_markdown(rows, grid.archs, f"## Table 1 on {what}\n\n{protocol}"))
    write_table_csv(rows, paths["table_csv"])
    costs = cost_rows(grid)
    atomic_write(paths["cost_md"], cost_markdown(costs, f"## Cost on {what}\n\n{protocol}"))
    _rows_csv(costs, paths["cost_csv"])
    paths["figures"] = grid.out / "figures"
    figures(grid)
    return paths
