"""What each ``mcwt`` command does, given its parsed arguments (cli.py parses, this module runs).

Every command first builds and checks everything it needs (data, model, masks, settings), and
only then opens its run directory (:meth:`RunDir.open`: a new run, or the same one resumed), so a
bad input never leaves a half-made run behind.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from . import masks as masks_lib
from .data import DATASETS, Dataset, load_dataset
from .imp import ImpConfig, run_imp
from .models import build_model
from .runs import RunDir, load_masks, load_ticket, load_weights
from .train import TrainConfig, train

__all__ = ["train_cmd", "imp_cmd", "random_cmd", "prune_cmd", "ablate_cmd", "fit_cmd", "sample_cmd",
           "plot_cmd", "reproduce_cmd",
           "load_data", "train_config", "run_config"]


# --- what the commands share ---------------------------------------------------------------------

def _check_data_root(dataset: str, data_root: Path | None) -> None:
    if DATASETS[dataset].needs_root and data_root is None:
        raise ValueError(f"--dataset {dataset} needs --data-root DIR (the folder holding "
                         f"cifar-10-batches-py/)")


def load_data(args) -> Dataset:
    _check_data_root(args.dataset, args.data_root)
    return load_dataset(args.dataset, args.data_root, split_seed=args.split_seed,
                        val_size=args.val_size, download=args.download)


def train_config(args) -> TrainConfig:
    """The TrainConfig of the parsed training flags (unset ones: the architecture's protocol)."""
    return TrainConfig.for_arch(args.arch, **{f.name: getattr(args, f.name)
                                              for f in dataclasses.fields(TrainConfig)})


def data_and_model(args, init: Path | None = None) -> tuple[Dataset, torch.nn.Module]:
    """The dataset and the model: a fresh init from --seed, or the weights of ``init``."""
    ds = load_data(args)
    model = build_model(args.arch, ds.in_channels, ds.num_classes, ds.image_size, args.seed)
    if init is not None:
        load_weights(model, init)
    return ds, model


def run_config(args, ds: Dataset, **extra) -> dict:
    """``config.json``: enough to rebuild the model (``build_model_from_config``) and the data."""
    return dict(command=args.command, arch=args.arch, dataset=args.dataset,
                data_root=str(args.data_root.resolve()) if args.data_root else None,
                split_seed=args.split_seed, val_size=args.val_size, in_channels=ds.in_channels,
                image_size=ds.image_size, num_classes=ds.num_classes, seed=args.seed, **extra)


def _resolved(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None


def save_starts(rd: RunDir, model: torch.nn.Module, masks: dict | None) -> None:
    """The initial weights and (if any) the masks a run trains from, saved or checked."""
    rd.save_or_check_tensors(RunDir.INIT, model.state_dict(), "initial weights")
    if masks is not None:
        rd.save_or_check_tensors(RunDir.MASKS, masks, "masks")


def _print_summary(summary: dict) -> None:
    keys = ("val_acc_early_stop", "test_acc_early_stop", "early_stop_iteration", "val_acc_final",
            "test_acc_final")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


def _train_and_report(args, ds: Dataset, model, masks, cfg: TrainConfig, rd: RunDir, what: str) -> int:
    result = train(model, ds, masks, cfg, rd, progress=not args.no_progress, desc=f"{what} {args.arch}")
    _print_summary(result.summary)
    return 0


def _ticket_data(ticket, data_root: Path | None) -> Dataset:
    """The dataset a ticket was trained on (``data_root`` overrides where it lives)."""
    config = ticket.config
    root = data_root or (Path(config["data_root"]) if config.get("data_root") else None)
    return load_dataset(config["dataset"], root, split_seed=config.get("split_seed", 0),
                        val_size=config.get("val_size"))


# --- the commands --------------------------------------------------------------------------------

def train_cmd(args) -> int:
    init = args.init
    if init is None and args.masks and (args.masks.parent / RunDir.INIT).is_file():
        init = args.masks.parent / RunDir.INIT
    ds, model = data_and_model(args, init)
    masks = load_masks(args.masks) if args.masks else None
    if masks is not None:
        masks_lib.check_masks(model, masks)
    cfg = train_config(args)
    rd = RunDir.open(args.out, run_config(args, ds, masks=_resolved(args.masks), init=_resolved(init),
                                          train=dataclasses.asdict(cfg)))
    save_starts(rd, model, masks)
    return _train_and_report(args, ds, model, masks, cfg, rd, "train")


def imp_cmd(args) -> int:
    ds, model = data_and_model(args)
    cfg = ImpConfig.for_arch(args.arch, train=train_config(args), rates=args.rates,
                             sparsity=args.sparsity, rewind_iteration=args.rewind_iteration,
                             max_rounds=args.max_rounds)
    rd = RunDir.open(args.out, run_config(args, ds, train=dataclasses.asdict(cfg.train),
                                          imp=dict(rates=cfg.rates, sparsity=cfg.sparsity,
                                                   rewind_iteration=cfg.rewind_iteration)))
    run_imp(model, ds, cfg, rd, progress=not args.no_progress)
    summary = rd.load_json(RunDir.SUMMARY)
    if not summary["reached_target"]:
        print(f"warning: stopped after --max-rounds {args.max_rounds} short of --sparsity "
              f"{args.sparsity}", file=sys.stderr)
    _print_summary(summary["ticket"])
    return 0


def random_cmd(args) -> int:
    ds, model = data_and_model(args, args.init)
    if args.like is not None:
        like = load_masks(args.like)
        masks_lib.check_masks(model, like)
        sparsity = {k: 1.0 - d for k, d in masks_lib.densities(like).items()}
    else:
        sparsity = args.sparsity
    mask_seed = args.seed if args.mask_seed is None else args.mask_seed
    masks = masks_lib.random_masks(model, sparsity, mask_seed)
    cfg = train_config(args)
    rd = RunDir.open(args.out, run_config(args, ds, sparsity=sparsity, mask_seed=mask_seed,
                                          init=_resolved(args.init),
                                          train=None if args.no_train else dataclasses.asdict(cfg)))
    save_starts(rd, model, masks)
    if args.no_train:
        print(f"wrote {rd.masks_path} and {rd.init_path}")
        return 0
    return _train_and_report(args, ds, model, masks, cfg, rd, "random")


def _save_construction(rd: RunDir, wall: float) -> None:
    """The first construction's wall time (a resumed run re-makes the same masks; keep the first)."""
    if not rd.exists(RunDir.CONSTRUCTION):
        rd.save_json(RunDir.CONSTRUCTION, dict(wall_time_s=wall))


def prune_cmd(args) -> int:
    from .prune_at_init import prune_at_init

    ds, model = data_and_model(args)
    cfg = train_config(args)
    start = time.perf_counter()
    masks = prune_at_init(model, args.method, ds.train.tensors, args.sparsity, seed=args.seed,
                          allocation=args.allocation, progress=not args.no_progress and sys.stderr.isatty())
    wall = time.perf_counter() - start
    rd = RunDir.open(args.out, run_config(args, ds, prune_method=args.method, sparsity=args.sparsity,
                                          allocation=args.allocation,
                                          train=None if args.no_train else dataclasses.asdict(cfg)))
    save_starts(rd, model, masks)
    _save_construction(rd, wall)
    print(f"{args.method}: masks in {wall:.1f} s")
    if args.no_train:
        print(f"wrote {rd.masks_path} and {rd.init_path}")
        return 0
    return _train_and_report(args, ds, model, masks, cfg, rd, f"prune {args.method}")


def ablate_cmd(args) -> int:
    from .ablate import ablate
    from .experiments.methods import ablation_seed
    from .models import build_model

    ticket = load_ticket(args.ticket)
    config = ticket.config
    ds = _ticket_data(ticket, args.data_root)
    args.arch = config["arch"]  # train_config reads the protocol of the ticket's arch
    seed = ablation_seed(args.kind, config["seed"]) if args.ablation_seed is None else args.ablation_seed
    build = (lambda s: build_model(config["arch"], ds.in_channels, ds.num_classes, ds.image_size, s)) \
        if args.kind == "reinit" else None
    start = time.perf_counter()
    init, masks = ablate(ticket.model, ticket.masks, args.kind, seed, build=build)
    wall = time.perf_counter() - start
    ticket.model.load_state_dict(init)
    args.seed = config["seed"]  # trains with the ticket's batch order
    cfg = train_config(args)
    keys = ("arch", "dataset", "split_seed", "val_size", "in_channels", "image_size", "num_classes", "seed")
    identity = dict({k: config.get(k) for k in keys}, command=args.command,
                    data_root=_resolved(args.data_root) or config.get("data_root"),
                    ticket=str(args.ticket.resolve()), kind=args.kind, ablation_seed=seed,
                    train=dataclasses.asdict(cfg))
    rd = RunDir.open(args.out, identity)
    save_starts(rd, ticket.model, masks)
    _save_construction(rd, wall)
    return _train_and_report(args, ds, ticket.model, masks, cfg, rd, f"ablate {args.kind}")


def fit_cmd(args) -> int:
    from .fit import fit_ticket

    ticket = load_ticket(args.ticket)
    ds = _ticket_data(ticket, args.data_root)
    fit = fit_ticket(ticket.model, ticket.masks, ds.train.tensors[0], max_samples=args.max_samples,
                     max_weights_per_layer=args.max_weights, seed=ticket.config["seed"],
                     device=args.device, granularity=args.granularity)
    fit.source = dict(ticket=str(args.ticket.resolve()), arch=ticket.config["arch"],
                      dataset=ticket.config["dataset"])
    fit.save(args.out)
    print(json.dumps(fit.to_json()["models"], indent=2))
    print(f"wrote {args.out}")
    return 0


def sample_cmd(args) -> int:
    from .fit import load_fit
    from .sample import sample_record, sample_ticket

    fit = load_fit(args.fit)
    ds, model = data_and_model(args, args.init)
    model.to(args.device)
    rd = RunDir.open(args.out, run_config(args, ds, fit=str(args.fit.resolve()), sparsity=args.sparsity,
                                          use_connectivity=args.use_connectivity, exact=args.exact,
                                          max_samples=args.max_samples))
    start = time.perf_counter()
    masks, draws = sample_ticket(model, fit, ds.train.tensors[0], sparsity=args.sparsity,
                                 use_connectivity=args.use_connectivity, exact=args.exact,
                                 seed=args.seed, max_samples=args.max_samples,
                                 progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    save_starts(rd, model, masks)
    record = sample_record(draws, wall)
    rd.save_json(RunDir.SAMPLE, record)
    for d in record["layers"]:
        print(f"{d['name']:>14}  {d['kind']:<6}  density {d['density']:.4f} "
              f"(target {d['target_density']:.4f})  bias " +
              ("dense" if d["bias"] is None else f"{d['bias']:+.3f}"))
    print(f"wrote {rd.masks_path} in {wall:.1f} s")
    return 0


def plot_cmd(args) -> int:
    from .plots import ticket_figures

    ticket = load_ticket(args.ticket)
    ds = _ticket_data(ticket, args.data_root)
    sample = RunDir(args.mcwt)
    mcwt = load_masks(sample.masks_path)
    variant = "mcwt_connectivity" if not sample.exists(RunDir.CONFIG) or \
        sample.load_json(RunDir.CONFIG).get("use_connectivity", True) else "mcwt_magnitude"
    if args.random is not None:
        rnd = load_masks(RunDir(args.random).masks_path)
    else:  # the same per-layer sparsity as the sample
        rnd = masks_lib.random_masks(ticket.model, {k: 1.0 - d for k, d in masks_lib.densities(mcwt).items()},
                                     ticket.config["seed"])
    masks = {"wt": ticket.masks, variant: mcwt, "random": rnd}
    for m in masks.values():
        masks_lib.check_masks(ticket.model, m)
    for path in ticket_figures(ticket.model, masks, ds.train.tensors[0], args.out, args.max_samples):
        print(f"wrote {path} (numbers: {path.with_suffix('.json')})")
    return 0


def reproduce_cmd(args) -> int:
    from .experiments import Grid, report

    _check_data_root(args.dataset, args.data_root)
    if DATASETS[args.dataset].needs_root:
        load_dataset(args.dataset, args.data_root)  # fail now, not in a worker, on missing or bad files
    grid = Grid(archs=args.arch, seeds=list(range(args.seeds)), dataset=args.dataset, out=args.out,
                data_root=_resolved(args.data_root), protocol=args.protocol, jobs=args.jobs,
                iterations=args.iterations, eval_every=args.eval_every, device=args.device,
                progress=not args.no_progress, methods=args.methods)
    grid.run()
    paths = report(grid)
    print(paths["table_md"].read_text())
    print(paths["cost_md"].read_text())
    for name, path in paths.items():
        print(f"{name:>10}: {path}")
    return 0
