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

import torch

__all__ = ["PRECISIONS", "parse_precision", "native_bf16", "check_precision", "autocast", "to_input_format"]

PRECISIONS = ("fp32", "bf16")


def parse_precision(text: str) -> str:
    if text not in PRECISIONS:
        raise ValueError(f"{text!r} is not one of {', '.join(PRECISIONS)}")
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
        raise ValueError("--precision bf16: this CPU has no bfloat16 instructions that oneDNN uses "
                         "(AVX512-BF16 or AMX), where emulated bf16 is slower than fp32; "
                         "use --precision fp32")
    if kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bfloat16 arithmetic; use --precision fp32")


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
