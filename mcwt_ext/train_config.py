"""Training settings: :class:`TrainConfig`, the Frankle & Carbin protocol's values per
architecture, the learning-rate schedule of a run, and when to checkpoint. Each field carries its
help text and parser, from which the command line generates its flags."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .errors import UsageError
from .augment import AUGMENTS, parse_augment
from .models import arch_spec, scheduled_lr
from .precision import PRECISIONS, parse_precision
from .runs import RUNTIME_KEYS

__all__ = ["TrainConfig", "OPTIMIZERS"]


def _setting(default=dataclasses.MISSING, *, help: str, low: int | None = None, parse=None,
             default_factory=dataclasses.MISSING):
    """A TrainConfig field: ``help`` documents it (and its generated CLI flag); ``low`` is an int
    field's least value; ``parse`` turns the flag's text into the value (ValueError if bad)."""
    return field(default=default, default_factory=default_factory,
                 metadata=dict(help=help, low=low, parse=parse))


OPTIMIZERS = ("adam", "sgd")


def _parse_optimizer(text: str) -> str:
    if text not in OPTIMIZERS:
        raise UsageError(f"{text!r} is not one of {', '.join(OPTIMIZERS)}")
    return text


def _parse_milestones(text: str) -> list[int]:
    """``20000,25000`` (or an empty string: none)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{text!r} is not a comma list of iterations") from None


def _parse_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{text} does not lie in [0, 1)")
    return value


def _parse_nonnegative(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < math.inf:
        raise UsageError(f"{text} is not a number >= 0")
    return value


@dataclass(kw_only=True)
class TrainConfig:
    """Training settings; ``for_arch`` fills in the protocol's (Frankle & Carbin, App. H)."""

    iterations: int = _setting(help="training iterations (default 20000 / 25000 / 30000 for "
                                    "conv2 / conv4 / conv6)", low=1)
    lr: float = _setting(help="peak learning rate (default 2e-4 conv2, 3e-4 conv4/conv6, 0.03 resnet20)")
    batch_size: int = _setting(60, help="global batch size (default 60; 128 for resnet20); under "
                                        "torchrun a multiple of the process count", low=1)
    optimizer: str = _setting("adam", help="adam or sgd (default adam; sgd for resnet20)",
                              parse=_parse_optimizer)
    momentum: float = _setting(0.0, help="SGD momentum (default 0; 0.9 for resnet20)",
                               parse=_parse_fraction)
    weight_decay: float = _setting(0.0, help="weight decay (default 0; 1e-4 for resnet20)",
                                   parse=_parse_nonnegative)
    warmup_iterations: int = _setting(0, help="linear learning-rate warm-up over this many "
                                              "iterations (default 0; 20000 for resnet20)", low=0)
    lr_milestones: list[int] = _setting(default_factory=list, parse=_parse_milestones,
                                        help="comma list of iterations at which the learning rate "
                                             "is multiplied by --lr-gamma (default none; "
                                             "20000,25000 for resnet20)")
    lr_gamma: float = _setting(0.1, help="learning-rate factor at each milestone (default 0.1)",
                               parse=_parse_nonnegative)
    augment: str = _setting("none", parse=parse_augment,
                            help="training-batch augmentation: flip-crop (random horizontal flip and "
                                 "4-pixel zero-padded random crop, open_lth's) or none (default none; "
                                 "flip-crop for resnet20)")
    precision: str = _setting("fp32", parse=parse_precision,
                              help="arithmetic of training and evaluation: fp32, or bf16 (forward "
                                   "and loss autocast to bfloat16, channels-last images; weights, "
                                   "gradients and optimiser state float32; on a CPU it needs "
                                   "AVX512-BF16 or AMX) (default fp32)")
    eval_every: int = _setting(100, help="iterations between evaluations (default 100)", low=1)
    checkpoint_every: int = _setting(1000, help="iterations between checkpoints, 0 for none "
                                                "(default 1000)", low=0)
    checkpoint_minutes: float = _setting(5.0, parse=_parse_nonnegative,
                                         help="also checkpoint when this many minutes have passed "
                                              "since the last checkpoint (or the start), 0 for "
                                              "none (default 5); a kill loses at most this much")
    seed: int = _setting(0, help="seed of the batch order", low=0)
    device: str = _setting("cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    num_workers: int = _setting(0, help="DataLoader worker processes assembling batches "
                                        "(default 0: in the main process)", low=0)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            low = f.metadata["low"]
            if low is None:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{f.name} must be an int >= {low}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0 \
                or not math.isfinite(self.lr):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        self.lr = float(self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        for name, low, high in (("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf),
                                ("lr_gamma", 0.0, math.inf), ("checkpoint_minutes", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                raise UsageError(f"{name} must be a number in [{low}, {high}), got {value!r}")
            setattr(self, name, float(value))
        if self.augment not in AUGMENTS:
            raise UsageError(f"augment must be one of {list(AUGMENTS)}, got {self.augment!r}")
        if self.optimizer == "adam" and self.momentum:
            raise UsageError(f"momentum {self.momentum} is SGD's; give optimizer='sgd' (--optimizer sgd)")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        milestones = self.lr_milestones
        if not isinstance(milestones, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) \
                or list(milestones) != sorted(set(milestones)):
            raise UsageError(f"lr_milestones must be increasing ints >= 1, got {milestones!r}")
        self.lr_milestones = list(milestones)  # a list, as in the JSON a resumed run compares with
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise UsageError(f"device {self.device!r} is not a torch device") from None

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> "TrainConfig":
        """The protocol's settings for ``arch``; ``overrides`` set to None are ignored. With
        other ``iterations``, the protocol's warm-up and milestones are scaled to them (unless
        given too), as the reduced protocol needs."""
        spec = arch_spec(arch)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown TrainConfig fields {sorted(unknown)}")
        values = dict(iterations=spec.iterations, lr=spec.lr, batch_size=spec.batch_size,
                      optimizer=spec.optimizer, momentum=spec.momentum,
                      weight_decay=spec.weight_decay, warmup_iterations=spec.warmup_iterations,
                      lr_milestones=list(spec.lr_milestones), lr_gamma=spec.lr_gamma,
                      augment=spec.augment)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "iterations" in given and given["iterations"] != spec.iterations:
            # a shorter (or longer) run keeps the shape of the protocol's schedule
            protocol = cls(**values).scaled(given["iterations"])
            values.update(warmup_iterations=protocol.warmup_iterations,
                          lr_milestones=protocol.lr_milestones)
        values.update(given)
        return cls(**values)

    def scaled(self, iterations: int) -> "TrainConfig":
        """These settings for a run of ``iterations`` instead: the warm-up and the milestones
        scaled by the same factor (the reduced protocol's schedule has the full one's shape)."""
        f = iterations / self.iterations
        milestones = sorted({max(1, round(m * f)) for m in self.lr_milestones})
        return dataclasses.replace(self, iterations=iterations,
                                   warmup_iterations=round(self.warmup_iterations * f),
                                   lr_milestones=milestones)

    def lr_at(self, step: int) -> float:
        """The learning rate of the step taken after ``step`` steps."""
        return scheduled_lr(step, lr=self.lr, warmup_iterations=self.warmup_iterations,
                            milestones=tuple(self.lr_milestones), gamma=self.lr_gamma)

    def checkpoint_due(self, iteration: int, seconds: float) -> bool:
        """Checkpoint after ``iteration`` steps, ``seconds`` after the last checkpoint (or the
        start): every ``checkpoint_every`` steps or ``checkpoint_minutes``, whichever comes first;
        never at the end (the final weights are saved then)."""
        return iteration < self.iterations and (
            bool(self.checkpoint_every) and iteration % self.checkpoint_every == 0
            or bool(self.checkpoint_minutes) and seconds >= 60.0 * self.checkpoint_minutes)

    def identity(self) -> dict:
        """The fields that determine the result (all but the runtime ones: device, num_workers,
        checkpoint_minutes)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_KEYS}
