"""Datasets as in-memory, normalised tensors with a seeded train/validation split.

Splits (the held-out validation part drives early stopping, as in the protocol):

========== ============================ ========== ========== =========
name       source                        train      val        test
========== ============================ ========== ========== =========
cifar10    ``cifar-10-batches-py`` files 45,000     5,000      10,000
digits     ``sklearn.datasets``, 1x8x8   1,350      150        297
synthetic  generated, 3x8x8, 10 classes  450        50         100
========== ============================ ========== ========== =========

The validation part is ``val_size`` images (default: a tenth of the training images) drawn by a
``torch.Generator`` seeded with ``split_seed``; the rest is the training split. CIFAR-10's test
set is the official one; digits has none, so a fixed 297 images (chosen with seed 0, whatever
``split_seed`` is) are held out as its test set. Images are scaled to [0, 1], then normalised per
channel with the mean and std of the training split.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import MissingFileError, UsageError
from .validate import check_seed

__all__ = ["Dataset", "DatasetSpec", "DATASETS", "load_dataset", "load_cifar10_batches"]

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
_DIGITS_TEST = 297
_SYNTHETIC = dict(train=500, test=100, channels=3, size=8, classes=10)


@dataclass
class Dataset:
    """Train/val/test splits as ``TensorDataset(images NCHW float32, labels int64)``."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def astype(self, dtype: torch.dtype) -> "Dataset":
        """A copy with every split's images in ``dtype`` (labels untouched): ``astype(torch.float64)``
        and ``model.double()`` train in float64, as the tests that compare two computation paths do."""
        def cast(split: TensorDataset) -> TensorDataset:
            x, y = split.tensors
            return TensorDataset(x.to(dtype), y)
        return dataclasses.replace(self, train=cast(self.train), val=cast(self.val), test=cast(self.test))

    def example_input(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training images, e.g. to trace a model's forward order."""
        return self.train.tensors[0][:n]


# --- CIFAR-10 --------------------------------------------------------------------------------

# The only globals a CIFAR-10 batch pickle needs: numpy's array reconstruction. Anything else
# (e.g. os.system) is refused, so a tampered file cannot run code.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes under protocol 2: a data transform, no code
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


_CIFAR_KEYS = {"data", "labels", "batch_label", "filenames"}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 N x 3 x 32 x 32, int64 N), checking keys, shapes and labels."""
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"{path} is not a CIFAR-10 batch pickle: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    missing, unknown = {"data", "labels"} - set(batch), set(batch) - _CIFAR_KEYS
    if missing or unknown:
        raise UsageError(f"{path}: expected keys data, labels (and optionally batch_label, "
                         f"filenames); missing {sorted(missing)}, unexpected {sorted(map(str, unknown))}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UsageError(f"{path}: data must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):
        raise UsageError(f"{path}: labels are not a list of ints") from None
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"{path}: labels must be {len(data)} ints, got {labels.dtype} of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UsageError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_dir(data_root: str | os.PathLike) -> Path:
    root = Path(data_root)
    return root if root.name == CIFAR_DIR else root / CIFAR_DIR


def load_cifar10_batches(data_root: str | os.PathLike, download: bool = False):
    """Read ``data_root/cifar-10-batches-py`` -> ((x_train, y_train), (x_test, y_test)) as numpy.

    ``data_root`` may also be the ``cifar-10-batches-py`` folder itself. The files' md5 sums are
    not checked, so faithful re-encodings of the data load too.
    """
    folder = _cifar_dir(data_root)
    names = CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,)
    if not all((folder / n).is_file() for n in names) and download:
        from torchvision.datasets import CIFAR10  # only needed for the download
        try:
            CIFAR10(str(folder.parent), train=True, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive a RuntimeError
            reason = getattr(e, "reason", None) or e
            raise UsageError(f"could not download CIFAR-10 into {folder.parent} (--download): "
                             f"{reason}".replace("\n", " ")) from None
    absent = [n for n in names if not (folder / n).is_file()]
    if absent:
        raise MissingFileError(
            f"CIFAR-10 files {absent} not found in {folder}: put the python-version batches "
            f"(data_batch_1..5, test_batch, as in cifar-10-python.tar.gz) in "
            f"<data_root>/{CIFAR_DIR}/, or pass download=True (--download) to fetch them")
    train = [_read_cifar_batch(folder / n) for n in CIFAR_TRAIN_BATCHES]
    test = _read_cifar_batch(folder / CIFAR_TEST_BATCH)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test


# --- other sources ---------------------------------------------------------------------------

def _digits():
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).numpy()
    test, train = order[:_DIGITS_TEST], order[_DIGITS_TEST:]
    return (x[train], y[train]), (x[test], y[test])


def _synthetic():
    """Class prototypes plus noise: separable, so a few dozen iterations learn it."""
    s = _SYNTHETIC
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(s["classes"], s["channels"], s["size"], s["size"], generator=g)

    def draw(n):
        y = torch.randint(s["classes"], (n,), generator=g)
        x = prototypes[y] + 0.15 * torch.randn(n, s["channels"], s["size"], s["size"], generator=g)
        return x.clamp(0, 1).numpy(), y.numpy()

    return draw(s["train"]), draw(s["test"])


def _cifar10(data_root, download):
    if data_root is None:
        raise UsageError(f"cifar10 needs data_root: the folder holding {CIFAR_DIR}/")
    (x, y), (x_test, y_test) = load_cifar10_batches(data_root, download)
    return (x.astype(np.float32) / 255.0, y), (x_test.astype(np.float32) / 255.0, y_test)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``load(data_root, download)`` returns ``((x, y), (x_test, y_test))``,
    images float32 NCHW in [0, 1], labels int64."""

    load: Callable
    num_classes: int
    needs_root: bool
    help: str
    #: TrainConfig defaults of this dataset, over the architecture's protocol (CIFAR-10: none)
    train_defaults: Mapping[str, int] = field(default_factory=dict)


#: The dataset registry (like the models' ARCHS): name -> how to load it.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(_cifar10, 10, True, "CIFAR-10 (needs --data-root)"),
    # digits: the short protocol of the README's main job (300 batches of 60 are 13 epochs of
    # its 1,350 training images; one of its 150 validation images is 0.67 points)
    "digits": DatasetSpec(lambda root, download: _digits(), 10, False,
                          "scikit-learn digits, 1x8x8, offline",
                          dict(iterations=300, eval_every=20)),
    "synthetic": DatasetSpec(lambda root, download: _synthetic(), _SYNTHETIC["classes"], False,
                             "generated, 3x8x8, tiny"),
}


# --- split and normalisation -------------------------------------------------------------------

def _split(n: int, val_size: int | None, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    val_size = n // 10 if val_size is None else val_size
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 1 <= val_size < n:
        raise UsageError(f"val_size must be an int in [1, {n - 1}] for {n} training images, got {val_size!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def load_dataset(name: str, data_root: str | os.PathLike | None = None, *, split_seed: int = 0,
                 val_size: int | None = None, download: bool = False) -> Dataset:
    """Load a registered dataset (:data:`DATASETS`) with the split described above."""
    check_seed(split_seed, "split_seed")
    if name not in DATASETS:
        raise UsageError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    spec = DATASETS[name]
    (x, y), (x_test, y_test) = spec.load(data_root, download)
    num_classes = spec.num_classes
    x, x_test = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(x_test))
    y, y_test = torch.from_numpy(y), torch.from_numpy(y_test)
    train_idx, val_idx = _split(len(y), val_size, split_seed)
    x_train = x[train_idx]
    std, mean = torch.std_mean(x_train.transpose(0, 1).flatten(1), dim=1, correction=0)
    std = std.clamp_min(1e-6)  # a constant channel would divide by zero

    def norm(t):
        return ((t - mean[:, None, None]) / std[:, None, None]).contiguous()

    return Dataset(
        name=name,
        train=TensorDataset(norm(x_train), y[train_idx]),
        val=TensorDataset(norm(x[val_idx]), y[val_idx]),
        test=TensorDataset(norm(x_test), y_test),
        in_channels=x.shape[1], image_size=x.shape[2], num_classes=num_classes,
        mean=tuple(mean.tolist()), std=tuple(std.tolist()),
    )
