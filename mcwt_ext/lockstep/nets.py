"""One net of a pack: its state, opened from its run directory (train()'s checkpoint format, so
a pack resumes from train()'s checkpoints and train() from a pack's), checkpointed and finished
with train()'s files."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import apply_masks, check_masks
from ..errors import UsageError
from ..runs import RunDir, atomic_write
from ..train import TrainConfig, TrainResult, _check_same_run, _masks_digest, _read_history, _summary
from .options import PackOptions

CHECKPOINT = RunDir.CHECKPOINT


@dataclass
class PackNet:
    """One net of a pack: a model holding its initial weights, its masks, its TrainConfig (seed,
    evaluation and checkpoint schedule) and optionally its run directory and snapshot iterations
    (as :func:`mcwt_ext.train.train` takes them)."""

    model: nn.Module
    masks: Mapping[str, torch.Tensor] | None
    config: TrainConfig
    run_dir: RunDir | str | None = None
    snapshot_iterations: Iterable[int] = ()


@dataclass
class _NetState:
    """What a checkpoint holds for one net (train()'s keys), plus its fixed inputs."""

    net: PackNet
    rd: RunDir | None
    masks: dict[str, torch.Tensor]
    digest: str
    snapshots: list[int]
    iteration: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    history: list[dict] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    wall_time_s: float = 0.0
    result: TrainResult | None = None  # set once finished


def _run_config(config: TrainConfig, options: PackOptions) -> dict:
    """The config a net's summary and checkpoint record. A non-float32 precision is recorded in it
    so that no float32 run (pack or train()) resumes it, and it resumes no float32 one."""
    cfg = dataclasses.asdict(config)
    if options.precision != "float32":
        cfg["precision"] = options.precision
    return cfg


def _check_resumable(stored: dict, config: TrainConfig, options: PackOptions, digest: str, where) -> None:
    stored_precision = stored["config"].get("precision", "fp32")
    stored_precision = "float32" if stored_precision == "fp32" else stored_precision  # TrainConfig's name
    if stored_precision != options.precision:
        raise UsageError(f"{where} was trained in {stored_precision}, not {options.precision}; "
                         f"use the same precision or a fresh run directory")
    stored = dict(stored, config={k: v for k, v in stored["config"].items() if k != "precision"})
    _check_same_run(stored, config, digest, where)


def _open(net: PackNet, options: PackOptions, device: torch.device) -> _NetState:
    if not isinstance(net, PackNet):
        raise TypeError(f"nets must be PackNet, got {type(net).__name__}")
    if not isinstance(net.config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(net.config).__name__}")
    config = net.config
    rd = net.run_dir if isinstance(net.run_dir, RunDir) or net.run_dir is None else RunDir(net.run_dir)
    masks = {k: v.to("cpu") for k, v in (net.masks or {}).items()}
    check_masks(net.model, masks)
    snapshots = sorted(set(net.snapshot_iterations))
    if snapshots and rd is None:
        raise ValueError("snapshot_iterations needs a run_dir to save the snapshots in")
    if snapshots and not 0 <= snapshots[0] <= snapshots[-1] <= config.iterations:
        raise ValueError(f"snapshot_iterations must lie in [0, {config.iterations}], got {snapshots}")
    st = _NetState(net, rd, masks, _masks_digest(masks), snapshots)
    if rd is not None and rd.exists(RunDir.SUMMARY):  # finished: read back, as train() does
        summary = rd.load_json(RunDir.SUMMARY)
        _check_resumable(summary, config, options, st.digest, rd.summary_path)
        net.model.load_state_dict(rd.load_tensors(RunDir.FINAL))
        net.model.to(device)
        st.result = TrainResult(summary, _read_history(rd))
        return st
    net.model.to("cpu")
    apply_masks(net.model, masks)
    st.weights = {k: v.detach().clone() for k, v in net.model.state_dict().items()}
    st.loss_sum = torch.zeros((), dtype=torch.float64)
    if rd is not None and rd.exists(CHECKPOINT):
        ckpt = torch.load(rd.file(CHECKPOINT), map_location="cpu", weights_only=True)
        _check_resumable(ckpt, config, options, st.digest, rd.file(CHECKPOINT))
        st.iteration, st.weights, st.optimizer = ckpt["iteration"], ckpt["model"], ckpt["optimizer"]
        st.history, st.wall_time_s = ckpt["history"], ckpt["wall_time_s"]
        st.loss_sum, st.loss_count = ckpt["loss_sum"].to("cpu"), ckpt["loss_count"]
    return st


def _checkpoint(st: _NetState, options: PackOptions) -> None:
    state = dict(iteration=st.iteration, model=st.weights, optimizer=st.optimizer, history=st.history,
                 loss_sum=st.loss_sum, loss_count=st.loss_count, wall_time_s=st.wall_time_s,
                 config=_run_config(st.net.config, options), masks_sha256=st.digest)
    atomic_write(st.rd.file(CHECKPOINT), lambda tmp: torch.save(state, tmp))


def _finish(st: _NetState, options: PackOptions, extra: dict) -> None:
    config = st.net.config
    summary = _summary(st.history, config, st.masks, st.wall_time_s)
    summary["config"] = _run_config(config, options)
    summary["lockstep"] = extra
    st.net.model.load_state_dict(st.weights)
    st.net.model.to(st.net.config.device)
    if st.rd is not None:
        st.rd.save_tensors(RunDir.FINAL, st.weights)
        st.rd.save_json(RunDir.SUMMARY, summary)
        if st.rd.exists(CHECKPOINT):
            st.rd.file(CHECKPOINT).unlink()
            if not any(st.rd.checkpoints_dir.iterdir()):
                st.rd.checkpoints_dir.rmdir()
    st.result = TrainResult(summary, st.history)


# --- one stage: nets at the same iteration, trained together -----------------------------------
