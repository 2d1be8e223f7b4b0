"""A time budget for the reproduce grid's packs: which pack to train next in the time left.

A GPU is lent for one time-boxed call, and a call cut by its limit loses what it trained since
its last export, so the scheduler (:mod:`.grid`) asks :meth:`Budget.pick` before each pack. The
pick: the first architecture in order (conv2 first: its rounds unblock the most cells) that has
a pack able to *finish* in the time left, as many of its waiting nets as fit (the longest pack
that fits); else, the same for a pack that at least reaches its first checkpoint (kept on this
machine only: checkpoints do not travel in a state bundle); else none, and the grid stops
(:class:`BudgetSpent`, a planned stop). Without a deadline the first group's nets are picked,
as before the budget existed.

Estimates are upper bounds from measured packs: the seconds per iteration ``t(n)`` of a pack of
``n`` nets of an architecture on a device type, from this process's packs and from the finished
lockstep summaries already in the grid (an imported bundle brings an earlier call's). A pack's
time grows with its nets, and at most in proportion (a fixed cost per step, then a cost per
net), so ``t(m) <= t(n)`` for ``m < n`` and ``t(m) <= t(n) * m / n`` for ``m > n``; the estimate
is the least of these bounds over the measured sizes. An architecture not measured yet borrows
the bound of a measured one, scaled by the ratio of their multiply-accumulates per image (a
larger net is no faster per MAC on the same device, so this too errs long); with no
measurement at all the pack is tried, and measured.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..supervision import BudgetSpent  # raised here when no waiting pack fits

__all__ = ["Budget", "BudgetSpent", "Candidate", "arch_macs", "forward_macs"]


@dataclass(frozen=True)
class Candidate:
    """The trainings one pack could take: ``nets`` waiting nets of ``arch`` on ``device``, for
    images of ``shape`` (in_channels, num_classes, image_size)."""

    arch: str
    device: str
    iterations: int
    checkpoint_every: int
    nets: int
    shape: tuple[int, int, int]


@functools.lru_cache(maxsize=None)
def arch_macs(arch: str, in_channels: int, num_classes: int, image_size: int) -> float:
    """:func:`forward_macs` of architecture ``arch`` for images of this shape."""
    from ..models import build_model

    model = build_model(arch, in_channels, num_classes, image_size).eval()
    return forward_macs(model, torch.zeros(1, in_channels, image_size, image_size))


def forward_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates of ``model``'s Conv2d and Linear layers on one input ``example``."""
    total = 0.0

    def count(module, _inputs, output):
        nonlocal total
        total += module.weight[0].numel() * output[0].numel()  # per output element, one image

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return total


class Budget:
    """``seconds`` from now (None: no deadline) and the pack rates measured so far."""

    def __init__(self, seconds: float | None = None, clock=time.monotonic):
        if seconds is not None and not seconds >= 0:
            raise UsageError(f"time budget: must be non-negative seconds, got {seconds!r}")
        self.clock = clock
        self.deadline = None if seconds is None else clock() + seconds
        self.rates: dict[tuple[str, str], dict[int, float]] = {}  # (arch, device type) -> {nets: s/iteration}

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def observe(self, arch: str, device: str, nets: int, iterations: int, seconds: float) -> None:
        """A pack of ``nets`` nets trained ``iterations`` iterations in ``seconds``."""
        if nets > 0 and iterations > 0 and seconds > 0:
            self.rates.setdefault((arch, torch.device(device).type), {})[nets] = seconds / iterations

    def learn(self, root: str | Path) -> None:
        """Rates from the finished lockstep summaries under ``root`` (the slowest of each size)."""
        for path in sorted(Path(root).glob("*/seed_*/**/summary.json")):
            try:
                summary = json.loads(path.read_text())
                pack, arch = summary["lockstep"], path.relative_to(root).parts[0]
                nets, iterations = int(pack["pack_size"]), int(summary["iterations"])
                rate, key = float(pack["pack_wall_time_s"]) / iterations, (arch, torch.device(pack["device"]).type)
            except (ValueError, KeyError, TypeError, RuntimeError, ZeroDivisionError):
                continue  # not a pack's summary (IMP's own, a fit, a per-cell training)
            if rate > self.rates.get(key, {}).get(nets, 0.0):
                self.observe(arch, pack["device"], nets, iterations, rate * iterations)

    @staticmethod
    def _bound(rates: dict[int, float], nets: int) -> float:
        return min(t * nets / n if n <= nets else t for n, t in rates.items())

    def seconds(self, cand: Candidate, nets: int, iterations: int) -> float | None:
        """Upper bound on the seconds ``nets`` of ``cand``'s nets take for ``iterations``
        iterations (None: nothing measured on this device type)."""
        device = torch.device(cand.device).type
        own = self.rates.get((cand.arch, device))
        if own:
            return self._bound(own, nets) * iterations
        macs = arch_macs(cand.arch, *cand.shape)
        borrowed = [self._bound(rates, nets) * macs / arch_macs(arch, *cand.shape)
                    for (arch, dev), rates in self.rates.items() if dev == device and rates]
        return max(borrowed) * iterations if borrowed else None

    def pick(self, cands: list[Candidate], size: int | None) -> tuple[int, int]:
        """(index into ``cands``, number of its nets) of the pack to train now, at most ``size``
        nets (None: no limit); raises :class:`BudgetSpent` when none fits."""
        if not cands:
            raise ValueError("pick: no candidates")
        limit = [min(c.nets, size or c.nets) for c in cands]
        if self.deadline is None:
            return 0, limit[0]
        left = self.left()
        checkpoint = [c.checkpoint_every if 0 < c.checkpoint_every < c.iterations else None for c in cands]
        for until in ("finish", "checkpoint"):
            for i, c in enumerate(cands):
                iterations = c.iterations if until == "finish" else checkpoint[i]
                if iterations is None:
                    continue
                for m in range(limit[i], 0, -1):
                    est = self.seconds(c, m, iterations)
                    if (est is None and left > 0) or (est is not None and est <= left):
                        return i, m
        raise BudgetSpent(f"no waiting pack can finish or checkpoint in the {max(left, 0):.0f} s left")
