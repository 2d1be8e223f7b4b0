"""The ``mcwt`` command line: parsing only. One ``add_<cmd>_parser`` per subcommand; what a
command does is in :mod:`mcwt_ext.commands`.

Every command but ``fit`` (a JSON file) and ``plot`` (a folder) writes into a run directory
(``--out``); rerunning the same command on it resumes where it stopped. Bad arguments, a flag of
another command and an ``--out`` the OS refuses end with one ``mcwt <cmd>: error: ...`` line and
exit status 2 (a :class:`~mcwt_ext.errors.UsageError`); any other error is a bug of mcwt: one line
saying so, its traceback in a file, exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import commands
from .augment import AUGMENTS
from .cli_flags import (CommandsParser, add_mask_target_args, add_model_data_args, add_out_arg, add_ticket_args,
                        add_train_args, command_parser, dataset_help)
from .cli_types import (arch_list, device_spec, existing_file, library_type, methods_help, methods_spec,
                        nonnegative_int, positive_float, positive_int, rates_spec, seed, sparsity, unit_share)
from .data import DATASETS
from .errors import UsageError, report_bug
from .fit import GRANULARITIES
from .models import ARCHS

__all__ = ["main", "build_parser", "add_model_data_args", "add_train_args"]


# --- train ---------------------------------------------------------------------------------------

def add_train_parser(subparsers) -> None:
    p = command_parser(subparsers, commands.train_cmd, "train", model_data=True, train=True,
                       help="train a dense net or a given ticket",
                       description="Train a net, dense or with the masks of --masks, from a "
                                   "fresh init (--seed) or from --init.")
    p.add_argument("--masks", type=existing_file, help="masks.safetensors to train (default: dense)")
    p.add_argument("--init", type=existing_file,
                   help="initial weights (default: the init.safetensors next to --masks if there is one, "
                        "else a fresh init from --seed)")
    add_out_arg(p)


# --- imp -----------------------------------------------------------------------------------------

def add_imp_parser(subparsers) -> None:
    p = command_parser(subparsers, commands.imp_cmd, "imp", model_data=True, train=True,
                       help="find a winning ticket by iterative magnitude pruning",
                       description="Iterative magnitude pruning: train, prune a share of each "
                                   "layer's remaining weights, rewind, repeat until every layer "
                                   "reaches --sparsity.")
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=sparsity, default=0.8,
                   help="share of every layer's weights pruned in the ticket (default 0.8)")
    g.add_argument("--rates", type=rates_spec, default={},
                   help="per-round prune rates by layer kind, e.g. conv=0.1,linear=0.2,output=0.1 "
                        "(default: conv 0.1, or 0.15 for conv6; linear 0.2; output 0.1)")
    g.add_argument("--rewind-iteration", type=nonnegative_int, default=0,
                   help="rewind to the weights after this many steps of the dense training (default 0: init)")
    g.add_argument("--max-rounds", type=nonnegative_int,
                   help="stop after this many pruning rounds even short of --sparsity (default: no limit)")
    g.add_argument("--allocation", choices=("layer", "global"),
                   help="layer: each layer prunes its kind's rate to --sparsity; global: one rate over "
                        "all pruned layers pooled, to --sparsity of their total (default layer; global "
                        "for resnet20, as Frankle & Carbin)")
    add_out_arg(p)


# --- random --------------------------------------------------------------------------------------

def add_random_parser(subparsers) -> None:
    p = command_parser(subparsers, commands.random_cmd, "random", model_data=True, train=True,
                       help="random-pruning baseline",
                       description="Prune each layer uniformly at random to the same sparsity "
                                   "(or to ERK's shares, --distribution erk; exact per-layer count), keep "
                                   "the initial weights, and train.")
    g = p.add_argument_group("pruning")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--like", type=existing_file,
                     help="masks.safetensors whose per-layer sparsity to match (e.g. a ticket's)")
    add_mask_target_args(g, how, no_train=True)
    g.add_argument("--mask-seed", type=seed, help="seed of the random masks (default: --seed)")
    g.add_argument("--init", type=existing_file, help="initial weights (default: a fresh init from --seed)")
    add_out_arg(p)


# --- prune (pruning at initialisation) ------------------------------------------------------------

def add_prune_parser(subparsers) -> None:
    from .prune_at_init import ALLOCATIONS, METHODS

    p = command_parser(subparsers, commands.prune_cmd, "prune", model_data=True, train=True,
                       help="pruning-at-initialisation baselines (magnitude, SNIP, GraSP, SynFlow)",
                       description="Score every weight of the untrained net (--seed) by --method, keep the "
                                   "best to --sparsity (exactly each layer's share, or the same total over "
                                   "all layers with --allocation global) and train like `mcwt random`. "
                                   "construction.json records how long the masks took.")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=METHODS, required=True,
                   help="magnitude: top |w|; snip: |w * dL/dw|; grasp: -w * Hg; synflow: iterative, "
                        "data-free, 100 rounds")
    g.add_argument("--allocation", choices=ALLOCATIONS, default="layer",
                   help="layer: each layer keeps exactly its share (default); global: best scores "
                        "over all layers, same total (uniform --distribution only)")
    add_mask_target_args(g, no_train=True)
    add_out_arg(p)


# --- dst (dynamic sparse training) ---------------------------------------------------------------

def add_dst_parser(subparsers) -> None:
    from .dst import DST_METHODS

    p = command_parser(subparsers, commands.dst_cmd, "dst", model_data=True, train=True,
                       help="dynamic sparse training: RigL or SET, one training whose masks change",
                       description="Train from a random mask at --sparsity (or from --start) and, every "
                                   "--update-every steps up to --stop-at of the training (RigL: from step 0, "
                                   "each update in place of an optimiser step; SET: after steps 1, "
                                   "1 + update-every, ...), replace the "
                                   "fraction alpha/2 * (1 + cos(pi t / T_end)) of each layer's kept weights "
                                   "of least magnitude by as many new ones (RigL: largest |dense gradient|; "
                                   "SET: at random), grown at zero with fresh optimiser moments. Per-layer "
                                   "counts stay exact; final_masks.safetensors holds the masks it ends with.")
    g = p.add_argument_group("dynamic sparsity")
    g.add_argument("--method", choices=DST_METHODS, required=True,
                   help="rigl: grow by the largest |gradient of the loss w.r.t. the masked weight|; "
                        "set: grow at random")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--start", type=existing_file, metavar="MASKS",
                       help="masks.safetensors to start from (e.g. an `mcwt sample` run's); its "
                            "per-layer counts are kept")
    add_mask_target_args(g, start, pruned="pruned in the random start")
    g.add_argument("--update-every", type=positive_int, default=100,
                   help="training steps between mask updates (default 100)")
    g.add_argument("--stop-at", type=unit_share, default=0.75,
                   help="share of the training after which the masks stay fixed, in (0, 1] (default 0.75)")
    g.add_argument("--alpha", type=unit_share, default=0.3,
                   help="share of each layer's kept weights replaced at the first update, "
                        "cosine-annealed to 0 at --stop-at, in (0, 1] (default 0.3)")
    g.add_argument("--mask-seed", type=seed,
                   help="seed of the random start and of SET's growth (default: --seed)")
    g.add_argument("--init", type=existing_file,
                   help="initial weights (default: the init.safetensors next to --start if there is "
                        "one, else a fresh init from --seed)")
    add_out_arg(p)


# --- ablate (winning-ticket ablations) -------------------------------------------------------------

def add_ablate_parser(subparsers) -> None:
    from .ablate import KINDS as ABLATIONS

    p = command_parser(subparsers, commands.ablate_cmd, "ablate", train=True,
                       help="winning-ticket ablations: shuffled mask, fresh weights, shuffled kept values",
                       description="Change one thing of a winning ticket and train it like any ticket: "
                                   "shuffle-mask permutes each layer's mask; reinit keeps the mask with fresh "
                                   "initial weights; shuffle-values permutes the kept initial values among "
                                   "the kept positions of each layer. Trains with the ticket's seed.")
    add_ticket_args(p)
    p.add_argument("--kind", choices=ABLATIONS, required=True, help="which ablation")
    p.add_argument("--ablation-seed", type=seed,
                   help="seed of the permutation or of the fresh weights (default: the ticket's seed; "
                        "reinit: 10000 + the ticket's seed)")
    add_out_arg(p)


# --- fit -----------------------------------------------------------------------------------------

def add_fit_parser(subparsers) -> None:
    p = command_parser(subparsers, commands.fit_cmd, "fit",
                       help="fit the logistic keep-models to a winning ticket",
                       description="Fit the four logistic models ({conv, linear} x {magnitude, "
                                   "magnitude + connectivity}) of 'kept in the ticket' on the "
                                   "ticket's initial weights and the connectivity measured on "
                                   "its training data. Writes JSON.")
    add_ticket_args(p)
    p.add_argument("--max-samples", type=positive_int,
                   help="measure connectivity on this many training images (default: all)")
    p.add_argument("--max-weights", type=positive_int, default=200_000,
                   help="weights per layer the regression sees, a seeded subsample (default 200000)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="kind",
                   help="kind: one model per layer kind on normalised features (the paper's, default); "
                        "layer: one model per layer; pooled-raw: raw |w| pooled per kind")
    p.add_argument("--device", type=device_spec,
                   help="torch device connectivity is measured on (default cpu)")
    p.add_argument("--out", type=Path, required=True, help="the fit's JSON file")
    p.set_defaults(out_kind="file")  # what check_out and the --out errors call it


# --- sample --------------------------------------------------------------------------------------

def add_sample_parser(subparsers) -> None:
    p = command_parser(subparsers, commands.sample_cmd, "sample", model_data=True,
                       help="sample a Monte Carlo Winning Ticket from a fit",
                       description="Sample masks greedily, layer by layer from input to output: "
                                   "each layer's connectivity is measured on the net masked so "
                                   "far, its intercept calibrated to the target density, its mask "
                                   "drawn with the fused Bernoulli kernel. Writes a run directory "
                                   "that `mcwt train --masks OUT/masks.safetensors` trains.")
    p.add_argument("--fit", type=existing_file, required=True, help="fit JSON from `mcwt fit`")
    p.add_argument("--init", type=existing_file,
                   help="initial weights (default: a fresh init from --seed)")
    add_mask_target_args(p, pruned="to prune")
    p.add_argument("--no-connectivity", dest="use_connectivity", action="store_false",
                   help="magnitude-only models (the paper's 'MCWT w/o connectivity')")
    p.add_argument("--exact", action="store_true",
                   help="keep exactly round(n * (1 - sparsity)) weights per layer (default: Bernoulli)")
    p.add_argument("--max-samples", type=positive_int,
                   help="measure connectivity on this many training images (default: all)")
    p.add_argument("--device", type=device_spec, default="cpu", help="torch device (default cpu)")
    add_out_arg(p)


# --- plot ----------------------------------------------------------------------------------------

def add_plot_parser(subparsers) -> None:
    p = command_parser(subparsers, commands.plot_cmd, "plot",
                       help="the paper's Fig. 1 and Fig. 2b for a ticket and samples",
                       description="Fig. 1: initial values of kept weights (dense, WT, MCWT); "
                                   "Fig. 2b: connectivity of kept weights (WT, MCWT, random). "
                                   "PNG with the numbers beside it as JSON.")
    add_ticket_args(p)
    p.add_argument("--mcwt", type=Path, required=True, help="an `mcwt sample` run directory")
    p.add_argument("--random", type=Path, help="an `mcwt random` run directory (default: random "
                                               "masks of the same sparsity drawn here)")
    p.add_argument("--max-samples", type=positive_int, default=2000,
                   help="training images connectivity is measured on (default 2000)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG and JSON files")
    p.set_defaults(out_kind="folder")


# --- reproduce -----------------------------------------------------------------------------------

def add_reproduce_parser(subparsers) -> None:
    from .experiments import PROTOCOLS
    from .experiments.grid import EXECUTORS, parse_pack
    from .precision import PRECISIONS
    from .experiments.ray_executor import parse_ray_address
    from .experiments.shards import parse_shard

    p = command_parser(
        subparsers, commands.reproduce_cmd, "reproduce", help="the paper's Table 1, figures and cost, resumable",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per architecture and seed: IMP (whose round 0 is the dense net and whose last round "
                    "is the winning ticket), random pruning, the fit on the ticket, MCWT without and with "
                    "connectivity; every pruned net at 80% per layer from the same initial weights.\n"
                    "Writes OUT/table.md|csv (mean ± std over seeds beside the paper's numbers), "
                    "OUT/cost.md|csv and OUT/figures/. Rerun the same command to resume: finished "
                    "cells are skipped.\n\nProtocols:\n"
                    "  full     Frankle & Carbin: 20K/25K/30K iterations, IMP rates conv 10% (conv6 15%), "
                    "linear 20%, output 10%\n"
                    "  paper    IMP as in full; the five Table 1 trainings run the MCWT paper's 300 epochs at "
                    "each arch's batch size (225,000 iterations for conv2/4/6, 105,469 for resnet20)\n"
                    "  reduced  for CPUs: a twentieth of the iterations, evaluation every 200, IMP rates 60% (two "
                    "rounds to 80%), "
                    "connectivity on 10,000 images")
    p.add_argument("--arch", type=arch_list, default=["conv2"],
                   help=f"comma list of {', '.join(ARCHS)} (default conv2)")
    p.add_argument("--dataset", choices=list(DATASETS), default="digits",
                   help=f"default digits; {dataset_help()}")
    p.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds 0..N-1 per architecture (default 2)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="reduced",
                   help="full, paper or reduced (default reduced)")
    p.add_argument("--iterations", type=positive_int,
                   help="override the protocol's training iterations (e.g. short runs on digits)")
    p.add_argument("--eval-every", type=positive_int,
                   help="override the protocol's iterations between evaluations")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="cells run in parallel processes, each with cores/jobs threads (default 1); with "
                        "--executor ray and --device cuda: cells that share one GPU")
    p.add_argument("--device", type=device_spec, default="cpu", help="torch device (default cpu)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data-root through torchvision if it is absent")
    p.add_argument("--pack", type=library_type(parse_pack), default="auto",
                   help="nets trained in lockstep per pack (IMP round r of every seed, the random and "
                        "MCWT cells): auto (default: all ready ones on CUDA, none on CPU, where packs "
                        "measured no faster) or N; 1 trains every cell on its own. A training no pack can take "
                        "(batch norm, SGD or a schedule, augmentation, bf16) trains on its own, said once")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (default): this process runs the cells (--jobs, --pack); ray: every cell "
                        "(with packs, every pack of cells) is a Ray task, started when the cells it needs "
                        "are done, retried if its process or node dies; needs the ray extra "
                        "(pip install '.[ray]')")
    p.add_argument("--ray-address", type=library_type(parse_ray_address), metavar="HOST:PORT",
                   help="with --executor ray: join this Ray cluster (`ray start --head` prints it; "
                        "ray://HOST:PORT for Ray Client, auto for the one on this node); default: a "
                        "local Ray instance for this run. --out must be on storage every node sees")
    p.add_argument("--shard", type=library_type(parse_shard), metavar="I/N",
                   help="run the I-th of N shares of the grid (a job array over a shared --out): whole "
                        "chains (an architecture's seed with every cell that needs its cells), so no "
                        "shard waits for another; the shard that finds every chain done writes the tables")
    p.add_argument("--lock-timeout", type=positive_int, default=600, metavar="SECONDS",
                   help="with --shard: a cell lock (the guard against two tasks writing one cell) "
                        "held on another host and not refreshed for this long is taken over (default 600)")
    p.add_argument("--import-state", type=Path, metavar="FILE",
                   help="before the grid, restore the state bundle FILE (from --export-state) into --out")
    p.add_argument("--export-state", type=Path, metavar="FILE",
                   help="after the grid (also when stopped by Ctrl-C, SIGTERM or a timeout) write --out's "
                        "state (masks as bits, metrics, summaries; when cells train one by one, also the "
                        "checkpoints of unfinished trainings) to the bundle FILE, to resume elsewhere")
    p.add_argument("--export-every-minutes", type=positive_float, metavar="M",
                   help="with --export-state: also rewrite the bundle (atomically, checkpoints included) "
                        "while the grid runs, so a kill (a preempted machine, a job's time limit) loses at "
                        "most about M minutes of training; trainings then checkpoint every M/2 minutes")
    p.add_argument("--time-budget", type=positive_int, metavar="SECONDS",
                   help="stop the grid SECONDS after the start, export (--export-state) and exit 0. Cell by "
                        "cell, the training under way checkpoints and stops, and resumes from the bundle "
                        "elsewhere; with packs, only a pack that can finish (else reach a checkpoint) in the "
                        "time left starts, conv2 first")
    p.add_argument("--augment", choices=AUGMENTS,
                   help="training-batch augmentation of every architecture: flip-crop (open_lth's random "
                        "flip and 4-pixel padded crop) or none (default: each architecture's own, "
                        "flip-crop for resnet20, none for conv2/4/6)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="training arithmetic of every cell: fp32 (default) or bf16 (forward and loss "
                        "autocast to bfloat16, weights and optimiser state float32: about 2x faster on a "
                        "CPU with AVX512-BF16 or AMX, refused on other CPUs; with --pack its cells train one at a time, as with --pack 1)")
    p.add_argument("--methods", type=methods_spec, default="paper",
                   help="rows: paper (the paper's five, default), all (adds pruning at init per layer "
                        "and global, WT ablations, fit variants, fit transfer, exact count, RigL and SET, random and RigL under ERK) "
                        f"or a comma list of method keys: {methods_help()}")
    p.add_argument("--out", type=Path, required=True, help="grid directory; rerun to resume")
    p.set_defaults(out_kind="grid")


# --- entry point ---------------------------------------------------------------------------------

COMMANDS = [add_train_parser, add_imp_parser, add_random_parser, add_prune_parser, add_dst_parser,
            add_ablate_parser,
            add_fit_parser, add_sample_parser,
            add_plot_parser, add_reproduce_parser]


def build_parser() -> CommandsParser:
    parser = CommandsParser(prog="mcwt", description="Monte Carlo Winning Tickets: find, fit, sample "
                                                     "and train lottery tickets.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    parser.commands = subparsers.choices  # name -> its parser, to report errors under the command
    return parser


def error_line(args, error: Exception) -> str | None:
    """The one line reporting ``error`` if it is the user's: a UsageError, or an OS refusal about a
    path a flag gave (e.g. --out), which names the flag; None for a bug."""
    from .command_inputs import path_error

    if isinstance(error, UsageError):
        return " ".join(str(error).split())
    return path_error(args, error) if isinstance(error, OSError) else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import distributed

    joined = distributed.init(getattr(args, "device", None))  # under torchrun: one group trains one net
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume from {args.out}", file=sys.stderr)
        return 130
    except Exception as e:  # the user's mistake: one line, exit 2; anything else is a bug: exit 1
        line = error_line(args, e)
        if line is None:
            return report_bug(args.command, e, argv)
        parser.commands[args.command].error(line)
    finally:
        if joined:
            distributed.shutdown()


def entry() -> None:
    """The ``mcwt`` command and ``python -m mcwt_ext.cli``: :func:`main`, then exit with its code;
    at once where a grid's cell thread is still alive (interrupted mid-cell: ending it the usual
    way aborts the process). Files are written atomically, so a cell resumes as after a kill."""
    code = main()
    from .experiments.packer import cell_threads_alive

    if cell_threads_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
