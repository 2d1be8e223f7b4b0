"""Deterministic float32 exp, sigmoid and log: the spec of csrc/detmath.h.

Each line replays one separately rounded float32 operation of the C++/CUDA
header, in the same order, so results agree bit for bit. Constants are
written in hex and are exact in float32.
"""
import torch

ROUND_MAGIC = float.fromhex("0x1.8p23")  # (t + M) - M == round-half-even(t) for |t| < 2^22
ROUND_MAGIC_BITS = 0x4B400000  # bits(t + M) - ROUND_MAGIC_BITS == round(t)

LOG2E = float.fromhex("0x1.715476p+0")
LN2_HI = float.fromhex("0x1.62e4p-1")
LN2_LO = float.fromhex("0x1.7f7d1cp-20")
EXP_Q = [float.fromhex(h) for h in ("0x1.106256p-7", "0x1.572a66p-5", "0x1.5557b0p-3", "0x1.fffdfcp-2")]
EXP_LOW, EXP_HIGH = -88.0, 89.0

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
    """exp(x): exactly 0 below about -87.7, +inf from about 88.4, NaN for NaN."""
    x = _float32(x)
    xc = torch.where(x < EXP_LOW, torch.full_like(x, EXP_LOW), x)  # NaN stays NaN
    xc = torch.where(xc > EXP_HIGH, torch.full_like(x, EXP_HIGH), xc)
    t = xc * LOG2E
    tm = t + ROUND_MAGIC
    n = tm - ROUND_MAGIC
    a = n * LN2_HI
    b = xc - a
    c = n * LN2_LO
    r = b - c
    q = torch.full_like(r, EXP_Q[0])
    for coeff in EXP_Q[1:]:
        q = q * r
        q = q + coeff
    r2 = r * r
    y = q * r2
    y = y + r
    y = y + 1.0
    # (n + 127) << 23 in uint32 arithmetic (int64 here, then the low 32 bits as float32 bits)
    scale_bits = torch.bitwise_left_shift(tm.view(torch.int32).long() + (127 - ROUND_MAGIC_BITS), 23) & 0xFFFFFFFF
    scale = _as_float32_bits(scale_bits)
    return y * scale


def _as_float32_bits(bits):
    """float32 tensor whose bit patterns are the low 32 bits of an int64 tensor."""
    return (bits - ((bits & 0x80000000) << 1)).to(torch.int32).view(torch.float32)


def sigmoid_denominator(z):
    """1 + exp(-z): sigmoid(z) is its reciprocal. 1 at z = +inf, +inf at z = -inf."""
    e = det_exp(-_float32(z))
    return e + 1.0


def det_sigmoid(z):
    """1 / (1 + exp(-z)); exactly 1 at +inf, exactly 0 at -inf."""
    d = sigmoid_denominator(z)
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
