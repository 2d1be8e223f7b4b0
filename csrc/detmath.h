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

// Always inlined: the CPU loops only vectorise with the whole formula in view.
#if defined(__CUDACC__)
#define MCWT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MCWT_HD inline __attribute__((always_inline))
#else
#define MCWT_HD inline
#endif

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
// vectorisable on any SIMD level.
constexpr float kRoundMagic = 0x1.8p23f;

// exp: x = n*ln2 + r (Cody-Waite, ln2 split so n*kLn2Hi is exact for |n| < 2^8),
// exp(r) by the Cephes expf polynomial on |r| <= ln2/2, times 2^n built from bits.
constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kExpP0 = 0x1.a0d2cep-13f;
constexpr float kExpP1 = 0x1.6e879cp-10f;
constexpr float kExpP2 = 0x1.111210p-7f;
constexpr float kExpP3 = 0x1.555382p-5f;
constexpr float kExpP4 = 0x1.555554p-3f;
constexpr float kExpP5 = 0x1.0p-1f;
// Outside [-87, 87] exp saturates to 0 / +inf: inside, every result (and every
// sigmoid 1/(1+exp(-z))) is a normal float, so flush-to-zero modes cannot
// change a bit.
constexpr float kExpLimit = 87.0f;

MCWT_HD float det_exp(float x) {
  const bool above = x > kExpLimit;
  const bool below = x < -kExpLimit;
  const bool in_range = (x >= -kExpLimit) & (x <= kExpLimit);  // false for NaN
  const float xr = select(in_range, x, 0.0f);
  const float t = xr * kLog2e;
  const float n = (t + kRoundMagic) - kRoundMagic;  // |n| <= 126
  const float a = n * kLn2Hi;
  const float b = xr - a;
  const float c = n * kLn2Lo;
  const float r = b - c;
  float p = kExpP0;
  p = p * r + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  const float r2 = r * r;
  float y = p * r2;
  y = y + r;
  y = y + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  y = y * bits_float(scale_bits);
  float out = select(above, bits_float(0x7f800000u) /* +inf */, x);  // NaN stays NaN
  out = select(below, 0.0f, out);
  return select(in_range, y, out);
}

// Keep probability sigmoid(z) = 1 / (1 + exp(-z)); exactly 1 at z = +inf and
// exactly 0 at z = -inf.
MCWT_HD float det_sigmoid(float z) {
  const float e = det_exp(-z);
  const float d = 1.0f + e;
  return 1.0f / d;
}

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
