"""The ``mcwt`` command line: one ``add_<cmd>_parser`` / ``cmd_<cmd>`` pair per subcommand.

Every command writes into a run directory (``--out``); rerunning the same command on it resumes
where it stopped. Bad arguments end with one ``mcwt <cmd>: error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from . import masks as masks_lib
from .data import DATASETS, Dataset, load_dataset
from .imp import KINDS, ImpConfig, run_imp
from .models import ARCHS, build_model, build_model_from_config
from .runs import RunDir, load_tensors
from .train import TrainConfig, train

__all__ = ["main", "build_parser", "add_model_data_args", "add_train_args"]


class ArgumentParser(argparse.ArgumentParser):
    """Errors as one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types: each raises ArgumentTypeError, which argparse turns into one error line ---

def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


positive_int, nonnegative_int = _int_at_least(1), _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1): a sparsity or a prune rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def rates_spec(text: str) -> dict[str, float]:
    """``conv=0.1,linear=0.2,output=0.1`` (any subset of the kinds)."""
    rates = {}
    for item in text.split(","):
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{item!r} is not KIND=RATE with KIND one of {', '.join(KINDS)}")
        rates[kind] = fraction(value)
    return rates


def device_spec(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible")
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


# --- shared flags ------------------------------------------------------------------------------

def add_model_data_args(p: argparse.ArgumentParser) -> None:
    """--arch, --dataset and its split, --seed: what every command needs to rebuild a model."""
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", choices=sorted(ARCHS), required=True, help="architecture (Frankle & Carbin)")
    g.add_argument("--dataset", choices=DATASETS, required=True,
                   help="cifar10 (needs --data-root), digits (sklearn, 1x8x8, offline) or synthetic (tiny)")
    g.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data-root through torchvision if it is absent")
    g.add_argument("--split-seed", type=nonnegative_int, default=0,
                   help="seed of the train/validation split (default 0)")
    g.add_argument("--val-size", type=positive_int,
                   help="validation images held out of the training set (default: a tenth, 5,000 for CIFAR-10)")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the initial weights and of the batch order (default 0)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training protocol's knobs; unset ones take the architecture's protocol value."""
    g = p.add_argument_group("training (defaults: the protocol for --arch)")
    g.add_argument("--iterations", type=positive_int,
                   help="training iterations (default 20000 / 25000 / 30000 for conv2 / conv4 / conv6)")
    g.add_argument("--batch-size", type=positive_int, help="batch size (default 60)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate (default 2e-4 conv2, 3e-4 conv4/conv6)")
    g.add_argument("--eval-every", type=positive_int, help="iterations between evaluations (default 100)")
    g.add_argument("--checkpoint-every", type=nonnegative_int,
                   help="iterations between checkpoints, 0 for none (default 1000)")
    g.add_argument("--device", type=device_spec, help="torch device, e.g. cpu or cuda:0 (default cpu)")
    g.add_argument("--num-workers", type=nonnegative_int,
                   help="DataLoader worker processes assembling batches (default 0: in the main process)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when "
                                                              "stderr is not a terminal)")


def add_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True,
                   help="run directory; rerunning the same command on it resumes the run")


def load_data(args) -> Dataset:
    if args.dataset == "cifar10" and args.data_root is None:
        raise ValueError("--dataset cifar10 needs --data-root DIR (the folder holding cifar-10-batches-py/)")
    return load_dataset(args.dataset, args.data_root, split_seed=args.split_seed,
                        val_size=args.val_size, download=args.download)


def train_config(args) -> TrainConfig:
    return TrainConfig.for_arch(args.arch, iterations=args.iterations, batch_size=args.batch_size,
                                lr=args.lr, eval_every=args.eval_every,
                                checkpoint_every=args.checkpoint_every, seed=args.seed,
                                device=args.device, num_workers=args.num_workers)


def fresh_model(args, ds: Dataset) -> torch.nn.Module:
    return build_model(args.arch, ds.in_channels, ds.num_classes, ds.image_size, args.seed)


def run_config(args, ds: Dataset, **extra) -> dict:
    """``config.json``: enough to rebuild the model (``build_model_from_config``) and the data."""
    return dict(command=args.command, arch=args.arch, dataset=args.dataset,
                data_root=str(args.data_root.resolve()) if args.data_root else None,
                split_seed=args.split_seed, val_size=args.val_size, in_channels=ds.in_channels,
                image_size=ds.image_size, num_classes=ds.num_classes, seed=args.seed, **extra)


def _comparable(config: dict) -> dict:
    """config.json without what may change between a run and its resumption."""
    config = {k: v for k, v in config.items() if k != "data_root"}
    if isinstance(config.get("train"), dict):
        config["train"] = {k: v for k, v in config["train"].items() if k not in ("device", "num_workers")}
    return config


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def open_run(out: Path, config: dict) -> RunDir:
    """The run directory ``out``, with ``config`` written, or checked against a resumed run's."""
    rd = RunDir(out)
    if rd.exists(RunDir.CONFIG):
        stored = rd.load_json(RunDir.CONFIG)
        a, b = _flat(_comparable(stored)), _flat(_comparable(config))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"--out {out} holds another run (differs in {', '.join(diff)}); "
                             f"pick a new --out to start a new one")
    rd.save_json(RunDir.CONFIG, config)
    return rd


def save_start(rd: RunDir, name: str, tensors: dict) -> None:
    """Save the run's starting tensors, or check that a resumed run started from the same."""
    if rd.exists(name):
        stored = rd.load_tensors(name)
        if stored.keys() != tensors.keys() or not all(torch.equal(stored[k], tensors[k].cpu()) for k in stored):
            raise ValueError(f"{rd.file(name)} differs from this command's; pick a new --out")
    else:
        rd.save_tensors(name, tensors)


def save_starts(rd: RunDir, model: torch.nn.Module, masks: dict | None) -> None:
    """The initial weights and (if any) the masks a run trains from, saved or checked."""
    save_start(rd, RunDir.INIT, model.state_dict())
    if masks is not None:
        save_start(rd, RunDir.MASKS, masks)


def train_and_report(args, ds: Dataset, model, masks, cfg: TrainConfig, rd: RunDir, what: str) -> int:
    result = train(model, ds, masks, cfg, rd, progress=not args.no_progress, desc=f"{what} {args.arch}")
    _report(result.summary)
    return 0


def load_state(model: torch.nn.Module, path: Path) -> None:
    """Load initial weights, naming the first mismatch when they belong to another model."""
    state, ours = load_tensors(path), model.state_dict()
    for name in sorted(set(state) | set(ours)):
        if name not in state or name not in ours or state[name].shape != ours[name].shape:
            theirs = tuple(state[name].shape) if name in state else "absent"
            mine = tuple(ours[name].shape) if name in ours else "absent"
            raise ValueError(f"{path} does not fit the model: {name} is {theirs} "
                             f"there, {mine} in the model")
    model.load_state_dict(state)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    masks = load_tensors(path)
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise ValueError(f"{path}: masks must be bool tensors, {bad} are not")
    return masks


def _report(summary: dict) -> None:
    keys = ("val_acc_early_stop", "test_acc_early_stop", "early_stop_iteration", "val_acc_final",
            "test_acc_final")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


# --- train ---------------------------------------------------------------------------------------

def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a dense net or a given ticket",
                              description="Train a net, dense or with the masks of --masks, from a "
                                          "fresh init (--seed) or from --init.")
    add_model_data_args(p)
    add_train_args(p)
    p.add_argument("--masks", type=existing_file, help="masks.safetensors to train (default: dense)")
    p.add_argument("--init", type=existing_file,
                   help="initial weights (default: the init.safetensors next to --masks if there is one, "
                        "else a fresh init from --seed)")
    add_out_arg(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    ds = load_data(args)
    model = fresh_model(args, ds)
    masks = load_masks(args.masks) if args.masks else None
    if masks is not None:
        masks_lib.check_masks(model, masks)
    init = args.init
    if init is None and args.masks and (args.masks.parent / RunDir.INIT).is_file():
        init = args.masks.parent / RunDir.INIT
    if init is not None:
        load_state(model, init)
    cfg = train_config(args)
    rd = open_run(args.out, run_config(args, ds, masks=str(args.masks.resolve()) if args.masks else None,
                                       init=str(init.resolve()) if init else None,
                                       train=dataclasses.asdict(cfg)))
    save_starts(rd, model, masks)
    return train_and_report(args, ds, model, masks, cfg, rd, "train")


# --- imp -----------------------------------------------------------------------------------------

def add_imp_parser(subparsers) -> None:
    p = subparsers.add_parser("imp", help="find a winning ticket by iterative magnitude pruning",
                              description="Iterative magnitude pruning: train, prune a share of each "
                                          "layer's remaining weights, rewind, repeat until every layer "
                                          "reaches --sparsity.")
    add_model_data_args(p)
    add_train_args(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=fraction, default=0.8,
                   help="share of every layer's weights pruned in the ticket (default 0.8)")
    g.add_argument("--rates", type=rates_spec, default={},
                   help="per-round prune rates by layer kind, e.g. conv=0.1,linear=0.2,output=0.1 "
                        "(default: conv 0.1, or 0.15 for conv6; linear 0.2; output 0.1)")
    g.add_argument("--rewind-iteration", type=nonnegative_int, default=0,
                   help="rewind to the weights after this many steps of the dense training (default 0: init)")
    g.add_argument("--max-rounds", type=nonnegative_int,
                   help="stop after this many pruning rounds even short of --sparsity (default: no limit)")
    add_out_arg(p)
    p.set_defaults(func=cmd_imp)


def cmd_imp(args) -> int:
    ds = load_data(args)
    model = fresh_model(args, ds)
    cfg = ImpConfig.for_arch(args.arch, train=train_config(args), rates=args.rates,
                             sparsity=args.sparsity, rewind_iteration=args.rewind_iteration,
                             max_rounds=args.max_rounds)
    rd = open_run(args.out, run_config(args, ds, train=dataclasses.asdict(cfg.train),
                                       imp=dict(rates=cfg.rates, sparsity=cfg.sparsity,
                                                rewind_iteration=cfg.rewind_iteration)))
    run_imp(model, ds, cfg, rd, progress=not args.no_progress)
    summary = rd.load_json(RunDir.SUMMARY)
    if not summary["reached_target"]:
        print(f"warning: stopped after --max-rounds {args.max_rounds} short of --sparsity "
              f"{args.sparsity}", file=sys.stderr)
    _report(summary["ticket"])
    return 0


# --- random --------------------------------------------------------------------------------------

def add_random_parser(subparsers) -> None:
    p = subparsers.add_parser("random", help="random-pruning baseline",
                              description="Prune each layer uniformly at random to the same sparsity "
                                          "(exact per-layer count), keep the initial weights, and train.")
    add_model_data_args(p)
    add_train_args(p)
    g = p.add_argument_group("pruning")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--sparsity", type=fraction, default=0.8,
                     help="share of every layer's weights pruned (default 0.8)")
    how.add_argument("--like", type=existing_file,
                     help="masks.safetensors whose per-layer sparsity to match (e.g. a ticket's)")
    g.add_argument("--mask-seed", type=nonnegative_int, help="seed of the random masks (default: --seed)")
    g.add_argument("--init", type=existing_file, help="initial weights (default: a fresh init from --seed)")
    g.add_argument("--no-train", action="store_true", help="only write masks.safetensors and init.safetensors")
    add_out_arg(p)
    p.set_defaults(func=cmd_random)


def cmd_random(args) -> int:
    ds = load_data(args)
    model = fresh_model(args, ds)
    if args.init is not None:
        load_state(model, args.init)
    if args.like is not None:
        like = load_masks(args.like)
        masks_lib.check_masks(model, like)
        sparsity = {k: 1.0 - d for k, d in masks_lib.densities(like).items()}
    else:
        sparsity = args.sparsity
    mask_seed = args.seed if args.mask_seed is None else args.mask_seed
    masks = masks_lib.random_masks(model, sparsity, mask_seed)
    cfg = train_config(args)
    rd = open_run(args.out, run_config(args, ds, sparsity=sparsity, mask_seed=mask_seed,
                                       init=str(args.init.resolve()) if args.init else None,
                                       train=None if args.no_train else dataclasses.asdict(cfg)))
    save_starts(rd, model, masks)
    if args.no_train:
        print(f"wrote {rd.masks_path} and {rd.init_path}")
        return 0
    return train_and_report(args, ds, model, masks, cfg, rd, "random")


# --- fit -----------------------------------------------------------------------------------------

def add_fit_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit the logistic keep-models to a winning ticket",
                              description="Fit the four logistic models ({conv, linear} x {magnitude, "
                                          "magnitude + connectivity}) of 'kept in the ticket' on the "
                                          "ticket's initial weights and the connectivity measured on "
                                          "its training data. Writes JSON.")
    p.add_argument("--ticket", type=Path, required=True,
                   help="run directory of the ticket (`mcwt imp --out`): config.json, init.safetensors, "
                        "masks.safetensors")
    p.add_argument("--data-root", type=Path,
                   help="folder holding cifar-10-batches-py/ (default: the ticket's config)")
    p.add_argument("--max-samples", type=positive_int,
                   help="measure connectivity on this many training images (default: all)")
    p.add_argument("--max-weights", type=positive_int, default=200_000,
                   help="weights per layer the regression sees, a seeded subsample (default 200000)")
    p.add_argument("--out", type=Path, required=True, help="the fit's JSON file")
    p.set_defaults(func=cmd_fit)


def _ticket_context(run: Path, data_root: Path | None):
    """The model (with the run's initial weights) and data of a run directory."""
    rd = RunDir(run)
    if not rd.exists(RunDir.CONFIG):
        raise ValueError(f"{run} is not a run directory (no config.json)")
    config = rd.load_json(RunDir.CONFIG)
    root = data_root or (Path(config["data_root"]) if config.get("data_root") else None)
    ds = load_dataset(config["dataset"], root, split_seed=config.get("split_seed", 0),
                      val_size=config.get("val_size"))
    model = build_model_from_config(config)
    load_state(model, rd.init_path)
    return rd, config, ds, model


def cmd_fit(args) -> int:
    from .fit import fit_ticket

    rd, config, ds, model = _ticket_context(args.ticket, args.data_root)
    if not rd.exists(RunDir.MASKS):
        raise ValueError(f"--ticket {args.ticket} has no masks.safetensors (is IMP finished?)")
    fit = fit_ticket(model, load_masks(rd.masks_path), ds.train.tensors[0],
                     max_samples=args.max_samples, max_weights_per_layer=args.max_weights,
                     seed=config["seed"])
    fit.source = dict(ticket=str(args.ticket.resolve()), arch=config["arch"], dataset=config["dataset"])
    fit.save(args.out)
    print(json.dumps(fit.to_json()["models"], indent=2))
    print(f"wrote {args.out}")
    return 0


# --- sample --------------------------------------------------------------------------------------

def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample a Monte Carlo Winning Ticket from a fit",
                              description="Sample masks greedily, layer by layer from input to output: "
                                          "each layer's connectivity is measured on the net masked so "
                                          "far, its intercept calibrated to the target density, its mask "
                                          "drawn with the fused Bernoulli kernel. Writes a run directory "
                                          "that `mcwt train --masks OUT/masks.safetensors` trains.")
    add_model_data_args(p)
    p.add_argument("--fit", type=existing_file, required=True, help="fit JSON from `mcwt fit`")
    p.add_argument("--init", type=existing_file,
                   help="initial weights (default: a fresh init from --seed)")
    p.add_argument("--sparsity", type=fraction, default=0.8,
                   help="share of every layer's weights to prune (default 0.8)")
    p.add_argument("--no-connectivity", action="store_true",
                   help="magnitude-only models (the paper's 'MCWT w/o connectivity')")
    p.add_argument("--exact", action="store_true",
                   help="keep exactly round(n * (1 - sparsity)) weights per layer (default: Bernoulli)")
    p.add_argument("--max-samples", type=positive_int,
                   help="measure connectivity on this many training images (default: all)")
    p.add_argument("--device", type=device_spec, default="cpu", help="torch device (default cpu)")
    add_out_arg(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from .sample import sample_record, sample_ticket

    ds = load_data(args)
    model = fresh_model(args, ds)
    if args.init is not None:
        load_state(model, args.init)
    model.to(args.device)
    rd = open_run(args.out, run_config(args, ds, fit=str(args.fit.resolve()), sparsity=args.sparsity,
                                       connectivity=not args.no_connectivity, exact=args.exact,
                                       max_samples=args.max_samples))
    start = time.perf_counter()
    masks, draws = sample_ticket(model, args.fit, ds.train.tensors[0], sparsity=args.sparsity,
                                 connectivity=not args.no_connectivity, exact=args.exact,
                                 seed=args.seed, max_samples=args.max_samples,
                                 progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    save_starts(rd, model, masks)
    record = sample_record(draws, wall)
    rd.save_json("sample.json", record)
    for d in record["layers"]:
        print(f"{d['name']:>14}  {d['kind']:<6}  density {d['density']:.4f} "
              f"(target {d['target_density']:.4f})  bias " +
              ("dense" if d["bias"] is None else f"{d['bias']:+.3f}"))
    print(f"wrote {rd.masks_path} in {wall:.1f} s")
    return 0


# --- plot ----------------------------------------------------------------------------------------

def add_plot_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="the paper's Fig. 1 and Fig. 2b for a ticket and samples",
                              description="Fig. 1: initial values of kept weights (dense, WT, MCWT); "
                                          "Fig. 2b: connectivity of kept weights (WT, MCWT, random). "
                                          "PNG with the numbers beside it as JSON.")
    p.add_argument("--ticket", type=Path, required=True, help="the IMP run directory (the WT)")
    p.add_argument("--mcwt", type=Path, required=True, help="an `mcwt sample` run directory")
    p.add_argument("--random", type=Path, help="an `mcwt random` run directory (default: random "
                                               "masks of the same sparsity drawn here)")
    p.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/")
    p.add_argument("--max-samples", type=positive_int, default=2000,
                   help="training images connectivity is measured on (default 2000)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG and JSON files")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from .plots import ticket_figures

    rd, config, ds, model = _ticket_context(args.ticket, args.data_root)
    mcwt = load_masks(RunDir(args.mcwt).masks_path)
    if args.random is not None:
        rnd = load_masks(RunDir(args.random).masks_path)
    else:  # the same per-layer sparsity as the sample
        rnd = masks_lib.random_masks(model, {k: 1.0 - d for k, d in masks_lib.densities(mcwt).items()},
                                     config["seed"])
    masks = {"WT": load_masks(rd.masks_path), "MCWT": mcwt, "random": rnd}
    for m in masks.values():
        masks_lib.check_masks(model, m)
    for path in ticket_figures(model, masks, ds.train.tensors[0], args.out, args.max_samples):
        print(f"wrote {path} (numbers: {path.with_suffix('.json')})")
    return 0


# --- reproduce -----------------------------------------------------------------------------------

def arch_list(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise argparse.ArgumentTypeError(f"{text!r}: architectures must be a comma list of "
                                         f"{', '.join(sorted(ARCHS))}")
    return archs


def add_reproduce_parser(subparsers) -> None:
    from .experiments import PROTOCOLS

    p = subparsers.add_parser(
        "reproduce", help="the paper's Table 1, figures and cost, resumable",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per architecture and seed: IMP (whose round 0 is the dense net and whose last round "
                    "is the winning ticket), random pruning, the fit on the ticket, MCWT without and with "
                    "connectivity; every pruned net at 80% per layer from the same initial weights.\n"
                    "Writes OUT/table.md|csv (mean ± std over seeds beside the paper's numbers), "
                    "OUT/cost.md|csv and OUT/figures/. Rerun the same command to resume: finished "
                    "cells are skipped.\n\nProtocols:\n"
                    "  full     Frankle & Carbin: 20K/25K/30K iterations, IMP rates conv 10% (conv6 15%), "
                    "linear 20%, output 10%\n"
                    "  reduced  for CPUs: a twentieth of the iterations, evaluation every 200, IMP rates 60% (two "
                    "rounds to 80%), "
                    "connectivity on 10,000 images")
    p.add_argument("--arch", type=arch_list, default=["conv2"],
                   help="comma list of conv2, conv4, conv6 (default conv2)")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (default: offline, ships with scikit-learn), cifar10 (needs --data-root), "
                        "synthetic")
    p.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds 0..N-1 per architecture (default 2)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="reduced",
                   help="full or reduced (default reduced)")
    p.add_argument("--iterations", type=positive_int,
                   help="override the protocol's training iterations (e.g. short runs on digits)")
    p.add_argument("--eval-every", type=positive_int,
                   help="override the protocol's iterations between evaluations")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="cells run in parallel processes, each with cores/jobs threads (default 1)")
    p.add_argument("--device", type=device_spec, default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, required=True, help="grid directory; rerun to resume")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from .experiments import Grid, report

    if args.dataset == "cifar10":
        if args.data_root is None:
            raise ValueError("--dataset cifar10 needs --data-root DIR (the folder holding cifar-10-batches-py/)")
        load_dataset("cifar10", args.data_root)  # fail now, not in a worker, on missing or bad files
    grid = Grid(args.arch, list(range(args.seeds)), args.dataset, args.out,
                str(args.data_root.resolve()) if args.data_root else None, args.protocol, args.jobs,
                args.iterations, args.eval_every, args.device, progress=not args.no_progress)
    grid.run()
    paths = report(grid)
    print((args.out / "table.md").read_text())
    print((args.out / "cost.md").read_text())
    for name, path in paths.items():
        print(f"{name:>10}: {path}")
    return 0


# --- entry point ---------------------------------------------------------------------------------

COMMANDS = [add_train_parser, add_imp_parser, add_random_parser, add_fit_parser, add_sample_parser,
            add_plot_parser, add_reproduce_parser]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mcwt", description="Monte Carlo Winning Tickets: find, fit, sample "
                                                     "and train lottery tickets.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    parser.commands = subparsers.choices  # name -> its parser, to report errors under the command
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # the library's word on a bad argument
        parser.commands[args.command].error(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume from {args.out}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
