"""Philox-4x32-10 in int64 tensor arithmetic: the spec of csrc/philox.h.

Every value is a uint32 held in an int64 tensor; products are split in 16-bit
halves so nothing overflows int64.
"""
import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF


def _mulhilo(a, b):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant a and tensor b."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # low 48 bits of the product, plus carry
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32_10(counter, key):
    """Four output words for counters (c0, c1, c2, c3) (int64 tensors) and key (k0, k1) (ints)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def split64(value):
    """An int64 (seed or offset) as its (low, high) uint32 words, two's complement."""
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return value & MASK32, value >> 32


def element_words(numel, seed, offset, device="cpu"):
    """Random word of each of numel elements, as an int64 tensor.

    Key = seed; counter = (group, group >> 32, offset, offset >> 32) for each
    group of 4 elements; element i takes word i % 4 of group i // 4.
    """
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    off_lo, off_hi = split64(offset)
    counter = (groups & MASK32, groups >> 32, torch.full_like(groups, off_lo), torch.full_like(groups, off_hi))
    words = philox4x32_10(counter, split64(seed))
    return torch.stack(words, dim=1).reshape(-1)[:numel]
