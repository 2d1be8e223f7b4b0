"""The arithmetic a training run computes in (``TrainConfig.precision``, ``--precision``).

``fp32`` (the default): everything in float32. ``bf16``: the forward pass and the loss run under
``torch.autocast`` to bfloat16, while the weights, their gradients and the optimiser's state stay
float32 (autocast casts the float32 master weights on the fly), so masks are enforced exactly as
in fp32. Image batches then enter channels-last: oneDNN's bfloat16 convolutions are fastest in
that layout, and the input's layout alone sets it (the weights keep theirs, so checkpoints and
saved weights are unchanged). Evaluation uses the run's precision too: it is the net as trained,
and on a CPU the full protocol's evaluations take longer than its steps (benchmarks/RESULTS.md).

On a CPU, bf16 is fast only where oneDNN has bfloat16 instructions (AVX512-BF16 or AMX); elsewhere
autocast still works, emulated, slower than fp32 (benchmarks/RESULTS.md), so a bf16 run on such a
CPU is refused with an error naming ``--precision``.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from .errors import UsageError

__all__ = ["PRECISIONS", "parse_precision", "native_bf16", "check_precision", "bf16_note", "say_bf16_note",
           "autocast", "to_input_format"]

PRECISIONS = ("fp32", "bf16")


def parse_precision(text: str) -> str:
    if text not in PRECISIONS:
        raise UsageError(f"{text!r} is not one of {', '.join(PRECISIONS)}")
    return text


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 in hardware here (it honours ``ONEDNN_MAX_CPU_ISA``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def check_precision(precision: str, device: str | torch.device) -> None:
    """A ValueError naming ``--precision`` where ``precision`` cannot run fast on ``device``."""
    if precision != "bf16":
        return
    kind = torch.device(device).type
    if kind == "cpu" and not native_bf16():
        raise UsageError("--precision bf16: this CPU has no bfloat16 instructions that oneDNN uses "
                         "(AVX512-BF16 or AMX), where emulated bf16 is slower than fp32; "
                         "use --precision fp32")
    if kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16 arithmetic; use --precision fp32")


#: Where bf16 was measured to pay, per device kind: the smallest image side of the measurement
#: and what it measured (benchmarks/RESULTS.md, "Precision: fp32 against bf16"). No kind listed:
#: not measured in this project.
BF16_MEASURED = {"cpu": (32, "Conv-2 on 3x32x32 images: train()'s step 2.13x faster than fp32 "
                               "(2-vCPU AMD EPYC with AVX512-BF16, 2026-12-02)")}


def bf16_note(precision: str, device: str | torch.device, image_size: int) -> str | None:
    """One line where bf16 is chosen for inputs smaller than where it was measured to pay on this
    kind of device (or where it was never measured): a small net's step is dominated by overheads
    that bf16 does not shrink, so the speed-up measured on CIFAR-10 need not carry over."""
    if precision != "bf16":
        return None
    kind = torch.device(device).type
    how = "python benchmarks/bench_training.py --precision-compare --shapes digits,cifar10"
    if kind not in BF16_MEASURED:
        return f"--precision bf16: not measured to pay on {kind} in this project; measure with `{how} --device {kind}`"
    side, what = BF16_MEASURED[kind]
    if image_size >= side:
        return None
    return (f"--precision bf16: measured to pay on {side}x{side} images ({what}), not on these "
            f"{image_size}x{image_size}; compare with `{how}`")


_said: set = set()


def say_bf16_note(precision: str, device: str | torch.device, image_size: int) -> None:
    """Print :func:`bf16_note` on stderr, once per process for each device kind and image size
    (a grid trains many nets alike)."""
    note = bf16_note(precision, device, image_size)
    key = (torch.device(device).type, image_size)
    if note is not None and key not in _said:
        _said.add(key)
        print(f"mcwt: note: {note}", file=sys.stderr)


def autocast(precision: str, device: torch.device):
    """The context the forward pass and the loss run in."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_input_format(precision: str, x: torch.Tensor) -> torch.Tensor:
    """A batch of images in the layout ``precision`` computes fastest in (channels-last for bf16)."""
    if precision == "bf16" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
