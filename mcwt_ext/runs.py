"""Run directories: where every command keeps what it makes, written atomically.

Layout (each file optional, depending on the command)::

    config.json           what was run: command, arch, dataset, in_channels, image_size,
                          num_classes, seed, train/IMP settings
    init.safetensors      the model's state_dict at initialisation (all parameters)
    masks.safetensors     {"<module>.weight": bool tensor}, True = kept
    final.safetensors     the state_dict after training
    metrics.csv           one row per evaluation
    summary.json          final / early-stop accuracies; written last, so it marks a finished run
    checkpoints/last.pt   the latest training checkpoint (deleted when training finishes)
    round_XX/             IMP rounds, each a run directory of its own

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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["RunDir", "atomic_write", "load_tensors"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates files 0600, and we want the usual permissions


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``data`` (bytes or text) or ``data(tmp_path)`` fills a temporary
    file next to it, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    METRICS = "metrics.csv"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run directory {str(self.path)!r} exists and is not a directory")

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
            raise ValueError(f"{path} is not valid JSON: {e}") from None

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


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a readable error when it is missing or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
