// Deterministic float32 math shared by the CPU and CUDA sampling kernels.
//
// A sampled mask must be bit-identical on CPU, on CUDA and in the PyTorch
// reference (mcwt_ext/_reference/detmath.py). libm's expf/logf and CUDA's
// differ by ulps, so exp and log are built here from +, -, *, / and exponent
// bit manipulation only, each operation rounded on its own (the build passes
// -ffp-contract=off and --fmad=false so no FMA is fused behind our back).
// The reference replays these functions operation for operation; change one
// and the other together.
#pragma once

#include <cstdint>
#include <cstring>

#include "hd.h"

namespace mcwt_ext {
namespace detmath {

MCWT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MCWT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// c ? a : b as a bit blend. A plain ?: lets GCC sink the computation of the
// unselected value into a branch, which (with trapping math, the default)
// it then cannot if-convert, and the loop does not vectorise.
MCWT_HD float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
}

// (t + 1.5*2^23) - 1.5*2^23 rounds t to the nearest integer, ties to even,
// for |t| < 2^22: the same as rintf and torch.round, but branch-free and
// vectorisable on any SIMD level. The bits of t + 1.5*2^23 hold that integer
// in their low bits: bits - kRoundMagicBits = round(t).
constexpr float kRoundMagic = 0x1.8p23f;
constexpr uint32_t kRoundMagicBits = 0x4b400000u;

// exp: x = n*ln2 + r (Cody-Waite, ln2 split so n*kLn2Hi is exact for |n| < 2^8),
// exp(r) = 1 + r + r^2*q(r) on |r| <= ln2/2 with q a cubic fitted for minimax
// relative error (1.05e-7 before rounding), times 2^n built from the bits of
// the rounding step. x is first clamped to [-88, 89]: below, n = -127 makes
// 2^n the bit pattern 0, so exp is exactly 0; above, n = 128 makes it +inf.
// NaN passes the clamps (comparisons with NaN are false) and stays NaN.
// 22 operations, no conversion, no division.
constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kExpQ0 = 0x1.fffdfcp-2f;
constexpr float kExpQ1 = 0x1.5557b0p-3f;
constexpr float kExpQ2 = 0x1.572a66p-5f;
constexpr float kExpQ3 = 0x1.106256p-7f;
constexpr float kExpLow = -88.0f;
constexpr float kExpHigh = 89.0f;

MCWT_HD float det_exp(float x) {
  float xc = select(x < kExpLow, kExpLow, x);
  xc = select(xc > kExpHigh, kExpHigh, xc);
  const float t = xc * kLog2e;
  const float tm = t + kRoundMagic;
  const float n = tm - kRoundMagic;  // -127 <= n <= 128
  const float a = n * kLn2Hi;
  const float b = xc - a;
  const float c = n * kLn2Lo;
  const float r = b - c;
  float q = kExpQ3;
  q = q * r + kExpQ2;
  q = q * r + kExpQ1;
  q = q * r + kExpQ0;
  const float r2 = r * r;
  float y = q * r2;
  y = y + r;
  y = y + 1.0f;
  // (n + 127) << 23: 0 (the float +0) at n = -127, +inf's bits at n = 128.
  const uint32_t scale_bits = (float_bits(tm) + (127u - kRoundMagicBits)) << 23;
  return y * bits_float(scale_bits);
}

// 1 + exp(-z): the keep probability is sigmoid(z) = 1 / sigmoid_denominator(z).
// 1 at z = +inf (and for z > 88), +inf at z = -inf.
MCWT_HD float sigmoid_denominator(float z) {
  const float e = det_exp(-z);
  return 1.0f + e;
}

// sigmoid(z) = 1 / (1 + exp(-z)); exactly 1 at z = +inf and exactly 0 at z = -inf.
MCWT_HD float det_sigmoid(float z) { return 1.0f / sigmoid_denominator(z); }

// log for positive normal x (musl logf): x = 2^k * (1 + f), 1 + f in
// [sqrt(1/2), sqrt(2)), log(1 + f) = f - f^2/2 + s*(f^2/2 + R(s^2)), s = f/(2+f).
// det_log(1) is +0.
constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;
constexpr uint32_t kOneBits = 0x3f800000u;
constexpr float kLogLn2Hi = 0x1.62e3p-1f;
constexpr float kLogLn2Lo = 0x1.2fefa2p-17f;
constexpr float kLg1 = 0x1.555554p-1f;
constexpr float kLg2 = 0x1.999c26p-2f;
constexpr float kLg3 = 0x1.23d3dcp-2f;
constexpr float kLg4 = 0x1.f13c4cp-3f;

MCWT_HD float det_log(float x) {
  uint32_t ix = float_bits(x) + (kOneBits - kSqrtHalfBits);
  const int32_t k = static_cast<int32_t>(ix >> 23) - 127;
  ix = (ix & 0x007fffffu) + kSqrtHalfBits;
  const float f = bits_float(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (kLg2 + w * kLg4);
  const float t2 = z * (kLg1 + w * kLg3);
  const float R = t2 + t1;
  const float hfsq = (0.5f * f) * f;
  const float dk = static_cast<float>(k);
  float y = s * (hfsq + R);
  y = y + dk * kLogLn2Lo;
  y = y - hfsq;
  y = y + f;
  y = y + dk * kLogLn2Hi;
  return y;
}

}  // namespace detmath
}  // namespace mcwt_ext
