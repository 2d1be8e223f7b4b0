"""What each ``mcwt`` command does, given its parsed arguments (cli.py parses, this module runs).

Every command first builds and checks everything it needs (data, model, masks, settings, where
it writes), and only then opens its run directory (:func:`opened`: a new run, or the same one
resumed). What can only fail later (e.g. a fit that lacks a layer's model) fails in a directory
that :func:`opened` removes again when the failed command made it and it holds nothing but the
run's starting files, so the corrected command starts afresh. Errors in the user's input are
ValueErrors (or FileNotFoundErrors) naming the flag or the file; ``cli.main`` prints them as one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from . import distributed
from . import masks as masks_lib
from .data import DATASETS, Dataset, load_dataset
from .imp import ImpConfig, run_imp
from .models import ARCHS, arch_sparsity, build_model
from .runs import RunDir, load_masks, load_ticket, load_tensors, load_weights
from .train import TrainConfig, train

__all__ = ["train_cmd", "imp_cmd", "random_cmd", "prune_cmd", "ablate_cmd", "fit_cmd", "sample_cmd",
           "plot_cmd", "reproduce_cmd",
           "load_data", "train_config", "run_config"]


# --- what the commands share ---------------------------------------------------------------------

def _check_data_root(dataset: str, data_root: Path | None) -> None:
    if DATASETS[dataset].needs_root and data_root is None:
        raise ValueError(f"--dataset {dataset} needs --data-root DIR (the folder holding "
                         f"cifar-10-batches-py/)")


@contextlib.contextmanager
def flag(name: str, path=None):
    """Errors reading the input of flag ``name`` (the file ``path``) name the flag; a run
    directory's JSON that lacks a key or has the wrong shape is bad input too."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as e:
        if path is None:
            raise
        raise ValueError(f"{name} {path}: not a readable run ({type(e).__name__}: {e})") from None
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(_named(name, path, e)) from None


def _named(name: str, path, error: Exception) -> str:
    """``error``'s message after the flag (and the file, unless the message names it)."""
    message = str(error).removeprefix(name.lstrip("-") + ": ")  # the library's name for it
    return f"{name}: {message}" if path is None or str(path) in message else f"{name} {path}: {message}"


#: The files a run writes before any work: a run holding only these has lost nothing.
START_FILES = frozenset({RunDir.CONFIG, RunDir.INIT, RunDir.MASKS, RunDir.IMP, RunDir.CONSTRUCTION})


def _is_fresh(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _holds_only_starts(path: Path) -> bool:
    return all(p.is_dir() or p.name in START_FILES for p in path.rglob("*"))


@contextlib.contextmanager
def opened(path: Path, identity: dict | None = None, **kwargs):
    """The run directory ``path`` opened with ``identity`` (None: the caller opens it). If the
    command fails in a directory it made and nothing but starting files are there, the directory
    goes again, so the retry is not refused as "another run"."""
    fresh = _is_fresh(path)
    try:
        yield RunDir.open(path, identity, **kwargs) if identity is not None else RunDir(path)
    except BaseException:
        if fresh and path.is_dir() and _holds_only_starts(path):
            shutil.rmtree(path)
        raise


def check_out(path: Path, name: str = "--out", *, kind: str = "run") -> None:
    """``path`` can take what the command writes: a run directory, a file or a folder (``kind``)."""
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{name} {path}: {parent} is a file, not a directory")
    if kind == "file":
        if path.is_dir():
            raise ValueError(f"{name} {path} is a directory; give a file name")
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file, not a {'run directory' if kind == 'run' else 'folder'}")
    if kind == "run" and path.is_dir() and any(path.iterdir()) and not (path / RunDir.CONFIG).is_file():
        raise ValueError(f"{name} {path} holds files but no {RunDir.CONFIG}: not a run "
                         f"directory; give a new or empty directory")


def load_data(args) -> Dataset:
    _check_data_root(args.dataset, args.data_root)
    return load_dataset(args.dataset, args.data_root, split_seed=args.split_seed,
                        val_size=args.val_size, download=args.download)


def train_config(args) -> TrainConfig:
    """The TrainConfig of the parsed training flags; unset ones take the dataset's defaults
    (digits: the short protocol), then the architecture's protocol."""
    values = dict(DATASETS[args.dataset].train_defaults)
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(args, f.name) is not None})
    cfg = TrainConfig.for_arch(args.arch, **values)
    distributed.check_batch_size(cfg.batch_size)  # under torchrun: before any run directory
    return cfg


def _architecture_of(tensors: dict, ds: Dataset, masks: bool) -> str | None:
    """The registered architecture whose weights (``masks``: prunable weights) have exactly the
    names and shapes of ``tensors`` on ``ds``, if any."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for arch in ARCHS:
        model = build_model(arch, ds.in_channels, ds.num_classes, ds.image_size)
        ours = model.state_dict() if not masks else \
            {f"{n}.weight": masks_lib.dense_weight(m) for n, m in masks_lib.prunable_layers(model)}
        if shapes == {k: tuple(v.shape) for k, v in ours.items()}:
            return arch
    return None


def _fits(arch: str, ds: Dataset, model, tensors: dict, path: Path, name: str, masks: bool) -> None:
    """Check masks or weights read from ``path`` (flag ``name``) against ``model`` (an ``arch``);
    when they do not fit, say whose they are."""
    try:
        if masks:
            masks_lib.check_masks(model, tensors)
        else:
            load_weights(model, path)
    except ValueError as e:
        other = _architecture_of(tensors, ds, masks)
        if other is not None and other != arch:
            what = "masks" if masks else "weights"
            raise ValueError(f"{name} {path} holds the {what} of a {other} on {ds.name}, "
                             f"not of a {arch}") from None
        raise ValueError(_named(name, path, e)) from None


def read_masks(args, ds: Dataset, model, path: Path, name: str = "--masks") -> dict:
    with flag(name):
        masks = load_masks(path)
    _fits(args.arch, ds, model, masks, path, name, masks=True)
    return masks


def check_batch_size(cfg: TrainConfig, ds: Dataset) -> None:
    if cfg.batch_size > len(ds.train):
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(ds.train)} training images")


def data_and_model(args, init: Path | None = None, name: str = "--init") -> tuple[Dataset, torch.nn.Module]:
    """The dataset and the model: a fresh init from --seed, or the weights of ``init``."""
    ds = load_data(args)
    model = build_model(args.arch, ds.in_channels, ds.num_classes, ds.image_size, args.seed)
    if init is not None:
        with flag(name):
            tensors = load_tensors(init)
        _fits(args.arch, ds, model, tensors, init, name, masks=False)
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
    if not distributed.is_main():  # under torchrun: one report, rank 0's
        return
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


def _ticket_and_data(args):
    """The ticket of --ticket and its dataset (--data-root overriding the ticket's)."""
    with flag("--ticket", args.ticket):
        ticket = load_ticket(args.ticket)
        if not isinstance(ticket.config.get("seed"), int):
            raise ValueError(f"{RunDir.CONFIG} has no int seed")
    with flag("--data-root" if args.data_root else "--ticket", args.data_root or args.ticket):
        return ticket, _ticket_data(ticket, args.data_root)


# --- the commands --------------------------------------------------------------------------------

def train_cmd(args) -> int:
    check_out(args.out)
    init, init_flag = args.init, "--init"
    if init is None and args.masks and (args.masks.parent / RunDir.INIT).is_file():
        init, init_flag = args.masks.parent / RunDir.INIT, f"--masks (its {RunDir.INIT})"
    ds, model = data_and_model(args, init, init_flag)
    masks = read_masks(args, ds, model, args.masks) if args.masks else None
    cfg = train_config(args)
    check_batch_size(cfg, ds)
    with opened(args.out, run_config(args, ds, masks=_resolved(args.masks), init=_resolved(init),
                                     train=dataclasses.asdict(cfg))) as rd:
        save_starts(rd, model, masks)
        return _train_and_report(args, ds, model, masks, cfg, rd, "train")


def imp_cmd(args) -> int:
    check_out(args.out)
    ds, model = data_and_model(args)
    cfg = ImpConfig.for_arch(args.arch, train=train_config(args), rates=args.rates,
                             sparsity=arch_sparsity(args.arch, model, ds.example_input(), args.sparsity), rewind_iteration=args.rewind_iteration,
                             max_rounds=args.max_rounds)
    check_batch_size(cfg.train, ds)
    kinds = masks_lib.layer_kind(model, ds.example_input())
    # per layer: an architecture may keep some layers dense (resnet20's output layer)
    targets = cfg.sparsity if isinstance(cfg.sparsity, dict) else dict.fromkeys(kinds, cfg.sparsity)
    stuck = sorted({kinds[n] for n, s in targets.items() if s > 0 and cfg.rates[kinds[n]] == 0.0})
    if stuck:
        raise ValueError(f"--rates: a rate of 0 for {', '.join(stuck)} never reaches --sparsity {args.sparsity}")
    with opened(args.out, run_config(args, ds, train=dataclasses.asdict(cfg.train),
                                     imp=dict(rates=cfg.rates, sparsity=cfg.sparsity,
                                              rewind_iteration=cfg.rewind_iteration))) as rd:
        run_imp(model, ds, cfg, rd, progress=not args.no_progress)
    summary = rd.load_json(RunDir.SUMMARY)
    if not summary["reached_target"]:
        print(f"warning: stopped after --max-rounds {args.max_rounds} short of --sparsity "
              f"{args.sparsity}", file=sys.stderr)
    _print_summary(summary["ticket"])
    return 0


def random_cmd(args) -> int:
    check_out(args.out)
    ds, model = data_and_model(args, args.init)
    if args.like is not None:
        like = read_masks(args, ds, model, args.like, "--like")
        sparsity = {k: 1.0 - d for k, d in masks_lib.densities(like).items()}
    else:
        sparsity = arch_sparsity(args.arch, model, ds.example_input(), args.sparsity)
    mask_seed = args.seed if args.mask_seed is None else args.mask_seed
    masks = masks_lib.random_masks(model, sparsity, mask_seed)
    cfg = train_config(args)
    if not args.no_train:
        check_batch_size(cfg, ds)
    with opened(args.out, run_config(args, ds, sparsity=sparsity, mask_seed=mask_seed,
                                     init=_resolved(args.init),
                                     train=None if args.no_train else dataclasses.asdict(cfg))) as rd:
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

    check_out(args.out)
    ds, model = data_and_model(args)
    cfg = train_config(args)
    start = time.perf_counter()
    masks = prune_at_init(model, args.method, ds.train.tensors, args.sparsity, seed=args.seed,
                          allocation=args.allocation, progress=not args.no_progress and sys.stderr.isatty())
    wall = time.perf_counter() - start
    with opened(args.out, run_config(args, ds, prune_method=args.method, sparsity=args.sparsity,
                                     allocation=args.allocation,
                                     train=None if args.no_train else dataclasses.asdict(cfg))) as rd:
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

    check_out(args.out)
    ticket, ds = _ticket_and_data(args)
    config = ticket.config
    args.arch, args.dataset = config["arch"], config["dataset"]  # train_config reads their protocol
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
    with opened(args.out, identity) as rd:
        save_starts(rd, ticket.model, masks)
        _save_construction(rd, wall)
        return _train_and_report(args, ds, ticket.model, masks, cfg, rd, f"ablate {args.kind}")


def fit_cmd(args) -> int:
    from .fit import fit_ticket

    check_out(args.out, kind="file")
    ticket, ds = _ticket_and_data(args)
    fit = fit_ticket(ticket.model, ticket.masks, ds.train.tensors[0], max_samples=args.max_samples,
                     max_weights_per_layer=args.max_weights, seed=ticket.config["seed"],
                     device=args.device, granularity=args.granularity)
    fit.source = dict(ticket=str(args.ticket.resolve()), arch=ticket.config["arch"],
                      dataset=ticket.config["dataset"])
    fit.save(args.out)
    print(json.dumps(fit.to_json()["models"], indent=2))
    print(f"wrote {args.out}")
    return 0


def _check_fit_covers(fit, model, ds: Dataset, use_connectivity: bool, sparsity, path: Path) -> None:
    """Fail before any work when the fit lacks a model one of the net's layers needs."""
    from .sample import _target_densities, check_fit_covers

    layers = masks_lib.prunable_layers(model, ds.example_input().to(next(model.parameters()).device))
    names = [f"{n}.weight" for n, _ in layers]
    with flag("--fit", path):
        check_fit_covers(fit, names, masks_lib.layer_kind(model, layers=layers),
                         _target_densities(sparsity, names), use_connectivity)


def sample_cmd(args) -> int:
    from .fit import load_fit
    from .sample import sample_record, sample_ticket

    check_out(args.out)
    with flag("--fit", args.fit):
        fit = load_fit(args.fit)
    ds, model = data_and_model(args, args.init)
    model.to(args.device)
    sparsity = arch_sparsity(args.arch, model, ds.example_input(), args.sparsity)
    _check_fit_covers(fit, model, ds, args.use_connectivity, sparsity, args.fit)
    with opened(args.out, run_config(args, ds, fit=str(args.fit.resolve()), sparsity=args.sparsity,
                                     use_connectivity=args.use_connectivity, exact=args.exact,
                                     max_samples=args.max_samples)) as rd:
        start = time.perf_counter()
        masks, draws = sample_ticket(model, fit, ds.train.tensors[0], sparsity=sparsity,
                                     use_connectivity=args.use_connectivity, exact=args.exact,
                                     seed=args.seed, max_samples=args.max_samples,
                                     progress=not args.no_progress)
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


def _run_masks(path: Path, name: str) -> tuple[RunDir, dict]:
    """The run directory of flag ``name`` and its masks."""
    with flag(name, path):
        if not path.is_dir():
            raise ValueError("not a run directory")
        run = RunDir(path)
        if not run.exists(RunDir.MASKS):
            raise ValueError(f"holds no {RunDir.MASKS}")
        return run, load_masks(run.masks_path)


def plot_cmd(args) -> int:
    from .plots import ticket_figures

    check_out(args.out, kind="folder")
    ticket, ds = _ticket_and_data(args)
    sample, mcwt = _run_masks(args.mcwt, "--mcwt")
    with flag("--mcwt", args.mcwt):
        use_connectivity = not sample.exists(RunDir.CONFIG) or \
            sample.load_json(RunDir.CONFIG).get("use_connectivity", True)
    variant = "mcwt_connectivity" if use_connectivity else "mcwt_magnitude"
    if args.random is not None:
        _, rnd = _run_masks(args.random, "--random")
    else:  # the same per-layer sparsity as the sample
        rnd = None
    masks = {"wt": ticket.masks, variant: mcwt, "random": rnd}
    for (name, path), m in zip([("--ticket", args.ticket), ("--mcwt", args.mcwt), ("--random", args.random)],
                               masks.values()):
        if m is not None:
            _fits(ticket.config["arch"], ds, ticket.model, m, path, name, masks=True)
    if rnd is None:
        masks["random"] = masks_lib.random_masks(
            ticket.model, {k: 1.0 - d for k, d in masks_lib.densities(mcwt).items()}, ticket.config["seed"])
    for path in ticket_figures(ticket.model, masks, ds.train.tensors[0], args.out, args.max_samples):
        print(f"wrote {path} (numbers: {path.with_suffix('.json')})")
    return 0


def reproduce_cmd(args) -> int:
    from .experiments import Grid, report
    from .experiments.reference import verdict_lines
    from .state import export_state, import_state

    check_out(args.out)
    _check_data_root(args.dataset, args.data_root)
    if distributed.active() and args.jobs > 1:
        raise ValueError(f"--jobs {args.jobs}: under torchrun the processes train each net together; "
                         f"give --jobs 1")
    # fail now, not in a worker, on missing or bad files; the split sizes go beside the table
    ds = load_dataset(args.dataset, args.data_root, download=args.download)
    defaults = DATASETS[args.dataset].train_defaults
    if args.import_state is not None and not Path(args.import_state).is_file():
        raise ValueError(f"--import-state: {str(args.import_state)!r} is not a file")
    grid = Grid(archs=args.arch, seeds=list(range(args.seeds)), dataset=args.dataset, out=args.out,
                data_root=_resolved(args.data_root), protocol=args.protocol, jobs=args.jobs,
                iterations=args.iterations or defaults.get("iterations"),
                eval_every=args.eval_every or defaults.get("eval_every"), device=args.device,
                progress=not args.no_progress, pack=args.pack, shard=args.shard,
                lock_timeout=args.lock_timeout, methods=args.methods)
    if args.import_state is not None:
        manifest = import_state(args.import_state, args.out)
        print(f"imported {args.import_state}: {len(manifest['files'])} files, "
              f"{len(manifest['masks'])} mask sets", file=sys.stderr)
    try:
        with opened(args.out), _sigterm_as_interrupt():
            grid.run()
    finally:  # a run cut short (Ctrl-C, SIGTERM, timeout) still leaves its state
        if args.export_state is not None and Path(args.out).is_dir():
            manifest = export_state(args.out, args.export_state)
            print(f"exported the state of {args.out} to {args.export_state} "
                  f"({Path(args.export_state).stat().st_size:,} bytes, {len(manifest['masks'])} mask sets)",
                  file=sys.stderr)
    if grid.shard is not None and not grid.done():
        print(f"shard {grid.shard[0]}/{grid.shard[1]} done; other shards' cells remain, so no table yet",
              file=sys.stderr)
        return 0
    paths = report(grid)  # every rank: the figures measure connectivity together; rank 0 writes
    if not distributed.is_main():
        return 0
    print(paths["table_md"].read_text())
    print(split_note(ds))
    print()
    print(paths["cost_md"].read_text())
    for name, path in paths.items():
        print(f"{name:>10}: {path}")
    for line in verdict_lines(grid, paths["table_csv"]):  # the main job: does it keep the README's promise
        print(line)
    return 0


def split_note(ds: Dataset) -> str:
    """The split sizes, and what one image is worth in the accuracy columns."""
    n_train, n_val, n_test = len(ds.train), len(ds.val), len(ds.test)
    return (f"Splits of {ds.name}: {n_train:,} training, {n_val:,} validation, {n_test:,} test images; "
            f"one image is {100 / n_val:.2f} points of validation accuracy, {100 / n_test:.2f} of test "
            f"accuracy.")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's time limit, ``timeout``) raises KeyboardInterrupt, so cleanup runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
