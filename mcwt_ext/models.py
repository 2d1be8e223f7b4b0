"""Conv-2/4/6 of Frankle & Carbin (App. H), built as flat ``nn.Sequential`` nets.

Every net is ``[Conv2d, ReLU, Conv2d, ReLU, MaxPool2d] * k, Flatten, Linear, ReLU, Linear, ReLU,
Linear`` with 3x3 convs (padding 1), 2x2 max-pools, Glorot-normal weights and zero biases. The flat
layout is what the connectivity code pattern-matches to use its fused op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .validate import check_seed

__all__ = ["ArchSpec", "ARCHS", "build_model", "build_model_from_config", "count_weights"]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture and its protocol: widths, Adam lr, iterations, IMP conv prune rate."""

    name: str
    conv_widths: tuple[int, ...]
    lr: float
    iterations: int
    conv_prune_rate: float
    linear_widths: tuple[int, ...] = (256, 256)
    linear_prune_rate: float = 0.2
    output_prune_rate: float = 0.1


ARCHS: dict[str, ArchSpec] = {
    "conv2": ArchSpec("conv2", (64, 64), lr=2e-4, iterations=20_000, conv_prune_rate=0.10),
    "conv4": ArchSpec("conv4", (64, 64, 128, 128), lr=3e-4, iterations=25_000, conv_prune_rate=0.10),
    "conv6": ArchSpec("conv6", (64, 64, 128, 128, 256, 256), lr=3e-4, iterations=30_000,
                      conv_prune_rate=0.15),
}


def arch_spec(name: str) -> ArchSpec:
    """The ArchSpec called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {name!r}") from None


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                seed: int = 0) -> nn.Sequential:
    """Build architecture ``name`` with Glorot-normal weights drawn from ``seed``, zero biases.

    The weights depend on ``seed`` only (a private generator; the global RNG is untouched).
    """
    spec = arch_spec(name)
    _positive_int(in_channels, "in_channels")
    _positive_int(num_classes, "num_classes")
    _positive_int(image_size, "image_size")
    check_seed(seed)
    pools = len(spec.conv_widths) // 2
    side = image_size >> pools
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for {name}: its {pools} 2x2 "
                         f"max-pools need at least {1 << pools} pixels")

    layers: list[nn.Module] = []
    channels = in_channels
    for i, width in enumerate(spec.conv_widths):
        layers += [nn.Conv2d(channels, width, 3, padding=1, device="meta"), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers.append(nn.Flatten())
    features = channels * side * side
    for width in spec.linear_widths:
        layers += [nn.Linear(features, width, device="meta"), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes, device="meta"))
    # Built on the meta device so the modules' default init neither runs nor draws from the
    # global RNG; the weights come from the seeded generator only.
    model = nn.Sequential(*layers).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
    return model


def build_model_from_config(config: dict) -> nn.Sequential:
    """Build the model a run directory's ``config.json`` describes (arch, in_channels, ...)."""
    missing = [k for k in ("arch", "in_channels", "num_classes", "image_size", "seed") if k not in config]
    if missing:
        raise ValueError(f"config lacks the model keys {missing}")
    return build_model(config["arch"], config["in_channels"], config["num_classes"],
                       config["image_size"], config["seed"])


def count_weights(model: nn.Module) -> int:
    """Number of Conv2d/Linear weights (biases excluded), the count the protocol quotes."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
