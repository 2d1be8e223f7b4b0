"""Run directories: every file name a run uses, whether a directory is "the same run", atomic IO.

This is the only module that spells a file name; everything else asks it (like open_lth's
``paths`` and ``desc`` modules). Layout of one run (each file optional, by command)::

    config.json           what was run: command, arch, dataset, in_channels, image_size,
                          num_classes, seed, train/IMP settings; the run's identity
    init.safetensors      the model's state_dict at initialisation (all parameters)
    masks.safetensors     {"<module>.weight": bool tensor}, True = kept
    final.safetensors     the state_dict after training
    weights_XXXXXX.safetensors   the weights after XXXXXX steps (IMP's rewind point)
    metrics.csv           one row per evaluation
    summary.json          final / early-stop accuracies; written last, so it marks a finished run
    checkpoints/last.pt   the latest training checkpoint (deleted when training finishes)
    sample.json           `mcwt sample`: per-layer calibrated intercepts and densities
    imp.json              IMP: its settings, checked on resume
    rewind.safetensors    IMP: the weights after rewind_iteration steps (only when > 0)
    rounds.csv            IMP: one row per round
    round_XX/             IMP: each round a run directory of its own
    .lock                 the process writing the run now (pid, host, since; mcwt_ext.runlock)
    dense/                IMP: the dense row's training where it trains apart from round 0 (a
                          table length whose schedule's start is not the rounds' schedule)

A reproduce grid keeps ``<arch>/seed_<s>/<cell>/`` run directories (the fit cell's model in
``fit.json``), ``table.{md,csv}``, ``cost.{md,csv}`` and ``figures/``.

Tensors are safetensors and configs JSON, so loading a run never executes code. Every write
goes to a temporary file in the same directory and is then ``os.replace``d into place, so a killed
process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UsageError

__all__ = ["RunDir", "atomic_write", "is_temporary_of", "load_tensors", "load_masks", "load_weights",
           "check_identity", "Ticket", "load_ticket", "snapshot_name", "round_name", "round_index", "grid_cell",
           "RUNTIME_KEYS", "GRID_FILES", "FIGURE_FILES"]

#: Config keys that may change between a run and its resumption (where the data lives, which
#: device trains, how batches are assembled, how often by the clock it checkpoints); at any depth
#: of the identity.
RUNTIME_KEYS = frozenset({"data_root", "device", "num_workers", "checkpoint_minutes"})

#: Settings added after runs were made, with the value those older runs used: a stored identity
#: that lacks one of these keys is read as having this value (so old runs still resume).
ADDED_KEYS = {"optimizer": "adam", "momentum": 0.0, "weight_decay": 0.0, "warmup_iterations": 0,
              "lr_milestones": [], "lr_gamma": 0.1, "augment": "none", "allocation": "layer",
              "init_scheme": "glorot-normal", "distribution": "uniform", "precision": "fp32",
              # ERK's total before issue 28: rigl's, the dense first layer outside it (runs made
              # now record mcwt_ext.distribution.ERK_TOTAL, so the two never resume each other)
              "erk_total": "first-layer-outside"}

#: The files a reproduce grid writes at its top level.
GRID_FILES = dict(table_md="table.md", table_csv="table.csv", cost_md="cost.md", cost_csv="cost.csv",
                  methods_csv="methods.csv", overlap_csv="overlap.csv", per_seed_csv="per_seed.csv",
                  layers_csv="layers.csv", figures="figures")

#: The figures (PNG, with their numbers beside them as JSON of the same stem) in a figure folder.
FIGURE_FILES = dict(fig1="fig1_initial_weights.png", fig2b="fig2b_connectivity.png",
                    curves="val_accuracy.png",
                    cost="accuracy_vs_cost.png")


def snapshot_name(iteration: int) -> str:
    """File (in the run directory) holding the weights after ``iteration`` steps."""
    return f"weights_{iteration:06d}.safetensors"


def round_name(r: int) -> str:
    """IMP's round ``r`` sub-directory."""
    return f"round_{r:02d}"


def round_index(name: str) -> int | None:
    """``r`` when ``name`` is IMP's round ``r`` sub-directory (see :func:`round_name`), else None."""
    prefix = round_name(0)[:-2]
    rest = name[len(prefix):]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def grid_cell(root: str | os.PathLike, arch: str, seed: int, cell: str) -> "RunDir":
    """The run directory of one cell of a reproduce grid."""
    return RunDir(Path(root) / arch / f"seed_{seed}" / cell)


def _flat(config: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def check_identity(stored: Mapping, ours: Mapping, where, mutable=RUNTIME_KEYS) -> None:
    """Raise a UsageError naming every difference between two run identities (nested dicts),
    keys named in ``mutable`` (at any depth) aside. The one test of "is this the same run"."""
    def comparable(config):
        return {k: v for k, v in _flat(config).items() if k.rsplit(".", 1)[-1] not in mutable}
    a, b = comparable(stored), comparable(ours)
    for k in set(b) - set(a):
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ADDED_KEYS and b[k] == ADDED_KEYS[leaf]:
            a[k] = b[k]
    diff = [f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    if diff:
        raise UsageError(f"{where} belongs to another run ({'; '.join(diff)}); "
                         f"use a fresh run directory")


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates files 0600, and we want the usual permissions


def _temporary(path: Path) -> dict:
    return dict(prefix=f".{path.name}.", suffix=".tmp")


def is_temporary_of(file: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``file`` is a temporary file of :func:`atomic_write` writing ``path``."""
    file, path = Path(file), Path(path)
    affixes = _temporary(path)
    return file.parent == path.parent and file.name.startswith(affixes["prefix"]) and \
        file.name.endswith(affixes["suffix"])


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``data`` (bytes or text) or ``data(tmp_path)`` fills a temporary
    file next to it, which then replaces ``path``. Under ``torchrun`` only rank 0 writes (see
    :mod:`mcwt_ext.distributed`); on the other ranks this does nothing."""
    from . import distributed

    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**_temporary(path), dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # on disk before the rename makes it visible
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunDir:
    """A run directory; file names are relative to it. Created on first write."""

    CONFIG = "config.json"
    INIT = "init.safetensors"
    MASKS = "masks.safetensors"
    FINAL = "final.safetensors"
    FINAL_MASKS = "final_masks.safetensors"  # dynamic sparse training: the masks it ended with
    METRICS = "metrics.csv"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    CHECKPOINT = "checkpoints/last.pt"
    SAMPLE = "sample.json"
    CONSTRUCTION = "construction.json"  # wall time of making a mask (pruning at init, ablation)
    FIT = "fit.json"
    IMP = "imp.json"
    REWIND = "rewind.safetensors"
    ROUNDS = "rounds.csv"
    DENSE = "dense"  # IMP: the dense row's training, where it trains apart from round 0
    LOCK = ".lock"  # one process's claim on the run (mcwt_ext.runlock; hidden: state bundles skip it)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"run directory {str(self.path)!r} exists and is not a directory")

    @classmethod
    def open(cls, path: str | os.PathLike, identity: Mapping, *, name: str = CONFIG,
             mutable=RUNTIME_KEYS, optional=()) -> "RunDir":
        """The run directory ``path`` with ``identity`` written to ``name``: a new run, or the
        resumption of the same one (checked with :func:`check_identity`; ``mutable`` keys may
        differ and take their new values). ``optional``: top-level keys of a step a run may skip
        (None, e.g. ``train`` under ``--no-train``): None on either side matches the other side,
        whose value is kept, so a run of masks only resumes into their training and back."""
        rd = cls(path)
        if rd.exists(name):
            stored, identity = rd.load_json(name), dict(identity)
            for key in optional:
                if stored.get(key) is None:
                    stored[key] = identity.get(key)
                elif identity.get(key) is None:
                    identity[key] = stored[key]
            check_identity(stored, identity, rd.file(name), mutable)
        rd.save_json(name, identity)
        return rd

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def subdir(self, name: str) -> "RunDir":
        return RunDir(self.path / name)

    @property
    def config_path(self) -> Path:
        return self.file(self.CONFIG)

    @property
    def init_path(self) -> Path:
        return self.file(self.INIT)

    @property
    def masks_path(self) -> Path:
        return self.file(self.MASKS)

    @property
    def final_path(self) -> Path:
        return self.file(self.FINAL)

    @property
    def metrics_path(self) -> Path:
        return self.file(self.METRICS)

    @property
    def summary_path(self) -> Path:
        return self.file(self.SUMMARY)

    @property
    def checkpoints_dir(self) -> Path:
        return self.file(self.CHECKPOINTS)

    def exists(self, name: str) -> bool:
        return self.file(name).exists()

    def write_text(self, name: str, text: str) -> Path:
        atomic_write(self.file(name), text)
        return self.file(name)

    def save_json(self, name: str, obj) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def load_json(self, name: str):
        path = self.file(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON: {e}") from None

    def save_csv(self, name: str, rows: list[Mapping], fieldnames: list[str] | None = None) -> Path:
        """Write ``rows`` (dicts) as CSV with a header; columns from the first row by default."""
        fieldnames = fieldnames or (list(rows[0]) if rows else [])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return self.write_text(name, buf.getvalue())

    def load_csv(self, name: str) -> list[dict[str, str]]:
        path = self.file(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
        """Save a flat dict of tensors as safetensors (copied to contiguous CPU memory)."""
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        atomic_write(self.file(name), lambda tmp: save_file(flat, tmp, metadata=dict(metadata or {})))
        return self.file(name)

    def load_tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return load_tensors(self.file(name), device)

    def save_or_check_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        """Save ``tensors``, or check that a resumed run saved the same ones (``what`` they are)."""
        if self.exists(name):
            stored = self.load_tensors(name)
            if stored.keys() != tensors.keys() or \
                    not all(torch.equal(stored[k], tensors[k].detach().cpu()) for k in stored):
                raise UsageError(f"{self.file(name)} holds other {what} than this run's; "
                                 f"use a fresh run directory")
        else:
            self.save_tensors(name, tensors)

    def round(self, r: int) -> "RunDir":
        """IMP's round ``r``."""
        return self.subdir(round_name(r))

    def imp_dense(self) -> "RunDir":
        """IMP's dense training (the "Unpruned network" row): its own sub-directory where it
        trains apart from round 0 (:meth:`mcwt_ext.imp.ImpConfig.dense_apart`), else round 0."""
        apart = self.subdir(self.DENSE)
        return apart if apart.path.is_dir() else self.round(0)

    def ticket_round(self) -> int:
        """The last round of a finished IMP run: the one that trained the winning ticket."""
        return self.load_json(self.SUMMARY)["rounds"][-1]["round"]

    def done(self) -> bool:
        """Finished: its summary is written last."""
        return self.exists(self.SUMMARY)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a readable error when it is missing or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UsageError(f"{path} is not a readable safetensors file: {e}") from None


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A mask set (``masks.safetensors``): bool tensors, checked."""
    masks = load_tensors(path)
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise UsageError(f"{path}: masks must be bool tensors, {bad} are not")
    return masks


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model``, naming the first mismatch when it belongs to another
    model."""
    state, ours = load_tensors(path), model.state_dict()
    for name in sorted(set(state) | set(ours)):
        if name not in state or name not in ours or state[name].shape != ours[name].shape:
            theirs = tuple(state[name].shape) if name in state else "absent"
            mine = tuple(ours[name].shape) if name in ours else "absent"
            raise UsageError(f"{path} does not fit the model: {name} is {theirs} "
                             f"there, {mine} in the model")
    model.load_state_dict(state)


@dataclass
class Ticket:
    """A finished run's config, its model at initialisation and its masks (a ticket)."""

    run: RunDir
    config: dict
    model: torch.nn.Module
    masks: dict[str, torch.Tensor] | None


def load_ticket(path: str | os.PathLike, *, masks: bool = True) -> Ticket:
    """The model (rebuilt from ``config.json``, with the run's initial weights) and, with
    ``masks``, the masks of the run directory ``path``; readable errors when a part is missing."""
    from .models import build_model_from_config

    rd = RunDir(path)
    if not rd.exists(RunDir.CONFIG):
        raise UsageError(f"{path} is not a run directory (no {RunDir.CONFIG})")
    config = rd.load_json(RunDir.CONFIG)
    model = build_model_from_config(config)
    load_weights(model, rd.init_path)
    if masks and not rd.exists(RunDir.MASKS):
        raise UsageError(f"{path} has no {RunDir.MASKS} (is IMP finished?)")
    return Ticket(rd, config, model, load_masks(rd.masks_path) if masks else None)
