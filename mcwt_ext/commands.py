"""What each ``mcwt`` command does, given its parsed arguments (cli.py parses, this module runs).

Every command first builds and checks everything it needs (data, model, masks, settings, where
it writes), and only then opens its run directory (:func:`~mcwt_ext.command_inputs.opened`: a new run, or the same one
resumed), holding its lock (:mod:`mcwt_ext.runlock`: a second command on it is refused while
this one lives; released however the command ends, SIGTERM included). What can only fail later
(e.g. a fit that lacks a layer's model) fails in a directory that :func:`~mcwt_ext.command_inputs.opened` removes again
when the failed command made it and it holds nothing but the run's starting files, so the
corrected command starts afresh. Errors in the user's input are UsageErrors
(:mod:`mcwt_ext.errors`) naming the flag or the file; ``cli.main`` prints them as one line, and
reports anything else as a bug.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from . import distributed
from . import masks as masks_lib
from .command_inputs import (check_batch_size, check_data_root, check_fits, check_out, data_and_model,
                             flag, load_data, locked, opened, read_masks, resolved, run_config,
                             save_starts, ticket_and_data, train_config)
from .data import DATASETS, Dataset, load_dataset
from .errors import UsageError
from .imp import ImpConfig, round_plan, run_imp
from .models import ARCHS, arch_sparsity
from .runs import RunDir, load_masks
from .train import TrainConfig, train

__all__ = ["train_cmd", "imp_cmd", "random_cmd", "prune_cmd", "dst_cmd", "ablate_cmd", "fit_cmd", "sample_cmd",
           "plot_cmd", "reproduce_cmd",
           "load_data", "train_config", "run_config"]


# --- running and reporting a training ------------------------------------------------------------

def print_summary(summary: dict) -> None:
    if not distributed.is_main():  # under torchrun: one report, rank 0's
        return
    keys = ("val_acc_early_stop", "test_acc_early_stop", "early_stop_iteration", "val_acc_final",
            "test_acc_final")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


def say_if_finished(args, finished: bool) -> None:
    """A rerun of a finished command says so before its summary: on stderr, so stdout holds the
    summary alone, as the first run printed it."""
    if finished and distributed.is_main():
        print(f"mcwt {args.command}: --out {args.out} already finished; its summary:", file=sys.stderr)


def train_and_report(args, ds: Dataset, model, masks, cfg: TrainConfig, rd: RunDir, what: str, *,
                     said: bool = False) -> int:
    if not said:  # (said: the caller said it before its own first line)
        say_if_finished(args, rd.done())
    result = train(model, ds, masks, cfg, rd, progress=not args.no_progress, desc=f"{what} {args.arch}")
    print_summary(result.summary)
    return 0


# --- the commands --------------------------------------------------------------------------------

def _init_beside(init: Path | None, masks: Path | None, masks_flag: str) -> tuple[Path | None, str]:
    """``--init``, else the init.safetensors beside the masks file of ``masks_flag`` (if any)."""
    if init is None and masks and (masks.parent / RunDir.INIT).is_file():
        return masks.parent / RunDir.INIT, f"{masks_flag} (its {RunDir.INIT})"
    return init, "--init"


def train_cmd(args) -> int:
    check_out(args.out)
    init, init_flag = _init_beside(args.init, args.masks, "--masks")
    ds, model = data_and_model(args, init, init_flag)
    masks = read_masks(args, ds, model, args.masks) if args.masks else None
    cfg = train_config(args)
    check_batch_size(cfg, ds)
    with opened(args.out, run_config(args, ds, masks=resolved(args.masks), init=resolved(init),
                                     train=dataclasses.asdict(cfg))) as rd:
        save_starts(rd, model, masks)
        return train_and_report(args, ds, model, masks, cfg, rd, "train")


def imp_cmd(args) -> int:
    check_out(args.out)
    ds, model = data_and_model(args)
    cfg = ImpConfig.for_arch(args.arch, train=train_config(args), rates=args.rates,
                             sparsity=arch_sparsity(args.arch, model, ds.example_input(), args.sparsity), rewind_iteration=args.rewind_iteration,
                             max_rounds=args.max_rounds, allocation=args.allocation)
    check_batch_size(cfg.train, ds)
    with flag("--rates"):  # global allocation: one rate for the pooled kinds
        plan = round_plan(cfg, {n: m.numel() for n, m in masks_lib.dense_masks(model).items()},
                          masks_lib.layer_kind(model, ds.example_input()))
    stuck = [kind for kind, rounds in plan.items() if rounds is None]
    if stuck:
        raise UsageError(f"--rates: a rate of 0 for {', '.join(stuck)} never reaches --sparsity {args.sparsity}")
    with opened(args.out, run_config(args, ds, train=dataclasses.asdict(cfg.train),
                                     imp=dict(rates=cfg.rates, sparsity=cfg.sparsity,
                                              rewind_iteration=cfg.rewind_iteration,
                                              allocation=cfg.allocation))) as rd:
        finished = rd.done() and _imp_finished(rd.load_json(RunDir.SUMMARY), cfg)
        say_if_finished(args, finished)
        if not finished and distributed.is_main():
            print(plan_line(plan, cfg, args.sparsity), file=sys.stderr)
        run_imp(model, ds, cfg, rd, progress=not args.no_progress)
    summary = rd.load_json(RunDir.SUMMARY)
    if not summary["reached_target"]:
        print(f"warning: stopped after --max-rounds {args.max_rounds} short of --sparsity "
              f"{args.sparsity}", file=sys.stderr)
    print_summary(summary["ticket"])
    return 0


def _imp_finished(summary: dict, cfg: ImpConfig) -> bool:
    """Whether IMP of ``summary`` has nothing left to train under ``cfg`` (a larger --max-rounds
    goes on)."""
    last = summary["rounds"][-1]["round"]
    return summary["reached_target"] or (cfg.max_rounds is not None and last >= cfg.max_rounds)


def _percent(share: float) -> str:
    return f"{100 * share:g}%"


def plan_line(plan: dict, cfg: ImpConfig, sparsity: float) -> str:
    """IMP's rounds (:func:`~mcwt_ext.imp.round_plan`) in a line, e.g. ``16 rounds to 80% at 10% per
    round for conv layers (linear 8, output 16); see --rates``."""
    if not plan:
        return f"0 rounds to {_percent(sparsity)}: no layer is pruned"
    most = max(plan.values())
    slowest = next(kind for kind, rounds in plan.items() if rounds == most)
    if cfg.allocation == "global":
        which = f"for the {', '.join(plan)} layers pooled (--allocation global)"
    else:
        others = ", ".join(f"{kind} {rounds}" for kind, rounds in plan.items() if kind != slowest)
        which = f"for {slowest} layers" + (f" ({others})" if others else "")
    if cfg.max_rounds is not None and cfg.max_rounds < most:
        which += f"; --max-rounds {cfg.max_rounds} stops after {cfg.max_rounds}"
    rounds = f"{most} round{'' if most == 1 else 's'}"
    return f"{rounds} to {_percent(sparsity)} at {_percent(cfg.rates[slowest])} per round {which}; see --rates"


def _distribution_identity(args) -> dict:
    """What a run's identity records of the rule behind --distribution's counts (ERK's total:
    runs made under the earlier rule do not resume into this one)."""
    from .distribution import identity_entry

    return identity_entry(args.distribution)


def _layer_sparsity(args, model, ds: Dataset):
    """--sparsity spread over the model's layers by --distribution."""
    from .distribution import layer_sparsity

    with flag("--distribution"):
        return layer_sparsity(args.arch, model, ds.example_input(), args.sparsity, args.distribution)


#: A run of masks only (--no-train: its ``train`` None) and the same run trained are one run: a
#: rerun without --no-train trains the masks made, and one with it leaves a training as it is.
MASKS_ONLY = ("train",)


def random_cmd(args) -> int:
    check_out(args.out)
    if args.like is not None and args.distribution != "uniform":
        raise UsageError(f"--distribution {args.distribution}: --like copies each layer's sparsity "
                         f"from its masks; give one of them")
    ds, model = data_and_model(args, args.init)
    if args.like is not None:
        like = read_masks(args, ds, model, args.like, "--like")
        sparsity = {k: 1.0 - d for k, d in masks_lib.densities(like).items()}
    else:
        sparsity = _layer_sparsity(args, model, ds)
    mask_seed = args.seed if args.mask_seed is None else args.mask_seed
    masks = masks_lib.random_masks(model, sparsity, mask_seed)
    cfg = train_config(args)
    if not args.no_train:
        check_batch_size(cfg, ds)
    with opened(args.out, run_config(args, ds, sparsity=sparsity, distribution=args.distribution,
                                     **_distribution_identity(args), mask_seed=mask_seed,
                                     init=resolved(args.init),
                                     train=None if args.no_train else dataclasses.asdict(cfg)),
                optional=MASKS_ONLY) as rd:
        made = rd.exists(RunDir.MASKS)  # written after the initial weights
        save_starts(rd, model, masks)
        if args.no_train:
            say_if_finished(args, made)
            print(f"wrote {rd.masks_path} and {rd.init_path}")
            return 0
        return train_and_report(args, ds, model, masks, cfg, rd, "random")


def dst_cmd(args) -> int:
    from .dst import DstConfig, train_dst

    check_out(args.out)
    if args.start is not None and args.distribution != "uniform":
        raise UsageError(f"--distribution {args.distribution}: --start keeps each layer's count "
                         f"from its masks; give one of them")
    init, init_flag = _init_beside(args.init, args.start, "--start")
    ds, model = data_and_model(args, init, init_flag)
    mask_seed = args.seed if args.mask_seed is None else args.mask_seed
    if args.start is not None:
        masks = read_masks(args, ds, model, args.start, "--start")
    else:
        masks = masks_lib.random_masks(model, _layer_sparsity(args, model, ds), mask_seed)
    dst = DstConfig(args.method, args.update_every, args.stop_at, args.alpha, mask_seed)
    cfg = train_config(args)
    check_batch_size(cfg, ds)
    with opened(args.out, run_config(args, ds, start=resolved(args.start), init=resolved(init),
                                     sparsity=None if args.start else args.sparsity,
                                     distribution=args.distribution, **_distribution_identity(args),
                                     dst=dataclasses.asdict(dst), train=dataclasses.asdict(cfg))) as rd:
        save_starts(rd, model, masks)
        say_if_finished(args, rd.done())
        result, _ = train_dst(model, ds, masks, cfg, dst, rd, progress=not args.no_progress,
                              desc=f"dst {args.method} {args.arch}")
    print_summary(result.summary)
    print(f"final masks: {rd.file(RunDir.FINAL_MASKS)}")
    return 0


def _save_construction(rd: RunDir, wall: float) -> None:
    """The first construction's wall time (a resumed run re-makes the same masks; keep the first)."""
    if not rd.exists(RunDir.CONSTRUCTION):
        rd.save_json(RunDir.CONSTRUCTION, dict(wall_time_s=wall))


def prune_cmd(args) -> int:
    from .prune_at_init import prune_at_init

    check_out(args.out)
    if args.distribution != "uniform" and args.allocation == "global":
        raise UsageError(f"--distribution {args.distribution}: sets each layer's count, and "
                         f"--allocation global pools the layers into one total; give one of them")
    ds, model = data_and_model(args)
    cfg = train_config(args)
    start = time.perf_counter()
    sparsity = _layer_sparsity(args, model, ds)  # resnet20: fc dense
    masks = prune_at_init(model, args.method, ds.train.tensors, sparsity, seed=args.seed,
                          allocation=args.allocation, progress=not args.no_progress and sys.stderr.isatty())
    wall = time.perf_counter() - start
    with opened(args.out, run_config(args, ds, prune_method=args.method, sparsity=args.sparsity,
                                     allocation=args.allocation, distribution=args.distribution,
                                     **_distribution_identity(args),
                                     train=None if args.no_train else dataclasses.asdict(cfg)),
                optional=MASKS_ONLY) as rd:
        say_if_finished(args, rd.exists(RunDir.MASKS) if args.no_train else rd.done())  # before its first line
        save_starts(rd, model, masks)
        _save_construction(rd, wall)
        print(f"{args.method}: masks in {wall:.1f} s")
        if args.no_train:
            print(f"wrote {rd.masks_path} and {rd.init_path}")
            return 0
        return train_and_report(args, ds, model, masks, cfg, rd, f"prune {args.method}", said=True)


def ablate_cmd(args) -> int:
    from .ablate import ablate
    from .experiments.methods import ablation_seed
    from .models import build_model

    check_out(args.out)
    ticket, ds = ticket_and_data(args)
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
                    data_root=resolved(args.data_root) or config.get("data_root"),
                    ticket=str(args.ticket.resolve()), kind=args.kind, ablation_seed=seed,
                    init_scheme=ARCHS[config["arch"]].init,
                    train=dataclasses.asdict(cfg))
    with opened(args.out, identity) as rd:
        save_starts(rd, ticket.model, masks)
        _save_construction(rd, wall)
        return train_and_report(args, ds, ticket.model, masks, cfg, rd, f"ablate {args.kind}")


def fit_cmd(args) -> int:
    from .fit import fit_ticket

    check_out(args.out, kind=args.out_kind)
    ticket, ds = ticket_and_data(args)
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
    sparsity = _layer_sparsity(args, model, ds)
    _check_fit_covers(fit, model, ds, args.use_connectivity, sparsity, args.fit)
    with opened(args.out, run_config(args, ds, fit=str(args.fit.resolve()), sparsity=args.sparsity,
                                     distribution=args.distribution, **_distribution_identity(args),
                                     use_connectivity=args.use_connectivity, exact=args.exact,
                                     max_samples=args.max_samples)) as rd:
        if rd.exists(RunDir.SAMPLE):  # written last: finished, its record read back, no new draw
            say_if_finished(args, True)
            save_starts(rd, model, None)  # the same initial weights (--init)
            record = rd.load_json(RunDir.SAMPLE)
        else:
            start = time.perf_counter()
            masks, draws = sample_ticket(model, fit, ds.train.tensors[0], sparsity=sparsity,
                                         use_connectivity=args.use_connectivity, exact=args.exact,
                                         seed=args.seed, max_samples=args.max_samples,
                                         progress=not args.no_progress)
            save_starts(rd, model, masks)
            record = sample_record(draws, time.perf_counter() - start)
            rd.save_json(RunDir.SAMPLE, record)
        wall = record["wall_time_s"]
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
            raise UsageError("not a run directory")
        run = RunDir(path)
        if not run.exists(RunDir.MASKS):
            raise UsageError(f"holds no {RunDir.MASKS}")
        return run, load_masks(run.masks_path)


def plot_cmd(args) -> int:
    from .plots import ticket_figures

    check_out(args.out, kind=args.out_kind)
    ticket, ds = ticket_and_data(args)
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
            check_fits(ticket.config["arch"], ds, ticket.model, m, path, name, masks=True)
    if rnd is None:
        masks["random"] = masks_lib.random_masks(
            ticket.model, {k: 1.0 - d for k, d in masks_lib.densities(mcwt).items()}, ticket.config["seed"])
    for path in ticket_figures(ticket.model, masks, ds.train.tensors[0], args.out, args.max_samples,
                               dataset=ds.name, arch=ticket.config["arch"], seed=ticket.config["seed"]):
        print(f"wrote {path} (numbers: {path.with_suffix('.json')})")
    return 0


def reproduce_cmd(args) -> int:
    from .experiments import Budget, BudgetSpent, Grid, report
    from .experiments.reference import verdict_lines
    from .state import PeriodicExport, export_state, import_state
    from .supervision import saving_with

    budget = None if args.time_budget is None else Budget(args.time_budget)  # counts from here
    check_out(args.out, kind=args.out_kind)
    every = args.export_every_minutes
    if every is not None and args.export_state is None:
        raise UsageError("--export-every-minutes: rewrites the bundle of --export-state; give --export-state FILE")
    if every is not None and args.executor == "ray":
        raise UsageError("--export-every-minutes: exports from this process; not with --executor ray (Ray "
                         "tasks keep their state in the shared --out)")
    if every is not None and args.jobs > 1:
        raise UsageError(f"--export-every-minutes: exports from this process, between its trainings' steps; "
                         f"not with --jobs {args.jobs} (give --jobs 1)")
    if (every is not None or budget is not None) and distributed.active():
        raise UsageError("--export-every-minutes / --time-budget: not under torchrun (each rank would stop "
                         "or export at its own step)")
    check_data_root(args.dataset, args.data_root)
    if distributed.active() and args.jobs > 1:
        raise UsageError(f"--jobs {args.jobs}: under torchrun the processes train each net together; "
                         f"give --jobs 1")
    # fail now, not in a worker, on missing or bad files; the split sizes go beside the table
    ds = load_dataset(args.dataset, args.data_root, download=args.download)
    defaults = DATASETS[args.dataset].train_defaults
    if args.import_state is not None and not Path(args.import_state).is_file():
        raise UsageError(f"--import-state: {str(args.import_state)!r} is not a file")
    grid = Grid(archs=args.arch, seeds=list(range(args.seeds)), dataset=args.dataset, out=args.out,
                data_root=resolved(args.data_root), protocol=args.protocol, jobs=args.jobs,
                iterations=args.iterations or defaults.get("iterations"),
                eval_every=args.eval_every or defaults.get("eval_every"), device=args.device,
                progress=not args.no_progress, pack=args.pack, shard=args.shard,
                lock_timeout=args.lock_timeout, methods=args.methods, budget=budget,
                augment=args.augment, executor=args.executor, ray_address=args.ray_address,
                precision=args.precision, checkpoint_minutes=None if every is None else every / 2)
    saver = None if every is None else PeriodicExport(args.out, args.export_state, every)
    # cell by cell, an unfinished training's checkpoint travels: a stop loses nothing of it
    checkpoints = every is not None or grid.pack_size() == 1
    with locked(args.out, "mcwt reproduce", lock=grid.shard is None):  # shards lock their cells
        if args.import_state is not None:
            manifest = import_state(args.import_state, args.out)
            print(f"imported {args.import_state}: {len(manifest['files'])} files, "
                  f"{len(manifest['masks'])} mask sets", file=sys.stderr)
        finished = grid.done()  # before the run: said now, before any other line of the run
        say_if_finished(args, finished)
        try:
            with opened(args.out, lock=False), saving_with(saver):
                grid.run()
        except BudgetSpent as e:  # a planned stop: the state goes on elsewhere
            print(f"time budget spent: {e}; {sum(not c.done() for c in grid.cells)} cells left", file=sys.stderr)
            return 0
        finally:  # a run cut short (Ctrl-C, SIGTERM, timeout) still leaves its state
            if args.export_state is not None and Path(args.out).is_dir():
                manifest = export_state(args.out, args.export_state, checkpoints=checkpoints)
                print(f"exported the state of {args.out} to {args.export_state} "
                      f"({Path(args.export_state).stat().st_size:,} bytes, {len(manifest['masks'])} mask sets, "
                      f"{len(manifest['checkpoints'])} unfinished trainings' checkpoints)",
                      file=sys.stderr)
        if grid.shard is not None and not grid.done():
            print(f"shard {grid.shard[0]}/{grid.shard[1]} done; other shards' chains remain, so no table yet "
                  f"(the shard that finds every chain done writes it)", file=sys.stderr)
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
