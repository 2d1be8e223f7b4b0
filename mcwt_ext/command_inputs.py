"""What the ``mcwt`` commands share: their inputs read and checked (data, model, masks, ticket,
settings) before anything is written, and their run directory opened (:func:`opened`: a new run,
or the same one resumed) under its lock (:mod:`mcwt_ext.runlock`), removed again if the command
fails in a directory it made that holds nothing but the run's starting files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

import torch

from . import distributed
from . import masks as masks_lib
from .data import DATASETS, Dataset, load_dataset
from .errors import UsageError
from .models import ARCHS, build_model
from .precision import check_precision
from .runlock import check_free, holding, sigterm_as_interrupt
from .runs import RunDir, is_temporary_of, load_masks, load_ticket, load_tensors, load_weights
from .train import TrainConfig


def check_data_root(dataset: str, data_root: Path | None) -> None:
    if DATASETS[dataset].needs_root and data_root is None:
        raise UsageError(f"--dataset {dataset} needs --data-root DIR (the folder holding "
                         f"cifar-10-batches-py/)")


@contextlib.contextmanager
def flag(name: str, path=None):
    """The block reads and checks the input of flag ``name`` (the file ``path``) and nothing else,
    so what fails in it is that input's fault: a UsageError naming the flag. That covers the
    library's ValueErrors about what it was handed, an OS refusal to read it and, for a file, a
    run directory's JSON that lacks a key or has the wrong shape."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as e:
        if path is None:
            raise
        raise UsageError(f"{name} {path}: not a readable run ({type(e).__name__}: {e})") from None
    except (ValueError, OSError) as e:
        raise UsageError(_named(name, path, e)) from None


def _named(name: str, path, error: Exception) -> str:
    """``error``'s message after the flag (and the file, unless the message names it)."""
    message = str(error).removeprefix(name.lstrip("-") + ": ")  # the library's name for it
    return f"{name}: {message}" if path is None or str(path) in message else f"{name} {path}: {message}"


#: The files a run writes before any work: a run holding only these has lost nothing.
START_FILES = frozenset({RunDir.CONFIG, RunDir.INIT, RunDir.MASKS, RunDir.IMP, RunDir.CONSTRUCTION})


def _is_fresh(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and all(p.name == RunDir.LOCK for p in path.iterdir()))


def _holds_only_starts(path: Path) -> bool:
    return all(p.is_dir() or p.name in START_FILES or p.name == RunDir.LOCK for p in path.rglob("*"))


@contextlib.contextmanager
def locked(path: Path, what: str | None, lock: bool = True):
    """Hold ``path``'s run lock (process 0 under torchrun: it alone writes) with SIGTERM taken as
    Ctrl-C, so the lock is released however the command ends."""
    hold = holding(path, f"--out {path}", what) if lock and distributed.is_main() else None
    with sigterm_as_interrupt(), hold or contextlib.nullcontext():
        yield


@contextlib.contextmanager
def opened(path: Path, identity: dict | None = None, *, lock: bool = True, **kwargs):
    """The run directory ``path``, locked (unless not ``lock``), opened with ``identity`` (None:
    the caller opens it). If the command fails in a directory it made and nothing but starting
    files are there, the directory goes again, so the retry is not refused as "another run"."""
    with locked(path, f"mcwt {identity['command']}" if identity and "command" in identity else None, lock):
        fresh = _is_fresh(path)
        try:
            yield RunDir.open(path, identity, **kwargs) if identity is not None else RunDir(path)
        except BaseException:
            if fresh and path.is_dir() and _holds_only_starts(path):
                shutil.rmtree(path)
            raise


#: What a command writes to --out (``check_out``'s kind), as its messages call it; a grid
#: directory is checked as a run directory.
OUT_KINDS = {"run": "run directory", "grid": "grid directory", "file": "file", "folder": "folder"}


def _existing_parent(path: Path) -> Path | None:
    return next((p for p in path.absolute().parents if p.exists()), None)


def _out_message(path: Path, reason: str, kind: str, name: str) -> str:
    """``name path: reason (what could not be done)``: the creation (in the folder that exists) of
    a new ``path``, or the writing in an existing one."""
    noun = OUT_KINDS[kind]
    if path.is_dir() and kind != "file":
        return f"{name} {path}: {reason} (cannot write in the {noun})"
    doing = "write" if path.exists() else "create"
    return f"{name} {path}: {reason} (cannot {doing} the {noun} in {_existing_parent(path)})"


def out_error(path: Path, error: OSError, kind: str = "run", name: str = "--out") -> str | None:
    """The one-line message of ``error``, an OS refusal to create or write ``path`` (flag
    ``name``, of ``kind``), in plain words; None when ``error`` concerns another file."""
    if error.filename is None:
        return None
    failed, out = Path(os.fsdecode(error.filename)).absolute(), path.absolute()
    made = failed in out.parents and not failed.exists()  # a folder above it, to create
    if not (failed == out or out in failed.parents or made or is_temporary_of(failed, out)):
        return None
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return _out_message(path, reason, kind, name)


#: Path flags mcwt writes (beside --out, whose kind is the parser's ``out_kind``) and what they
#: are; any other Path flag is read.
WRITTEN_FLAGS = {"export_state": "file"}


def _read_error(path: Path, error: OSError, name: str) -> str | None:
    """``name path: reason``, when ``error`` is the OS refusing to read ``path`` or a file in it."""
    failed, given = Path(os.fsdecode(error.filename)).absolute(), path.absolute()
    if failed != given and given not in failed.parents:
        return None
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return f"{name} {path}: {reason}" + (f" ({failed})" if failed != given else "")


def path_error(args, error: OSError) -> str | None:
    """The one line of ``error`` when it concerns a path a flag of ``args`` gave (naming the flag):
    the user's folder refused, not a bug; None when it concerns no such path."""
    if not isinstance(error.filename, (str, bytes, os.PathLike)):  # none, or a file descriptor
        return None
    written_first = sorted(vars(args).items(), key=lambda kv: (kv[0] != "out", kv[0] not in WRITTEN_FLAGS))
    for dest, value in written_first:  # --out before a flag that reads a folder holding it
        if not isinstance(value, Path):
            continue
        name = "--" + dest.replace("_", "-")
        kind = getattr(args, "out_kind", "run") if dest == "out" else WRITTEN_FLAGS.get(dest)
        line = out_error(value, error, kind, name) if kind else _read_error(value, error, name)
        if line is not None:
            return line
    return None


def check_out(path: Path, name: str = "--out", *, kind: str = "run") -> None:
    """``path`` can take what the command writes: a run directory, a grid directory, a file or a
    folder (``kind``, see :data:`OUT_KINDS`)."""
    parent = _existing_parent(path)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{name} {path}: {parent} is a file, not a directory")
    if kind == "file" and path.is_dir():
        raise UsageError(f"{name} {path} is a directory; give a file name")
    if kind != "file" and path.exists() and not path.is_dir():
        raise UsageError(f"{name} {path} is a file, not a {OUT_KINDS[kind]}")
    where = path if kind != "file" and path.is_dir() else parent
    if where is not None and not os.access(where, os.W_OK | os.X_OK):  # now, not after the slow part
        raise UsageError(_out_message(path, "permission denied", kind, name))
    if kind in ("file", "folder"):
        return
    if not _is_fresh(path) and not (path / RunDir.CONFIG).is_file():
        raise UsageError(f"{name} {path} holds files but no {RunDir.CONFIG}: not a {OUT_KINDS[kind]}; "
                         f"give a new or empty directory")
    if distributed.is_main():
        check_free(path, f"{name} {path}")  # refused now, before the slow preparations


def load_data(args) -> Dataset:
    check_data_root(args.dataset, args.data_root)
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
    check_precision(cfg.precision, cfg.device)  # likewise
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


def check_fits(arch: str, ds: Dataset, model, tensors: dict, path: Path, name: str, masks: bool) -> None:
    """Check masks or weights read from ``path`` (flag ``name``) against ``model`` (an ``arch``);
    when they do not fit, say whose they are."""
    try:
        if masks:
            masks_lib.check_masks(model, tensors)
        else:
            load_weights(model, path)
    except ValueError as e:  # the library's check of what the user's file holds: a usage error
        other = _architecture_of(tensors, ds, masks)
        if other is not None and other != arch:
            what = "masks" if masks else "weights"
            raise UsageError(f"{name} {path} holds the {what} of a {other} on {ds.name}, "
                             f"not of a {arch}") from None
        raise UsageError(_named(name, path, e)) from None


def read_masks(args, ds: Dataset, model, path: Path, name: str = "--masks") -> dict:
    with flag(name):
        masks = load_masks(path)
    check_fits(args.arch, ds, model, masks, path, name, masks=True)
    return masks


def check_batch_size(cfg: TrainConfig, ds: Dataset) -> None:
    if cfg.batch_size > len(ds.train):
        raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(ds.train)} training images")


def data_and_model(args, init: Path | None = None, name: str = "--init") -> tuple[Dataset, torch.nn.Module]:
    """The dataset and the model: a fresh init from --seed, or the weights of ``init``."""
    ds = load_data(args)
    model = build_model(args.arch, ds.in_channels, ds.num_classes, ds.image_size, args.seed)
    if init is not None:
        with flag(name):
            tensors = load_tensors(init)
        check_fits(args.arch, ds, model, tensors, init, name, masks=False)
    return ds, model


def run_config(args, ds: Dataset, **extra) -> dict:
    """``config.json``: enough to rebuild the model (``build_model_from_config``) and the data."""
    return dict(command=args.command, arch=args.arch, dataset=args.dataset,
                data_root=str(args.data_root.resolve()) if args.data_root else None,
                split_seed=args.split_seed, val_size=args.val_size, in_channels=ds.in_channels,
                image_size=ds.image_size, num_classes=ds.num_classes, seed=args.seed,
                init_scheme=ARCHS[args.arch].init, **extra)


def resolved(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None


def save_starts(rd: RunDir, model: torch.nn.Module, masks: dict | None) -> None:
    """The initial weights and (if any) the masks a run trains from, saved or checked."""
    rd.save_or_check_tensors(RunDir.INIT, model.state_dict(), "initial weights")
    if masks is not None:
        rd.save_or_check_tensors(RunDir.MASKS, masks, "masks")


def ticket_data(ticket, data_root: Path | None) -> Dataset:
    """The dataset a ticket was trained on (``data_root`` overrides where it lives)."""
    config = ticket.config
    root = data_root or (Path(config["data_root"]) if config.get("data_root") else None)
    return load_dataset(config["dataset"], root, split_seed=config.get("split_seed", 0),
                        val_size=config.get("val_size"))


def ticket_and_data(args):
    """The ticket of --ticket and its dataset (--data-root overriding the ticket's)."""
    with flag("--ticket", args.ticket):
        ticket = load_ticket(args.ticket)
        if not isinstance(ticket.config.get("seed"), int):
            raise UsageError(f"{RunDir.CONFIG} has no int seed")
    with flag("--data-root" if args.data_root else "--ticket", args.data_root or args.ticket):
        return ticket, ticket_data(ticket, args.data_root)
