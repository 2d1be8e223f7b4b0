"""Deterministic float32 exp, sigmoid and log: the spec of csrc/detmath.h.

Each line replays one separately rounded float32 operation of the C++/CUDA
header, in the same order, so results agree bit for bit. Constants are
written in hex and are exact in float32.
"""
import torch

ROUND_MAGIC = float.fromhex("0x1.8p23")  # (t + M) - M == round-half-even(t) for |t| < 2^22

LOG2E = float.fromhex("0x1.715476p+0")
LN2_HI = float.fromhex("0x1.62e4p-1")
LN2_LO = float.fromhex("0x1.7f7d1cp-20")
EXP_P = [float.fromhex(h) for h in
         ("0x1.a0d2cep-13", "0x1.6e879cp-10", "0x1.111210p-7", "0x1.555382p-5", "0x1.555554p-3", "0x1.0p-1")]
EXP_LIMIT = 87.0

SQRT_HALF_BITS = 0x3F3504F3
ONE_BITS = 0x3F800000
LOG_LN2_HI = float.fromhex("0x1.62e3p-1")
LOG_LN2_LO = float.fromhex("0x1.2fefa2p-17")
LG1, LG2, LG3, LG4 = (float.fromhex(h) for h in ("0x1.555554p-1", "0x1.999c26p-2", "0x1.23d3dcp-2", "0x1.f13c4cp-3"))


def _float32(x):
    if x.dtype != torch.float32:
        raise TypeError(f"expected a float32 tensor, got {x.dtype}")
    return x


def det_exp(x):
    """exp(x); 0 below -87, +inf above 87, NaN for NaN."""
    x = _float32(x)
    in_range = (x >= -EXP_LIMIT) & (x <= EXP_LIMIT)
    xr = torch.where(in_range, x, torch.zeros_like(x))
    t = xr * LOG2E
    n = (t + ROUND_MAGIC) - ROUND_MAGIC
    a = n * LN2_HI
    b = xr - a
    c = n * LN2_LO
    r = b - c
    p = torch.full_like(r, EXP_P[0])
    for coeff in EXP_P[1:]:
        p = p * r
        p = p + coeff
    r2 = r * r
    y = p * r2
    y = y + r
    y = y + 1.0
    scale = torch.bitwise_left_shift(n.to(torch.int32) + 127, 23).view(torch.float32)
    y = y * scale
    outside = torch.where(x > EXP_LIMIT, torch.full_like(x, float("inf")),
                          torch.where(x < -EXP_LIMIT, torch.zeros_like(x), x))
    return torch.where(in_range, y, outside)


def det_sigmoid(z):
    """1 / (1 + exp(-z)); exactly 1 at +inf, exactly 0 at -inf."""
    e = det_exp(-_float32(z))
    d = e + 1.0
    return torch.ones_like(d) / d


def det_log(x):
    """log(x) for positive normal float32 x; det_log(1) is +0."""
    ix = _float32(x).view(torch.int32) + (ONE_BITS - SQRT_HALF_BITS)
    k = torch.bitwise_right_shift(ix, 23) - 127
    ix = torch.bitwise_and(ix, 0x007FFFFF) + SQRT_HALF_BITS
    f = ix.view(torch.float32) - 1.0
    s = f / (f + 2.0)
    z = s * s
    w = z * z
    t1 = w * (w * LG4 + LG2)
    t2 = z * (w * LG3 + LG1)
    R = t2 + t1
    hfsq = (f * 0.5) * f
    dk = k.to(torch.float32)
    y = s * (hfsq + R)
    y = y + dk * LOG_LN2_LO
    y = y - hfsq
    y = y + f
    y = y + dk * LOG_LN2_HI
    return y
