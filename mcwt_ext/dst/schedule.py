"""Dynamic sparse training: the masks change while the net trains (RigL, SET).

:class:`MaskSchedule` is the step hook :func:`mcwt_ext.train.train` calls (see
:class:`mcwt_ext.train.StepHook`), with the control flow of google-research/rigl
(``sparse_optimizers.py``; global step ``g`` = optimiser steps done, ``end = stop_at * iterations``,
``ΔT = update_every``):

- **RigL** updates the masks *instead of* an optimiser step (``cond_mask_update_op(g,
  apply_gradient_op)``) at ``g = 0, ΔT, 2ΔT, ... <= end``: the first update comes before any
  training, with the full drop fraction ``alpha``. The update drops the smallest kept weights and
  grows where the batch's dense gradient is largest; the gradient is dense because pruned
  weights are exactly zero, so the gradient with respect to the weight is that with respect to
  the masked weight at every position. Then the optimiser step ``g`` follows, on the new masks.
  The reference draws the next batch for that step; here it reuses the update's batch (one
  forward/backward more per update, and every optimiser step of the training is kept: the
  reference's update iterations do not advance its global step either).
- **SET** steps, then updates (``optimizer_update``, then ``cond_mask_update_op(g, no_op)``), at
  ``g = 1, 1 + ΔT, ... <= end`` after the increment: drop the smallest kept weights, grow at
  random.

Drop fraction ``alpha/2 * (1 + cos(pi * g / end))`` (:func:`~mcwt_ext.dst.rule.drop_fraction`).
Grown weights start at zero and every optimiser state tensor of the weight's shape (Adam's
``exp_avg`` and ``exp_avg_sq``, SGD's momentum) is zeroed where a weight is grown or dropped, as
the reference's ``reset_momentum``. Adam's step count is per tensor and is left as it is (the
reference's TF Adam keeps one ``beta1_power``/``beta2_power`` per optimizer, untouched by
updates), so a grown weight's first update, bias-corrected as step ``t`` of its tensor, is
``(1 - beta1) / (1 - beta1^t) * sqrt((1 - beta2^t) / (1 - beta2))`` times a fresh Adam's first
step: 0.48 at t = 11, 1.41 at t = 220, tending to ``(1 - beta1) / sqrt(1 - beta2)`` = 3.16 at
Adam's defaults only late in training; exactly as in the reference.

SET's grow scores come from a ``torch.Generator`` seeded with ``DstConfig.seed`` (drawn on the CPU,
so every device grows the same positions); its state and the current masks are part of the
training checkpoint, so a killed run resumes bit-identically.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..data import Dataset
from ..masks import random_masks
from ..runs import RunDir, check_identity
from ..train import TrainConfig, TrainResult, train
from ..validate import check_seed
from .rule import drop_and_grow, drop_fraction

__all__ = ["DST_METHODS", "DstConfig", "MaskSchedule", "random_start", "train_dst", "final_masks"]

DST_METHODS = ("rigl", "set")
DST_JSON = "dst.json"  # a run directory's dst settings, checked on resume


@dataclass(frozen=True)
class DstConfig:
    """``method``: rigl (grow by the largest |dense gradient|) or set (grow at random);
    ``update_every``: steps between mask updates; ``stop_at``: share of the training after which
    the masks stay fixed; ``alpha``: the drop fraction of the first update (cosine-annealed to 0
    at ``stop_at``); ``seed``: SET's growth generator."""

    method: str
    update_every: int = 100
    stop_at: float = 0.75
    alpha: float = 0.3
    seed: int = 0
    # 2: the reference's control flow (RigL's first update at step 0, in place of the optimiser
    # step; SET's after the step). A run made by version 1 (every update before a step that
    # trained too, the first one step later) is refused on resume: its settings differ.
    control: int = 2

    def __post_init__(self):
        if self.method not in DST_METHODS:
            raise UsageError(f"method must be one of {list(DST_METHODS)}, got {self.method!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) \
                or self.update_every < 1:
            raise UsageError(f"update_every must be an int >= 1, got {self.update_every!r}")
        for name in ("stop_at", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise UsageError(f"{name} must be a number in (0, 1], got {value!r}")
        check_seed(self.seed, "seed")
        if self.control != 2:
            raise UsageError(f"control must be 2 (the reference's control flow), got {self.control!r}")

    def end(self, iterations: int) -> int:
        """The step count from which the masks stay fixed."""
        return int(self.stop_at * iterations)

    def update_steps(self, iterations: int) -> list[int]:
        """The global steps ``g`` (optimiser steps done) at which the masks change: RigL's
        ``0, ΔT, ... <= end`` (before step ``g + 1``), SET's ``1, 1 + ΔT, ... <= end`` (after step ``g``)."""
        first = 0 if self.method == "rigl" else 1
        return list(range(first, min(self.end(iterations), iterations) + 1, self.update_every))


class MaskSchedule:
    """The step hook of dynamic sparse training (one run of ``iterations`` steps)."""

    def __init__(self, config: DstConfig, iterations: int):
        self.config, self.iterations = config, iterations
        self.end = config.end(iterations)
        self.updates = frozenset(config.update_steps(iterations))  # the one statement of the schedule
        self.generator = torch.Generator().manual_seed(config.seed)
        self.names: list[str] = []

    def bind(self, masks: Mapping[str, torch.Tensor], names: list[str], params: list[nn.Parameter],
             float_masks: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """``masks``: the run's start masks; ``names``, ``params``, ``float_masks``: its layers
        that prune something, with the masks training multiplies by (changed here in place)."""
        self.start = dict(masks)
        self.names, self.params, self.masks, self.optimizer = names, params, float_masks, optimizer

    def before(self, step: int) -> bool:
        """Whether the masks change before step ``step`` (1-based): RigL's updates, from this
        step's batch's dense gradient, in place of an optimiser step."""
        return self.config.method == "rigl" and step - 1 in self.updates

    def after(self, step: int) -> bool:
        """Whether the masks change after step ``step``: SET's updates."""
        return self.config.method == "set" and step in self.updates

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Drop and grow in every masked layer, at step ``step``'s global step (RigL: before it,
        ``p.grad`` holding the dense gradient of its batch; SET: after it)."""
        g = step - 1 if self.config.method == "rigl" else step
        fraction = drop_fraction(g, self.config.alpha, self.end)
        for p, m in zip(self.params, self.masks):
            kept = m.bool()
            if self.config.method == "rigl":
                score = p.grad.abs()
            else:  # drawn on the CPU: the same positions on every device
                score = torch.rand(p.shape, generator=self.generator).to(p.device)
            new = drop_and_grow(kept, p, score, fraction)
            changed = new ^ kept
            p.masked_fill_(~new, 0.0)  # grown weights were pruned ones: they start at zero
            for state in self.optimizer.state.get(p, {}).values():
                if isinstance(state, torch.Tensor) and state.shape == p.shape:
                    state.masked_fill_(changed, 0.0)  # fresh moments
            m.copy_(new)

    def current(self) -> dict[str, torch.Tensor]:
        """The masks now (bool, on the CPU), all layers of the start masks."""
        return dict(self.start, **{n: m.bool().cpu() for n, m in zip(self.names, self.masks)})

    def state_dict(self) -> dict:
        return dict(config=dataclasses.asdict(self.config), masks=self.current(),
                    generator=self.generator.get_state())

    def load_state_dict(self, state: Mapping) -> None:
        check_identity(state["config"], dataclasses.asdict(self.config), "the checkpoint's dst settings",
                       mutable=())
        for n, m in zip(self.names, self.masks):
            m.copy_(state["masks"][n])
        self.generator.set_state(state["generator"])

    def save_final(self, rd: RunDir) -> None:
        rd.save_tensors(RunDir.FINAL_MASKS, self.current())

    def load_final(self, rd: RunDir) -> None:
        self.load_state_dict(dict(config=dataclasses.asdict(self.config), masks=final_masks(rd),
                                  generator=self.generator.get_state()))


def final_masks(rd: RunDir) -> dict[str, torch.Tensor]:
    """The masks a finished dynamic sparse training ended with."""
    return rd.load_tensors(RunDir.FINAL_MASKS)


def random_start(model: nn.Module, density: float | Mapping[str, float], seed: int) -> dict[str, torch.Tensor]:
    """A random start: exactly ``kept_count(n, density)`` weights per layer (a dict: per layer, e.g.
    an allocation's densities; layers it leaves out stay dense)."""
    if isinstance(density, Mapping):
        return random_masks(model, {k: 1.0 - float(d) for k, d in density.items()}, seed)
    return random_masks(model, 1.0 - float(density), seed)


def train_dst(model: nn.Module, dataset: Dataset, masks: Mapping[str, torch.Tensor], config: TrainConfig,
              dst: DstConfig, run_dir: RunDir | str | None = None, progress: bool = True,
              desc: str = "dst") -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """Train ``model`` from the start ``masks`` with masks updated by ``dst``; returns the training's
    result and the final masks (saved as ``final_masks.safetensors`` in ``run_dir``, beside the
    settings in ``dst.json``). Layers that
    ``masks`` leaves dense (or keeps whole) stay dense. Resumes like :func:`mcwt_ext.train.train`."""
    if not masks:
        raise ValueError("masks: dynamic sparse training needs start masks (random_start makes some)")
    if run_dir is not None:  # the dst settings are part of the run's identity
        run_dir = RunDir.open(run_dir, dict(dst=dataclasses.asdict(dst)), name=DST_JSON, mutable=())
    schedule = MaskSchedule(dst, config.iterations)
    result = train(model, dataset, masks, config, run_dir, progress, desc, step_hook=schedule)
    return result, schedule.current()
