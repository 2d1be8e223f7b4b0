"""The flags several ``mcwt`` commands share, and the parser class and sub-parser factory every
command's parser is made with (:mod:`mcwt_ext.cli` defines the commands)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path

from .cli_types import device_spec, int_at_least, positive_float, positive_int, seed, sparsity
from .data import DATASETS
from .models import ARCHS
from .train import TrainConfig

__all__ = ["ArgumentParser", "CommandsParser", "add_model_data_args", "add_train_args", "add_ticket_args",
           "add_out_arg", "add_mask_target_args", "command_parser", "dataset_help"]


class ArgumentParser(argparse.ArgumentParser):
    """Errors as one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandsParser(ArgumentParser):
    """The ``mcwt`` parser: ``commands`` maps a command's name to its parser, which reports an
    unrecognized argument (argparse would report it under ``mcwt``) with the commands whose flag
    it is, or the command's flag it resembles."""

    commands: dict[str, ArgumentParser]

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            hints = "; ".join(filter(None, (self._hint(a, parsed.command) for a in extra)))
            self.commands[parsed.command].error(f"unrecognized arguments: {' '.join(extra)}"
                                                + (f" ({hints})" if hints else ""))
        return parsed

    def _hint(self, arg: str, command: str) -> str | None:
        """Which commands take ``arg`` (``--flag`` or ``--flag=value``), else the flag of ``command``
        it may be a typo of."""
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--"):
            return None
        owners = [f"{self.prog} {name}" for name, p in self.commands.items() if flag in p._option_string_actions]
        if owners:
            return f"{flag} is a flag of: {', '.join(owners)}"
        names = [o[2:] for o in self.commands[command]._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag[2:], names, n=1)  # the names alone: "--" is no likeness
        return f"did you mean --{close[0]}?" if close else None


# --- shared flags ------------------------------------------------------------------------------

def dataset_help() -> str:
    return "; ".join(f"{name}: {spec.help}" for name, spec in DATASETS.items())


def add_model_data_args(p: argparse.ArgumentParser) -> None:
    """--arch, --dataset and its split, --seed: what every command needs to rebuild a model."""
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", choices=sorted(ARCHS), required=True, help="architecture (Frankle & Carbin)")
    g.add_argument("--dataset", choices=list(DATASETS), required=True, help=dataset_help())
    g.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data-root through torchvision if it is absent")
    g.add_argument("--split-seed", type=seed, default=0,
                   help="seed of the train/validation split (default 0)")
    g.add_argument("--val-size", type=positive_int,
                   help="validation images held out of the training set (default: a tenth, 5,000 for CIFAR-10)")
    g.add_argument("--seed", type=seed, default=0,
                   help="seed of the initial weights and of the batch order (default 0)")


def _setting_type(f: dataclasses.Field):
    if f.name == "device":
        return device_spec
    if f.metadata.get("parse") is not None:  # the field's own parser; its ValueError is the message
        def parse(text: str, _parse=f.metadata["parse"]):
            try:
                return _parse(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        parse.__name__ = f.name
        return parse
    return positive_float if f.type in ("float", float) else int_at_least(f.metadata["low"])


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (help from its metadata; --seed is the model's); unset ones
    take the architecture's protocol value."""
    g = p.add_argument_group("training (defaults: the protocol for --arch; on digits 300 iterations, "
                             "evaluation every 20)")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "seed":
            g.add_argument("--" + f.name.replace("_", "-"), type=_setting_type(f), help=f.metadata["help"])


def add_ticket_args(p: argparse.ArgumentParser) -> None:
    """--ticket and where its data lives: what the commands that read a ticket take."""
    p.add_argument("--ticket", type=Path, required=True,
                   help="run directory of the ticket (`mcwt imp --out`): config.json, init.safetensors, "
                        "masks.safetensors")
    p.add_argument("--data-root", type=Path,
                   help="folder holding cifar-10-batches-py/ (default: the ticket's config)")


def add_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True,
                   help="run directory; rerunning the same command on it resumes the run")


def add_mask_target_args(g, sparsity_group=None, *, pruned: str = "pruned", no_train: bool = False) -> None:
    """--sparsity and --distribution (:mod:`mcwt_ext.distribution`): how many weights each layer
    keeps; ``sparsity_group`` holds --sparsity where it excludes another flag; --no-train too."""
    from .distribution import DISTRIBUTIONS

    (sparsity_group or g).add_argument("--sparsity", type=sparsity, default=0.8,
                                       help=f"share of every layer's weights {pruned} (default 0.8)")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default="uniform",
                   help="uniform: every layer pruned to --sparsity (default, the paper's); erk: "
                        "Erdos-Renyi-Kernel (Evci et al. 2020): layer l keeps a share proportional to "
                        "(sum of its weight's dims) / (its weight count), capped at dense; the first layer "
                        "is kept dense (as RigL) and counted, so the net keeps in total exactly what uniform "
                        "keeps (RigL's own total leaves the first layer out); uniform-erk-dense: ERK's "
                        "control: the layers ERK keeps dense kept dense, the others pruned to one share, "
                        "the same total")
    if no_train:
        g.add_argument("--no-train", action="store_true", help="only write masks.safetensors and init.safetensors")


def command_parser(subparsers, func, name: str, *, model_data: bool = False, train: bool = False, **kwargs):
    """The sub-parser of command ``name`` run by ``func``, with the shared flag groups it takes."""
    p = subparsers.add_parser(name, **kwargs)
    p.set_defaults(func=func)
    p.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress output (default: a bar on a terminal, else a line every 30 s "
                        "on stderr; MCWT_PROGRESS_INTERVAL sets the seconds)")
    if model_data:
        add_model_data_args(p)
    if train:
        add_train_args(p)
    return p
