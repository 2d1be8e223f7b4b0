"""Training-batch augmentation, a pure function of ``(seed, iteration)``.

``flip-crop`` is open_lth's CIFAR-10 training augmentation (``RandomHorizontalFlip()`` then
``RandomCrop(32, 4)``, on by default there; Frankle & Carbin train ResNet-20 on augmented data):
each image is flipped left-right with probability 1/2, padded by 4 pixels of black (0 before
normalisation, so ``-mean / std`` of each channel here, where images are normalised already) and
cropped back to its size at an offset uniform in 0..8 on each axis. ``none`` leaves batches alone.

The draws of iteration ``i`` come from a generator seeded with ``SeedSequence([seed, i, TAG])``
for the whole global batch (a torchrun rank augments its slice of it), so a resumed run, a run on
another device and a run with DataLoader workers see the same images. Only training batches are
augmented; evaluation never is.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import UsageError

__all__ = ["AUGMENTS", "PAD", "Augment", "parse_augment", "flip_crop"]

AUGMENTS = ("none", "flip-crop")
PAD = 4
TAG = 0xA06  # keeps these draws apart from the batch order's SeedSequence([seed, epoch])


def parse_augment(text: str) -> str:
    if text not in AUGMENTS:
        raise UsageError(f"{text!r} is not one of {', '.join(AUGMENTS)}")
    return text


def flip_crop(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              fill: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Images ``x`` [B, C, H, W], each flipped left-right where ``flip`` [B], padded by ``pad``
    pixels of ``fill`` [C] and cropped to H x W at offset (``dy``, ``dx``) [B] in 0..2*pad. An
    exact gather: no arithmetic on the pixel values."""
    b, c, h, w = x.shape
    padded = fill.to(x.device, x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad:pad + h, pad:pad + w] = x
    dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)               # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)               # [B, W]
    # a flipped image, padded, cropped at dx: column j is padded column w - 1 + 2 pad - (dx + j)
    cols = torch.where(flip[:, None], w - 1 + 2 * pad - cols, cols)
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class Augment:
    """The augmentation ``kind`` of a training run of seed ``seed`` and global batch size
    ``batch_size`` on images normalised with ``mean`` and ``std`` (per channel)."""

    def __init__(self, kind: str, seed: int, batch_size: int, mean, std):
        self.kind, self.seed, self.batch_size = parse_augment(kind), seed, batch_size
        self.fill = -torch.as_tensor(mean, dtype=torch.float32) / torch.as_tensor(std, dtype=torch.float32)

    def draws(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flip, dy, dx) of every image of the global batch of ``iteration`` (0-based)."""
        state = np.random.SeedSequence([self.seed, iteration, TAG]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state >> 1))
        n = self.batch_size
        flip = torch.randint(2, (n,), generator=g).bool()
        dy, dx = torch.randint(2 * PAD + 1, (2, n), generator=g)
        return flip, dy, dx

    def __call__(self, x: torch.Tensor, iteration: int, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """The training batch ``x`` of ``iteration``, augmented; ``x`` is slice ``part`` (rank,
        world size) of the global batch, as :func:`mcwt_ext.distributed.local_slice` cuts it."""
        if self.kind == "none":
            return x
        from .distributed import local_slice

        flip, dy, dx = (local_slice(t, part) for t in self.draws(iteration))
        return flip_crop(x, flip, dy, dx, self.fill)
