"""Iterative magnitude pruning (IMP): the procedure that finds a genuine winning ticket.

Round 0 trains the dense net. Each later round prunes, per layer (or globally over the pruned
layers: ``allocation="global"``, resnet20's), a fixed share of the weights that remain (by lowest
trained magnitude), rewinds the kept weights to their initial values (or
to their values after ``rewind_iteration`` steps of round 0) and trains again. A layer stops at
its target; the round that reaches every target is the winning ticket (WT).

The run directory (file names in :mod:`mcwt_ext.runs`) holds the initial weights, the IMP
settings (checked on resume), one training run per round, the rewind weights (only when
rewind_iteration > 0), one row per round (density, accuracies), the WT masks (the last round's)
and, written last, a summary: rounds, reached_target, WT densities.

Rewound rounds train for the full ``train.iterations`` with a fresh optimiser. With
``table_iterations`` (the paper protocol) the dense round and the ticket train that long, their
schedule scaled to it; where that schedule does not start as the rounds' one (resnet20's warm-up),
round 0 trains the rounds' schedule and the dense row trains apart, in ``dense/``.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UsageError
from .data import Dataset
from . import distributed
from .masks import (dense_masks, dense_state_dict, densities, from_torch_prune, global_goal,
                    global_magnitude_prune, is_torch_pruned, kept_count, layer_kind,
                    load_dense_state_dict, magnitude_prune, next_kept, per_layer, to_torch_prune)
from .models import arch_spec
from .runs import RunDir, round_index, snapshot_name
from .train import TrainConfig, train
from .validate import check_rate, check_sparsity

__all__ = ["ImpConfig", "ImpRun", "run_imp", "round_plan", "layer_targets", "KINDS", "ALLOCATIONS"]

KINDS = ("conv", "linear", "output")
ALLOCATIONS = ("layer", "global")


@dataclass(kw_only=True)
class ImpConfig:
    """IMP settings. ``rates``: share of the remaining weights pruned per round, by layer kind;
    ``sparsity``: the target share pruned, one float for every layer or ``{weight name: float}``
    (layers not named stay dense); ``max_rounds``: stop after that many pruning rounds even if a
    target is not reached (None: no limit). ``allocation``: ``"layer"`` prunes each layer by its
    kind's rate to its own target; ``"global"`` pools the layers with a target (they must share
    one rate) and prunes by magnitude over the pool to the pool's total target
    (:func:`~mcwt_ext.masks.global_magnitude_prune`)."""

    train: TrainConfig
    rates: dict[str, float] = field(default_factory=lambda: {"conv": 0.1, "linear": 0.2, "output": 0.1})
    sparsity: float | dict[str, float] = 0.8
    rewind_iteration: int = 0
    max_rounds: int | None = None
    table_iterations: int | None = None  # the dense round and the ticket train this long (protocol paper)
    allocation: str = "layer"

    def __post_init__(self):
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if not isinstance(self.rates, Mapping) or set(self.rates) != set(KINDS):
            raise UsageError(f"rates must give a rate for each of {list(KINDS)}, got {self.rates!r}")
        self.rates = {k: check_rate(self.rates[k], f"rates: rate for {k}") for k in KINDS}
        if isinstance(self.sparsity, Mapping):
            for name, s in self.sparsity.items():
                check_sparsity(s, f"sparsity of {name!r}")
        else:
            check_sparsity(self.sparsity)
        k = self.rewind_iteration
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.train.iterations:
            raise UsageError(f"rewind_iteration must be an int in [0, {self.train.iterations}), got {k!r}")
        m = self.max_rounds
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise UsageError(f"max_rounds must be None or an int >= 0, got {m!r}")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        t = self.table_iterations
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < self.train.iterations):
            raise UsageError(f"table_iterations must be None or an int >= {self.train.iterations}, got {t!r}")

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> "ImpConfig":
        """The protocol's IMP for ``arch``. ``overrides`` may hold ImpConfig fields (``rates`` may
        be partial) and TrainConfig fields (passed to ``TrainConfig.for_arch``); None is ignored."""
        spec = arch_spec(arch)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        own = {f.name for f in dataclasses.fields(cls)}
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(overrides) - own - train_keys
        if unknown:
            raise TypeError(f"unknown ImpConfig/TrainConfig fields {sorted(unknown)}")
        train_overrides = {k: overrides.pop(k) for k in list(overrides) if k in train_keys}
        if "train" in overrides and train_overrides:
            raise TypeError(f"give either train or the TrainConfig fields {sorted(train_overrides)}")
        overrides.setdefault("train", TrainConfig.for_arch(arch, **train_overrides))
        rates = {"conv": spec.conv_prune_rate, "linear": spec.linear_prune_rate,
                 "output": spec.output_prune_rate}
        rates.update(overrides.pop("rates", {}))
        overrides.setdefault("allocation", spec.imp_allocation)
        return cls(rates=rates, **overrides)

    def table_train(self) -> TrainConfig | None:
        """The Table 1 training (the dense row and the ticket) of ``table_iterations``: the rounds'
        settings with the warm-up and milestones scaled to that length; None without one."""
        return None if self.table_iterations is None else self.train.scaled(self.table_iterations)

    def dense_apart(self) -> bool:
        """Whether the dense row trains apart from IMP's round 0: when the table training's first
        ``train.iterations`` steps do not follow the rounds' schedule (a warm-up or milestones
        scaled to the longer length), a snapshot of it is no round of IMP. Round 0 then trains the
        rounds' schedule (IMP prunes its final weights) and the dense row trains on its own."""
        long = self.table_train()
        return long is not None and any(long.lr_at(i) != self.train.lr_at(i)
                                        for i in range(self.train.iterations))

    def identity(self) -> dict:
        """The settings a resumed run must share (all but max_rounds and runtime fields)."""
        ident = dict(rates=self.rates, sparsity=self.sparsity, rewind_iteration=self.rewind_iteration,
                     allocation=self.allocation, train=self.train.identity())
        if self.table_iterations is not None:
            ident["table_iterations"] = self.table_iterations
        return ident


def layer_targets(config: ImpConfig, kinds: Mapping[str, str]) -> dict[str, float]:
    """The density each layer of ``kinds`` (weight name -> kind) ends at: 1 for a layer
    ``config.sparsity`` leaves dense."""
    targets = dict.fromkeys(kinds, 1.0)
    targets.update({n: 1.0 - s for n, s in per_layer(config.sparsity, list(kinds), "sparsity").items()})
    return targets


def _pool_rate(config: ImpConfig, kinds: Mapping[str, str], targets: Mapping[str, float]) -> float:
    """The one rate of global IMP's pool (the layers with a target)."""
    pooled = {kinds[n]: config.rates[kinds[n]] for n in kinds if targets[n] < 1.0}
    if len(set(pooled.values())) > 1:
        raise UsageError(f"allocation global prunes the pooled layers at one rate; their kinds have "
                         f"the rates {pooled}")
    return next(iter(pooled.values()), 0.0)


def _rounds_to(n: int, goal: int, rate: float) -> int | None:
    """IMP rounds that take ``n`` kept weights down to ``goal`` at ``rate`` (None: never, rate 0)."""
    rounds = 0
    while n > goal:
        if rate == 0.0:
            return None
        n, rounds = next_kept(n, goal, rate), rounds + 1
    return rounds


def round_plan(config: ImpConfig, sizes: Mapping[str, int], kinds: Mapping[str, str]) -> dict[str, int | None]:
    """The pruning rounds IMP takes to its targets, per layer kind (in :data:`KINDS` order): the
    most any layer of the kind needs at its rate, or the pool's with allocation global; None for a
    kind whose rate of 0 never gets there. ``sizes``: each layer's weight count, keyed as
    ``kinds``. Kinds of dense layers only are left out."""
    targets = layer_targets(config, kinds)
    pruned = [n for n in kinds if targets[n] < 1.0]
    if config.allocation == "global":
        pool = {n: sizes[n] for n in pruned}
        rounds = _rounds_to(sum(pool.values()), global_goal(pool, targets), _pool_rate(config, kinds, targets))
        need = dict.fromkeys(pruned, rounds)
    else:
        need = {n: _rounds_to(sizes[n], kept_count(sizes[n], targets[n]), config.rates[kinds[n]])
                for n in pruned}
    plan = {}
    for kind in KINDS:
        counts = [need[n] for n in pruned if kinds[n] == kind]
        if counts:
            plan[kind] = None if None in counts else max(counts)
    return plan


def _at_target(masks: Mapping[str, torch.Tensor], targets: Mapping[str, float], allocation: str) -> bool:
    if allocation == "global":
        pool = [n for n in masks if targets[n] < 1.0]
        return sum(int(masks[n].sum()) for n in pool) <= global_goal({n: masks[n].numel() for n in pool}, targets)
    return all(int(m.sum()) <= kept_count(m.numel(), targets[n]) for n, m in masks.items())


ROUND_FIELDS = ("val_acc_final", "test_acc_final", "val_acc_early_stop", "test_acc_early_stop",
                "val_acc_max", "early_stop_iteration", "min_val_loss")


class ImpRun:
    """IMP as a sequence of trainings: :meth:`pending` reads back every finished round, writes
    the next round's masks and returns the next training (a :class:`~mcwt_ext.lockstep.PackNet`)
    or None once the ticket is found (the summary then written). Whoever trains it (``train()``,
    or a pack of several IMP runs whose rounds advance together) calls :meth:`pending` again.

    A finished round needs only its summary and the next round's masks, not its trained weights:
    a grid imported from a state bundle resumes without retraining finished rounds."""

    def __init__(self, model: nn.Module, dataset: Dataset, config: ImpConfig, run_dir: RunDir | str):
        if not isinstance(config, ImpConfig):
            raise TypeError(f"config must be an ImpConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        self.rd = rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        device = next(model.parameters()).device
        self.kinds = kinds = layer_kind(model, dataset.example_input().to(device))
        self.rates = {name: config.rates[kind] for name, kind in kinds.items()}
        self.targets = targets = layer_targets(config, kinds)
        stuck = [n for n in kinds if targets[n] < 1.0 and self.rates[n] == 0.0]
        if stuck:
            raise UsageError(f"layers {stuck} have a sparsity target but a prune rate of 0")
        if config.allocation == "global":
            _pool_rate(config, kinds, targets)  # one rate, or refused now
        # A model pruned with torch.nn.utils.prune starts from its masks and ends pruned with the
        # ticket's; the run directory holds plain weights (dense_state_dict) either way.
        self.torch_pruned = any(is_torch_pruned(m) for m in model.modules())
        self.init = {k: v.detach().to("cpu").clone() for k, v in dense_state_dict(model).items()}
        RunDir.open(rd.path, config.identity(), name=RunDir.IMP)
        rd.save_or_check_tensors(RunDir.INIT, self.init, "initial weights")
        # round 0's masks: read once, since the model's own torch masks change with the rounds
        self.start_masks = {**dense_masks(model), **from_torch_prune(model)}
        self.masks: dict[str, torch.Tensor] = self.start_masks
        self.dense_apart = config.dense_apart()

    def _load(self, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        if self.torch_pruned:
            to_torch_prune(self.model, masks)
        load_dense_state_dict(self.model, weights)

    def round_config(self, r: int, at_target: bool) -> TrainConfig:
        """Round ``r``'s training: the table training for the ticket, and for round 0 unless the
        dense row trains apart (:meth:`ImpConfig.dense_apart`)."""
        long = self.config.table_train()
        if long is not None and ((r == 0 and not self.dense_apart) or at_target):
            return long
        return self.config.train

    def _snapshots(self, r: int, train_cfg: TrainConfig) -> list[int]:
        if r != 0:
            return []
        marks = {self.config.rewind_iteration} - {0}
        if train_cfg.iterations != self.config.train.iterations:  # prune at the protocol's length
            marks.add(self.config.train.iterations)
        return sorted(marks)

    def _pruning_weights(self, r: int, round_dir: RunDir) -> dict[str, torch.Tensor]:
        if r == 0 and self.round_config(0, False).iterations != self.config.train.iterations:
            return round_dir.load_tensors(snapshot_name(self.config.train.iterations))
        return round_dir.load_tensors(RunDir.FINAL)

    def pending(self):
        """The next round's training as a PackNet, or None when IMP is finished."""
        from .lockstep import PackNet

        rd, cfg, k = self.rd, self.config, self.config.rewind_iteration
        masks, rewind, rounds = self.start_masks, self.init, []
        for r in itertools.count():
            round_dir = rd.round(r)
            round_dir.save_or_check_tensors(RunDir.MASKS, masks, "masks")
            reached = _at_target(masks, self.targets, cfg.allocation)
            train_cfg = self.round_config(r, reached)
            if not round_dir.done():
                self._load(rewind, masks)
                return PackNet(self.model, masks, train_cfg, round_dir, self._snapshots(r, train_cfg))
            if r == 0 and self.dense_apart and not rd.subdir(RunDir.DENSE).done():
                self._load(self.init, masks)
                return PackNet(self.model, masks, cfg.table_train(), rd.subdir(RunDir.DENSE))
            if r == 0 and k > 0:
                if not rd.exists(RunDir.REWIND):
                    rd.save_tensors(RunDir.REWIND, round_dir.load_tensors(snapshot_name(k)))
                rewind = rd.load_tensors(RunDir.REWIND)
            s = round_dir.load_json(RunDir.SUMMARY)
            kept = sum(int(m.sum()) for m in masks.values())
            rounds.append(dict(round=r, density=kept / sum(m.numel() for m in masks.values()),
                               **{key: s.get(key) for key in ROUND_FIELDS}))
            if reached or (cfg.max_rounds is not None and r >= cfg.max_rounds):
                break
            following = rd.round(r + 1)
            if following.exists(RunDir.MASKS) and not round_dir.exists(RunDir.FINAL):
                masks = following.load_tensors(RunDir.MASKS)  # resumed from a state bundle
            elif not round_dir.exists(RunDir.FINAL):
                raise UsageError(f"{round_dir.path} is finished but holds neither its trained weights "
                                 f"nor does {following.path} hold the next masks; use a fresh run directory")
            elif cfg.allocation == "global":
                masks = global_magnitude_prune(self._pruning_weights(r, round_dir), masks,
                                               _pool_rate(cfg, self.kinds, self.targets), self.targets)
            else:
                masks = magnitude_prune(self._pruning_weights(r, round_dir), masks, self.rates, self.targets)
        rd.save_csv(RunDir.ROUNDS, rounds)
        if round_dir.exists(RunDir.FINAL):
            self._load(round_dir.load_tensors(RunDir.FINAL), masks)
        elif self.torch_pruned:
            to_torch_prune(self.model, masks)
        self.masks = masks
        rd.save_tensors(RunDir.MASKS, masks)
        rd.save_json(RunDir.SUMMARY, dict(rounds=rounds, reached_target=reached, kinds=self.kinds,
                                          densities=densities(masks), ticket=rounds[-1]))
        distributed.barrier()  # under torchrun: the other ranks may read the summary from here on
        return None


def run_imp(model: nn.Module, dataset: Dataset, config: ImpConfig, run_dir: RunDir | str,
            progress: bool = True, trainer=None) -> dict[str, torch.Tensor]:
    """Run IMP from ``model``'s current (initial) weights; return the WT masks.

    Resumes a run directory that was stopped: finished rounds are read back, the round in
    progress continues from its last checkpoint. ``model`` ends with the last round's trained
    weights (where they are on disk). ``trainer``: ``train()`` or a stand-in with its signature
    (the reproduce scheduler's, which trains IMP rounds of several seeds as one pack).
    """
    trainer = trainer or train  # looked up at call time, so a patched train() is the one used
    imp = ImpRun(model, dataset, config, run_dir)
    while (net := imp.pending()) is not None:
        r = round_index(net.run_dir.path.name)
        desc = "IMP dense row" if r is None else f"IMP round {r}"
        trainer(net.model, dataset, net.masks, net.config, net.run_dir, progress, desc=desc,
                snapshot_iterations=net.snapshot_iterations)
    return imp.masks
