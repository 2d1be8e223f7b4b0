"""Masked training (Adam, or SGD with momentum and a learning-rate schedule), periodic
evaluation, early-stopping bookkeeping and exact resume.

The mask is enforced at every step: the gradients of pruned weights are zeroed before the
optimiser step (so their moments stay zero) and the mask is re-applied after it, so pruned weights
are exactly zero throughout. The learning rate of each step is :func:`~mcwt_ext.models.scheduled_lr`
of the step number, a pure function, so the schedule needs no state either. The batch of iteration ``i`` is a function of ``(seed, i)`` only: each
epoch's order is a permutation seeded from ``(seed, epoch)``, and its augmentation
(:mod:`mcwt_ext.augment`, ``augment``) is drawn from ``(seed, i)``. A checkpoint therefore needs no RNG
state, and a resumed run on CPU ends with weights bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import UsageError
from . import distributed, supervision
from .augment import Augment
from .data import Dataset
from .precision import autocast, check_precision, say_bf16_note, to_input_format
from .train_config import TrainConfig
from .masks import (apply_masks, check_masks, dense_state_dict, densities, from_torch_prune,
                    is_torch_pruned, load_dense_state_dict, masked_parameters)
from .progress import Progress, note
from .runs import RunDir, atomic_write, check_identity, snapshot_name

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "BatchOrder", "make_optimizer", "StepHook"]

METRICS_FIELDS = ["iteration", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc"]


@dataclass
class TrainResult:
    """``summary``: final and early-stop accuracies etc.; ``history``: one dict per evaluation."""

    summary: dict
    history: list[dict] = field(default_factory=list)


class BatchOrder:
    """The training batch of each iteration, derived from ``(seed, iteration)`` alone.

    Epoch ``e`` visits the training set in a permutation drawn from a generator seeded with
    ``SeedSequence([seed, e])``; the last ``n % batch_size`` images of each epoch are skipped.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise UsageError(f"batch_size {batch_size} exceeds the {n} training images")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, iteration: int) -> torch.Tensor:
        """Indices of the batch trained on at 0-based ``iteration``."""
        epoch, pos = divmod(iteration, self.per_epoch)
        if epoch != self._epoch:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
            self._epoch = epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class _BatchSource(torch.utils.data.Dataset):
    """Batch ``i`` = the batch of iteration ``start + i``, for DataLoader workers."""

    def __init__(self, x, y, order: BatchOrder, start: int, stop: int, part: tuple[int, int],
                 augment: Augment):
        self.x, self.y, self.order, self.start, self.stop, self.part = x, y, order, start, stop, part
        self.augment = augment

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        idx = distributed.local_slice(self.order.indices(self.start + i), self.part)
        return self.augment(self.x[idx], self.start + i, self.part), self.y[idx]


def _batches(train_set: TensorDataset, order: BatchOrder, start: int, stop: int,
             num_workers: int, device: torch.device, augment: Augment):
    x, y = train_set.tensors
    part = distributed.part()  # under torchrun: this rank's slice of each global batch
    if num_workers == 0:
        x, y = x.to(device), y.to(device)  # once: indexing then happens on the device
        for it in range(start, stop):
            idx = distributed.local_slice(order.indices(it), part).to(device)
            yield augment(x[idx], it, part), y[idx]
        return
    loader = DataLoader(_BatchSource(x, y, order, start, stop, part, augment), batch_size=None,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, split: TensorDataset, device: str | torch.device = "cpu",
             batch_size: int = 1000, precision: str = "fp32") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split``, computed in ``precision``
    (:mod:`mcwt_ext.precision`)."""
    was_training = model.training
    model.eval()
    n = len(split)
    x, y = (t[distributed.share(n)] for t in split.tensors)  # under torchrun: this rank's share
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast(precision, torch.device(device)):  # which computes the loss in float32
            logits = model(to_input_format(precision, xb))
            sums[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        sums[1] += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    loss, correct = distributed.all_reduce_sum(sums).tolist()
    return loss / n, correct / n


class _MaskEnforcer:
    """Zeroes pruned gradients and weights with one fused multiply per list (the hot path)."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        named = [(n, p, m) for n, (p, m) in zip(masks, masked_parameters(model, masks)) if not bool(m.all())]
        self.names = [n for n, _, _ in named]
        self.params = [p for _, p, _ in named]
        self.masks = [m.to(p.dtype) for _, p, m in named]

    def grads(self):
        if self.params:
            torch._foreach_mul_([p.grad for p in self.params], self.masks)

    @torch.no_grad()
    def weights(self):
        if self.params:
            torch._foreach_mul_(self.params, self.masks)


def make_optimizer(model: nn.Module, config: "TrainConfig | float") -> torch.optim.Optimizer:
    """The optimiser of ``config`` (a bare float: Adam at that rate), fused (one kernel per step)
    where the device supports it: Adam, or SGD with ``momentum`` and ``weight_decay``. The unfused
    CPU Adam slows down about 2x on a pruned net: the moments of pruned weights are exactly zero,
    and its vectorised sqrt of zero takes a slow path on AVX-512 CPUs. Weight decay keeps pruned
    weights at zero: it adds ``weight_decay * w``, which is 0 there."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig(iterations=1, lr=config)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in model.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, fused=fused or None)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            fused=fused or None)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class StepHook(Protocol):
    """What changes the masks while training (dynamic sparse training, :mod:`mcwt_ext.dst`).

    ``bind`` receives the start masks, the masked layers (names, weights, and the float masks
    training multiplies by, which ``update`` changes in place) and the optimiser. Where
    ``before(step)``, step ``step``'s batch first goes forward and backward alone, and
    ``update(step)`` runs while the weights' gradients are dense (no optimiser step), then the step
    trains on the new masks; where ``after(step)``, ``update(step)`` runs after the step.
    ``state_dict`` goes into each checkpoint; ``save_final``/``load_final`` keep what a finished run
    needs beside its weights."""

    def bind(self, masks, names, params, float_masks, optimizer) -> None: ...
    def before(self, step: int) -> bool: ...
    def after(self, step: int) -> bool: ...
    def update(self, step: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def save_final(self, rd: RunDir) -> None: ...
    def load_final(self, rd: RunDir) -> None: ...


def _backward(model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
              precision: str) -> torch.Tensor:
    """The batch's loss, forward in ``precision``, and its gradients (unmasked: dense)."""
    with autocast(precision, xb.device):  # bf16: the float32 weights are cast on the fly, the loss
        loss = F.cross_entropy(model(to_input_format(precision, xb)), yb)  # is float32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, enforcer: _MaskEnforcer,
          xb: torch.Tensor, yb: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """One masked optimiser step, its forward pass and loss in ``precision``; returns the batch
    loss (detached, not synchronised)."""
    loss = _backward(model, optimizer, xb, yb, precision)
    enforcer.grads()
    optimizer.step()
    enforcer.weights()
    return loss.detach()


def _masks_digest(masks: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].cpu().flatten().numpy()).tobytes())
    return h.hexdigest()


def _early_stop(history: list[dict]) -> dict:
    return min(history, key=lambda row: (row["val_loss"], row["iteration"]))


def _summary(history, config, masks, wall_time) -> dict:
    last, best = history[-1], _early_stop(history)
    top = max(history, key=lambda row: (row["val_acc"], -row["iteration"]))  # earliest maximum
    return {
        "iterations": config.iterations,
        "val_acc_final": last["val_acc"], "test_acc_final": last["test_acc"],
        "val_loss_final": last["val_loss"],
        "early_stop_iteration": best["iteration"], "min_val_loss": best["val_loss"],
        "val_acc_early_stop": best["val_acc"], "test_acc_early_stop": best["test_acc"],
        "val_acc_max": top["val_acc"], "val_acc_max_iteration": top["iteration"],
        "wall_time_s": wall_time,
        "densities": densities(masks),
        "masks_sha256": _masks_digest(masks),
        "config": dataclasses.asdict(config),
    }


def _torch_pruned_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None
                        ) -> dict[str, torch.Tensor] | None:
    """The masks to train with: ``masks``, or those of a model pruned with
    ``torch.nn.utils.prune``; given both, they must agree (a layer absent from one is dense)."""
    if not any(is_torch_pruned(m) for m in model.modules()):
        return masks
    ours = from_torch_prune(model)
    if masks is None:
        return ours
    masks = {k: v.to("cpu") for k, v in masks.items()}
    check_masks(model, masks)
    differ = [n for n in sorted(set(ours) | set(masks))
              if not (bool(masks[n].all()) if n not in ours else bool(ours[n].all()) if n not in masks
                      else torch.equal(ours[n], masks[n]))]
    if differ:
        raise ValueError(f"masks: disagree with the model's torch.nn.utils.prune masks on {differ}; "
                         f"pass masks=None to train the model's own, or prune it with these "
                         f"(mcwt_ext.masks.to_torch_prune)")
    return masks


def _check_same_run(stored: dict, config: TrainConfig, digest: str, where) -> None:
    """A summary or checkpoint was made with these settings and these masks."""
    check_identity(dict(config=stored["config"], masks_sha256=stored["masks_sha256"]),
                   dict(config=config.identity(), masks_sha256=digest), where)


def _read_history(rd: RunDir) -> list[dict]:
    return [{k: int(v) if k == "iteration" else float(v) for k, v in row.items()}
            for row in rd.load_csv(RunDir.METRICS)]


def evaluations_from(start: int, config: TrainConfig) -> int:
    """How many evaluations a training resumed after ``start`` steps (0: a fresh one) runs: at 0
    when fresh, then every ``eval_every`` iterations and at the end (the progress line's ETA)."""
    n, every = config.iterations, config.eval_every
    after = 0 if start >= n else n // every - start // every + (n % every != 0)
    return after + (start == 0)


def train(model: nn.Module, dataset: Dataset, masks: Mapping[str, torch.Tensor] | None = None,
          config: TrainConfig | None = None, run_dir: RunDir | str | None = None,
          progress: bool = True, desc: str = "train", *,
          snapshot_iterations: Iterable[int] = (), step_hook: StepHook | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset`` with its pruned weights held at zero.

    Evaluates on the validation and test splits at iteration 0, every ``eval_every`` iterations
    and at the end. With ``run_dir``: ``metrics.csv`` after each evaluation, a checkpoint every
    ``checkpoint_every`` iterations or ``checkpoint_minutes``, whichever comes first, then
    ``final.safetensors`` and ``summary.json``. A run
    directory with a checkpoint resumes from it; one with a summary is finished, and its final
    weights are loaded instead of training again. ``snapshot_iterations``: save the weights after
    those many steps as ``weights_XXXXXX.safetensors`` (IMP's rewind point). ``step_hook``: changes
    the masks while training (:class:`StepHook`); ``masks`` are then the start masks.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    rd = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
    distributed.check_batch_size(config.batch_size)
    masks = {k: v.to("cpu") for k, v in (_torch_pruned_masks(model, masks) or {}).items()}
    check_masks(model, masks)
    snapshots = sorted(set(snapshot_iterations))
    if snapshots and rd is None:
        raise ValueError("snapshot_iterations needs a run_dir to save the snapshots in")
    if snapshots and not 0 <= snapshots[0] <= snapshots[-1] <= config.iterations:
        raise ValueError(f"snapshot_iterations must lie in [0, {config.iterations}], got {snapshots}")
    device = distributed.device_for(config.device)
    check_precision(config.precision, device)
    say_bf16_note(config.precision, device, dataset.image_size)
    digest = _masks_digest(masks)
    model.to(device)

    if rd is not None and rd.exists(RunDir.SUMMARY):
        summary = rd.load_json(RunDir.SUMMARY)
        _check_same_run(summary, config, digest, rd.summary_path)
        load_dense_state_dict(model, rd.load_tensors(RunDir.FINAL, device))
        if step_hook is not None:
            enforcer = _MaskEnforcer(model, masks)
            step_hook.bind(masks, enforcer.names, enforcer.params, enforcer.masks, None)
            step_hook.load_final(rd)
        return TrainResult(summary, _read_history(rd))

    if rd is not None and supervision.deadline_passed():  # nothing started: nothing to keep
        raise supervision.BudgetSpent(f"the time budget ran out before {rd.path} trained")
    apply_masks(model, masks)
    enforcer = _MaskEnforcer(model, masks)
    optimizer = make_optimizer(model, config)
    if step_hook is not None:
        step_hook.bind(masks, enforcer.names, enforcer.params, enforcer.masks, optimizer)
    start, history, wall_time = 0, [], 0.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = 0
    if rd is not None and rd.exists(RunDir.CHECKPOINT):
        try:  # weights_only: tensors, ints, floats, strings and dicts/lists of them, no code
            ckpt = torch.load(rd.file(RunDir.CHECKPOINT), map_location=device, weights_only=True)
        except Exception as e:  # truncated or not a checkpoint: torch raises several types
            raise UsageError(f"{rd.file(RunDir.CHECKPOINT)} is not a readable checkpoint "
                             f"({type(e).__name__}); delete it to train this run from the start") from None
        _check_same_run(ckpt, config, digest, rd.file(RunDir.CHECKPOINT))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history, wall_time = ckpt["iteration"], ckpt["history"], ckpt["wall_time_s"]
        loss_sum, loss_count = ckpt["loss_sum"].to(device), ckpt["loss_count"]
        if step_hook is not None:
            step_hook.load_state_dict(ckpt["step_hook"])
        note(f"resuming {rd.path} from iteration {start}", progress)
    net = distributed.wrap(model)  # under torchrun: DDP, which averages the gradients over ranks

    val, test = (TensorDataset(*(t.to(device) for t in s.tensors)) for s in (dataset.val, dataset.test))
    order = BatchOrder(len(dataset.train), config.batch_size, config.seed)
    bar = Progress(config.iterations, desc, initial=start, evaluations=evaluations_from(start, config),
                   enabled=progress)
    began = time.perf_counter()

    def record(iteration):
        nonlocal loss_sum, loss_count
        distributed.broadcast_buffers(model)  # under torchrun: evaluate rank 0's net everywhere
        val_loss, val_acc = evaluate(model, val, device, precision=config.precision)
        test_loss, test_acc = evaluate(model, test, device, precision=config.precision)
        mean = distributed.all_reduce_sum(loss_sum.clone()).item() / distributed.world_size()
        train_loss = mean / loss_count if loss_count else float("nan")
        history.append(dict(iteration=iteration, train_loss=train_loss, val_loss=val_loss,
                            val_acc=val_acc, test_loss=test_loss, test_acc=test_acc))
        loss_sum, loss_count = torch.zeros_like(loss_sum), 0
        bar.set(val_acc=val_acc, val_loss=val_loss)
        if rd is not None:
            rd.save_csv(RunDir.METRICS, history, METRICS_FIELDS)

    def checkpoint(iteration):
        nonlocal checkpointed
        checkpointed = time.monotonic()
        state = dict(iteration=iteration, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     history=history, loss_sum=loss_sum, loss_count=loss_count,
                     wall_time_s=wall_time + time.perf_counter() - began,
                     config=dataclasses.asdict(config), masks_sha256=digest)
        if step_hook is not None:
            state["step_hook"] = step_hook.state_dict()
        atomic_write(rd.file(RunDir.CHECKPOINT), lambda tmp: torch.save(state, tmp))

    if start == 0:
        with bar.evaluating():
            record(0)
        if 0 in snapshots:
            rd.save_tensors(snapshot_name(0), dense_state_dict(model))
    checkpointed = time.monotonic()
    model.train()
    try:
        augment = Augment(config.augment, config.seed, config.batch_size, dataset.mean, dataset.std)
        batches = _batches(dataset.train, order, start, config.iterations, config.num_workers, device, augment)
        for it, (xb, yb) in enumerate(batches, start=start + 1):  # it = steps done after this one
            _set_lr(optimizer, config.lr_at(it - 1))
            if step_hook is not None and step_hook.before(it):  # from this batch's dense gradient
                _backward(net, optimizer, xb, yb, config.precision)
                step_hook.update(it)
            loss_sum += _step(net, optimizer, enforcer, xb, yb, config.precision)
            if step_hook is not None and step_hook.after(it):
                step_hook.update(it)
            loss_count += 1
            bar.update()
            if it in snapshots:
                rd.save_tensors(snapshot_name(it), dense_state_dict(model))
            if it % config.eval_every == 0 or it == config.iterations:
                with bar.evaluating():
                    record(it)
            stop = rd is not None and it < config.iterations and supervision.deadline_passed()
            if rd is not None and (stop or config.checkpoint_due(it, time.monotonic() - checkpointed)):
                with bar.aside("checkpointing"):
                    checkpoint(it)
                supervision.saved_point()
            if stop:
                raise supervision.BudgetSpent(f"the time budget ran out at iteration {it:,} of "
                                              f"{config.iterations:,} of {rd.path} (checkpointed)")
    finally:
        bar.close()

    summary = _summary(history, config, masks, wall_time + time.perf_counter() - began)
    if rd is not None:
        rd.save_tensors(RunDir.FINAL, dense_state_dict(model))
        if step_hook is not None:
            step_hook.save_final(rd)
        rd.save_json(RunDir.SUMMARY, summary)
        if distributed.is_main() and rd.exists(RunDir.CHECKPOINT):  # the finished run needs it no more
            rd.file(RunDir.CHECKPOINT).unlink()
            if not any(rd.checkpoints_dir.iterdir()):
                rd.checkpoints_dir.rmdir()
        distributed.barrier()  # the other ranks may read what rank 0 wrote from here on
    return TrainResult(summary, history)
