"""What a pack cannot train, declared in one place: :data:`PACK_CAPABILITIES`.

A pack (:func:`mcwt_ext.lockstep.train_pack`) stacks the parameters of K nets and steps them
with one Adam at a constant learning rate, on batches it gathers on the device, in the precision
of its :class:`~.options.PackOptions`, in one process. :func:`mcwt_ext.train.train` does more:
nets with buffers (batch norm), SGD, weight decay and learning-rate schedules, augmentation, a
run's own ``--precision``, DataLoader workers, torchrun. Each entry of the table is one thing a
pack lacks: its name and a check that says, for one net (its model, its TrainConfig and the
PackOptions it would train under), why that net needs it (None: it does not).

:func:`pack_refusal` is the one check: ``train_pack`` refuses a net with its reason, and the
reproduce grid reads it before it packs (:meth:`mcwt_ext.experiments.grid.Cell.train`) and trains
such a net alone with ``train()``, exactly as ``--pack 1`` would, saying so once
(:mod:`mcwt_ext.experiments.packer`). Nothing a user asks for is refused because of packing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .. import distributed
from ..train_config import TrainConfig
from .forward import grouped_layout_problem
from .options import PackOptions

__all__ = ["PackCapability", "PACK_CAPABILITIES", "pack_refusal", "pack_refusals"]


@dataclass(frozen=True)
class PackCapability:
    """Something ``train()`` does that a pack does not: ``needs(model, config, options)`` is the
    reason a net needs it (so the pack cannot train that net), or None."""

    name: str
    needs: Callable[[nn.Module, TrainConfig, PackOptions], str | None]
    doc: str


def _buffers(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    names = [n for n, _ in model.named_buffers()]
    if not names:
        return None
    norm = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    what = "batch-norm buffers (running statistics: " if norm else "buffers ("
    return f"the pack trains parameter-only nets; this net has {what}{len(names)} of them, e.g. {names[0]!r})"


_PLAIN_ADAM = dict(optimizer="adam", weight_decay=0.0, warmup_iterations=0, lr_milestones=[])


def _optimizer(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    other = {k: getattr(config, k) for k, v in _PLAIN_ADAM.items() if getattr(config, k) != v}
    if not other:
        return None
    return f"the pack steps Adam at a constant learning rate; this net's config sets {other}"


def _augment(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    if config.augment == "none":
        return None
    return (f"the pack gathers its batches on the device, unaugmented; this net's config sets augment "
            f"{config.augment!r}")


def _precision(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    if config.precision == "fp32":
        return None
    return (f"--precision {config.precision}: the pack computes in its PackOptions.precision, not in a "
            f"net's own TrainConfig.precision")


def _num_workers(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    if not config.num_workers:
        return None
    return (f"num_workers {config.num_workers}: the pack gathers its batches on the device, with no "
            f"DataLoader workers")


def _processes(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    if not distributed.active():
        return None
    return "under torchrun train() splits each batch over the processes; the pack trains in one process"


def _layout(model: nn.Module, config: TrainConfig, options: PackOptions) -> str | None:
    if options.impl != "grouped":
        return None
    problem = grouped_layout_problem(model)
    return None if problem is None else f"the grouped pack {problem} (impl='vmap' runs any parameter-only net)"


#: Everything a pack cannot train, in the order the checks run (the first reason is the one given).
PACK_CAPABILITIES: tuple[PackCapability, ...] = (
    PackCapability("buffers", _buffers, "parameter-only nets: no buffers (batch norm's running statistics)"),
    PackCapability("optimizer", _optimizer, "Adam at a constant rate: no SGD, weight decay, warm-up or milestones"),
    PackCapability("augment", _augment, "unaugmented batches (augment 'none')"),
    PackCapability("precision", _precision, "TrainConfig.precision fp32 (the pack's own is PackOptions.precision)"),
    PackCapability("num_workers", _num_workers, "batches gathered on the device (num_workers 0)"),
    PackCapability("processes", _processes, "one process (not under torchrun)"),
    PackCapability("layout", _layout, "impl='grouped': an nn.Sequential of conv, pool, flatten and linear layers"),
)


def pack_refusals(model: nn.Module, config: TrainConfig, options: PackOptions | None = None) -> dict[str, str]:
    """Every capability the pack lacks for this net: {capability name: reason} (empty: packable)."""
    options = options or PackOptions()
    out = {}
    for cap in PACK_CAPABILITIES:
        reason = cap.needs(model, config, options)
        if reason is not None:
            out[cap.name] = reason
    return out


def pack_refusal(model: nn.Module, config: TrainConfig, options: PackOptions | None = None) -> str | None:
    """Why a pack (under ``options``; default PackOptions()) cannot train this net, or None if it
    can: the first reason of :func:`pack_refusals`."""
    options = options or PackOptions()
    for cap in PACK_CAPABILITIES:
        reason = cap.needs(model, config, options)
        if reason is not None:
            return reason
    return None
