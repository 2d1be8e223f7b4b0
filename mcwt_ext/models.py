"""The model registry: Conv-2/4/6 and ResNet-20 of Frankle & Carbin, each with its protocol.

**Conv-2/4/6** (F&C App. H) are flat ``nn.Sequential`` nets: ``[Conv2d, ReLU, Conv2d, ReLU,
MaxPool2d] * k, Flatten, Linear, ReLU, Linear, ReLU, Linear`` with 3x3 convs (padding 1), 2x2
max-pools, Glorot-normal weights and zero biases. The flat layout is what the connectivity code
pattern-matches to use its fused op.

**ResNet-20** (``resnet20``) is the CIFAR-10 ResNet of He et al. (2016, Sec. 4.2) that F&C call
"Resnet-18" (their Fig. 2 lists it as ``16, 3x[16, 16], 3x[32, 32], 3x[64, 64]``, avg-pool, 10;
274K/270K all/conv weights): a 3x3 conv to 16 channels with BatchNorm and ReLU, three stages of
three basic blocks (two 3x3 convs with BatchNorm; 16, 32, 64 channels; the first block of stages 2
and 3 has stride 2), global average pooling and a linear layer. Where a block changes shape, the
shortcut is a 1x1 stride-2 conv with BatchNorm (as in open_lth's ``cifar_resnet_20``, Frankle's
later code): that gives 270,896 conv + linear weights, 270,256 of them conv, F&C's "270K" (He et
al.'s parameter-free option-A shortcut would give 268K). Convs have no bias. Init is open_lth's
default for that net (``kaiming_normal`` and ``batchnorm_init='uniform'``): Kaiming-normal conv and
linear weights (fan-in, gain sqrt 2), BatchNorm weights uniform in [0, 1) and biases 0 (running
statistics 0/1), the linear bias PyTorch's default uniform(+-1/sqrt(fan-in)); all drawn from the
seed.

Its protocol (:data:`ARCHS`) is F&C's Sec. 4 / Fig. 2 for that net, as recalled from the paper (no
copy of its appendix was at hand here; the values below are the ones to check against it): SGD
with momentum 0.9, batch 128, 30K iterations, learning rate dropped 10x at 20K and 25K; the
learning rate that finds winning tickets is 0.03 with a linear warm-up from 0 over the first 20K
iterations (at 0.1 without warm-up IMP fails to find tickets; 0.01 without warm-up also works).
Weight decay 1e-4 is He et al.'s and open_lth's (F&C do not list it in Fig. 2). Training batches
are augmented (``augment="flip-crop"``: open_lth's random horizontal flip and 4-pixel zero-padded
random crop; F&C train it on augmented data). IMP prunes 20% per round *globally* over all conv
layers (first conv and 1x1 shortcuts included; ``imp_allocation="global"``, open_lth's
``sparse_global``), and the output layer stays dense ("fc 0%": ``dense_kinds = ("output",)``;
:meth:`ArchSpec.layer_sparsity` gives the per-layer targets that encode this).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .validate import check_seed

__all__ = ["ArchSpec", "ARCHS", "INITS", "init_model", "arch_sparsity", "build_model", "build_model_from_config", "count_weights", "scheduled_lr",
           "CifarResNet", "BasicBlock"]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture and its protocol: widths, optimiser and schedule, IMP prune rates.

    The optimiser is ``"adam"`` (lr only) or ``"sgd"`` (``momentum``, ``weight_decay``). The
    learning rate at each step is :meth:`lr_at`: linear warm-up over ``warmup_iterations``, then
    multiplied by ``lr_gamma`` at each of ``lr_milestones``. Layers of a kind in ``dense_kinds``
    are never pruned (see :meth:`layer_sparsity`). ``init`` is one of :data:`INITS`, ``augment``
    the training batches' augmentation (:mod:`mcwt_ext.augment`), ``imp_allocation`` how IMP
    prunes: ``"layer"`` (each layer its rate) or ``"global"`` (one rate over the pruned layers).
    """

    name: str
    conv_widths: tuple[int, ...]
    lr: float
    iterations: int
    conv_prune_rate: float
    linear_widths: tuple[int, ...] = (256, 256)
    linear_prune_rate: float = 0.2
    output_prune_rate: float = 0.1
    family: str = "convnet"              # "convnet": flat Sequential; "resnet": CIFAR ResNet
    blocks_per_stage: int = 0            # resnet only
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 60
    warmup_iterations: int = 0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    dense_kinds: tuple[str, ...] = ()
    init: str = "glorot-normal"
    augment: str = "none"
    imp_allocation: str = "layer"

    def lr_at(self, step: int, lr: float | None = None) -> float:
        """Learning rate of this protocol's step ``step`` (:func:`scheduled_lr`); ``lr``
        overrides the peak rate (``--lr``)."""
        return scheduled_lr(step, lr=self.lr if lr is None else lr,
                            warmup_iterations=self.warmup_iterations,
                            milestones=self.lr_milestones, gamma=self.lr_gamma)

    def lr_factor(self, step: int) -> float:
        """``lr_at(step) / lr``: the multiplier for ``torch.optim.lr_scheduler.LambdaLR``."""
        return self.lr_at(step, 1.0)

    def layer_sparsity(self, kinds: dict[str, str], sparsity: float) -> dict[str, float]:
        """Per-layer sparsity targets: ``sparsity`` for every layer of ``kinds``
        (``{param name: kind}``, as :func:`mcwt_ext.masks.layer_kind` gives), 0 for the
        ``dense_kinds``; feed it to IMP, random pruning and the sampler."""
        return {name: 0.0 if kind in self.dense_kinds else sparsity for name, kind in kinds.items()}


def arch_sparsity(arch: str, model: nn.Module, example_input: torch.Tensor, sparsity):
    """The sparsity IMP, random pruning and the sampler take for ``model`` of ``arch``:
    ``sparsity`` as it is where every layer is pruned alike (the Conv nets, whose settings thus
    stay as they were) or where it is already per layer, else :meth:`ArchSpec.layer_sparsity`
    over the model's layers (resnet20: the output layer dense)."""
    from .masks import layer_kind

    spec = arch_spec(arch)
    if not spec.dense_kinds or isinstance(sparsity, dict):
        return sparsity
    return spec.layer_sparsity(layer_kind(model, example_input), sparsity)


def scheduled_lr(step: int, *, lr: float, warmup_iterations: int = 0,
                 milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Learning rate of the optimiser step taken after ``step`` steps (0-based).

    Warm-up: ``lr * (step + 1) / warmup_iterations`` for the first ``warmup_iterations`` steps
    (so the first step is not wasted at 0); decay: times ``gamma`` for every milestone
    ``m <= step``. A pure function of the step, so a resumed run needs no scheduler state.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if step < warmup_iterations:
        lr *= (step + 1) / warmup_iterations
    return lr * gamma ** sum(step >= m for m in milestones)


ARCHS: dict[str, ArchSpec] = {
    "conv2": ArchSpec("conv2", (64, 64), lr=2e-4, iterations=20_000, conv_prune_rate=0.10),
    "conv4": ArchSpec("conv4", (64, 64, 128, 128), lr=3e-4, iterations=25_000, conv_prune_rate=0.10),
    "conv6": ArchSpec("conv6", (64, 64, 128, 128, 256, 256), lr=3e-4, iterations=30_000,
                      conv_prune_rate=0.15),
    "resnet20": ArchSpec("resnet20", (16, 32, 64), lr=0.03, iterations=30_000, conv_prune_rate=0.20,
                         linear_widths=(), linear_prune_rate=0.0, output_prune_rate=0.0,
                         family="resnet", blocks_per_stage=3, optimizer="sgd", momentum=0.9,
                         weight_decay=1e-4, batch_size=128, warmup_iterations=20_000,
                         lr_milestones=(20_000, 25_000), lr_gamma=0.1, dense_kinds=("output",),
                         init="kaiming-normal", augment="flip-crop", imp_allocation="global"),
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


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm, added to the shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int, device=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False, device=device)
        self.bn1 = nn.BatchNorm2d(channels, device=device)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, device=device)
        self.bn2 = nn.BatchNorm2d(channels, device=device)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False, device=device),
                nn.BatchNorm2d(channels, device=device))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``conv -> bn -> relu``, three stages of basic blocks, global average pool, ``fc``."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, in_channels: int,
                 num_classes: int, device=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False, device=device)
        self.bn = nn.BatchNorm2d(widths[0], device=device)
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, device=device))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes, device=device)

    def forward(self, x):
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


#: Initialisations: F&C's Conv nets (Glorot normal, zero biases, BatchNorm 1/0) and open_lth's
#: CIFAR ResNets (Kaiming normal, BatchNorm weights uniform in [0, 1), PyTorch's linear bias).
INITS = ("glorot-normal", "kaiming-normal")


def init_model(model: nn.Module, scheme: str, generator: torch.Generator) -> None:
    """Initialise ``model`` in place by ``scheme`` (one of :data:`INITS`), every draw from
    ``generator``, modules in registration order. BatchNorm's running statistics start at 0/1."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {scheme!r}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "glorot-normal":
                nn.init.xavier_normal_(module.weight, generator=generator)
            else:  # open_lth's kaiming_normal: torch's default, fan-in, gain sqrt(2)
                nn.init.kaiming_normal_(module.weight, generator=generator)
            if module.bias is None:
                continue
            if scheme == "glorot-normal":
                nn.init.zeros_(module.bias)
            else:  # open_lth leaves nn.Linear's own bias init: uniform(+-1/sqrt(fan-in))
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # weight 1, bias 0, running mean 0, var 1, count 0
            if scheme == "kaiming-normal":  # open_lth's batchnorm_init="uniform"
                with torch.no_grad():
                    module.weight.uniform_(0.0, 1.0, generator=generator)


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                seed: int = 0) -> nn.Module:
    """Build architecture ``name`` with its initial weights (:attr:`ArchSpec.init`) drawn from ``seed``.

    Conv-k nets are flat ``nn.Sequential``; ``resnet20`` is a :class:`CifarResNet`. The weights
    depend on ``seed`` only (a private generator; the global RNG is untouched).
    """
    spec = arch_spec(name)
    _positive_int(in_channels, "in_channels")
    _positive_int(num_classes, "num_classes")
    _positive_int(image_size, "image_size")
    check_seed(seed)
    if spec.family == "resnet":
        # Built on the meta device so the modules' default init neither runs nor draws from
        # the global RNG; the weights come from the seeded generator only.
        model = CifarResNet(spec.conv_widths, spec.blocks_per_stage, in_channels, num_classes,
                            device="meta").to_empty(device="cpu")
        init_model(model, spec.init, torch.Generator().manual_seed(seed))
        return model
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
    init_model(model, spec.init, torch.Generator().manual_seed(seed))
    return model


def build_model_from_config(config: dict) -> nn.Module:
    """Build the model a run directory's ``config.json`` describes (arch, in_channels, ...)."""
    missing = [k for k in ("arch", "in_channels", "num_classes", "image_size", "seed") if k not in config]
    if missing:
        raise UsageError(f"config lacks the model keys {missing}")
    return build_model(config["arch"], config["in_channels"], config["num_classes"],
                       config["image_size"], config["seed"])


def count_weights(model: nn.Module) -> int:
    """Number of Conv2d/Linear weights (biases excluded), the count the protocol quotes."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration (BatchNorm on its running statistics, dropout off); each
    module's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
