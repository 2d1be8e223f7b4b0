// What the CPU and CUDA mask-sampling kernels share: the per-element formulas
// (host/device), the argument checks, and the device-agnostic ATen steps
// (connectivity layout, exact-k selection). Spec: mcwt_ext/_reference/sampling.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "detmath.h"
#include "philox.h"

namespace mcwt_ext {
namespace sampling {

// Fitted coefficients, rounded once to float32: z = u_mag*|w| + u_conn*g + bias.
struct Logit {
  float u_mag, u_conn, bias;
};

// The draws need only 1 + exp(-z) ("denominator" d): the keep probability is
// p = sigmoid(z) = 1/d. Absent connectivity is g = 0 (the same operations, so
// a zero connectivity vector and none give the same mask).
MCWT_HD float keep_denominator(float w, float g, Logit c) {
  const float a = c.u_mag * detmath::bits_float(detmath::float_bits(w) & 0x7fffffffu);  // |w|
  const float b = c.u_conn * g;
  float z = a + b;
  z = z + c.bias;
  return detmath::sigmoid_denominator(z);
}

MCWT_HD float keep_probability(float w, float g, Logit c) { return 1.0f / keep_denominator(w, g, c); }

// uniform in [0, 1) on the 2^-24 grid: exactly representable.
MCWT_HD float uniform24(uint32_t bits) {
  return static_cast<float>(static_cast<int32_t>(bits >> 8)) * 0x1p-24f;  // signed: vectorises
}

// The Bernoulli draw u < p = 1/d, decided as u*d < 1: no division. d = +inf
// (p = 0) is never kept (0*inf is NaN), d = 1 (p = 1) always.
MCWT_HD bool keep(uint32_t bits, float d) { return uniform24(bits) * d < 1.0f; }

// Efraimidis-Spirakis key log(u')/p = log(u')*d with u' = 1 - uniform in
// (0, 1]: the k largest keys are a weighted sample without replacement. p = 0
// (d = +inf) or NaN gives -inf, kept only when k demands it. `+ 0.0f` turns a
// -0 into +0 so the packed order below agrees with a float sort.
MCWT_HD float topk_key(float d, uint32_t bits) {
  const float u = 1.0f - uniform24(bits);
  const float key = detmath::det_log(u) * d;
  return detmath::select(d < detmath::bits_float(0x7f800000u) /* +inf */, key, detmath::bits_float(0xff800000u) /* -inf */) + 0.0f;
}

// (key descending, index ascending) as one int64 in ascending order, so any
// top-k routine picks the same set: order-preserving key bits on top, the
// complemented index below, sign bit flipped for signed comparison.
MCWT_HD int64_t pack_topk_key(float key, uint64_t index) {
  const uint32_t b = detmath::float_bits(key);
  const uint32_t ordered = b ^ ((0u - (b >> 31)) | 0x80000000u);  // negative: ~b, else b | sign
  const uint64_t packed = (static_cast<uint64_t>(ordered) << 32) |
                          static_cast<uint32_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
  return static_cast<int64_t>(packed ^ 0x8000000000000000ull);
}

// ---- calibration: the intercept at which the mean keep probability is a target ----
// The bisection of mcwt_ext/_reference/sampling.py's calibrate_bias, step by
// step, so that the CPU runs it in a loop and CUDA in one launch with the same
// arithmetic (all in double; the density at a bias b is computed with b rounded
// to float32, as every op does). Each step evaluates the mean keep probability
// at calibration_bias(s) and hands it to calibration_step.
struct Calibration {
  double lo = -1.0, hi = 1.0, result = 0.0, expected = 0.0;
  int phase = 0;  // kWidenLo, kWidenHi, kBisect, kFinal, kDone
  int iter = 0;
  int failed = 0;  // could not bracket the target within +-1e6
};
constexpr int kWidenLo = 0, kWidenHi = 1, kBisect = 2, kFinal = 3, kDone = 4;

// Where the next density is evaluated.
MCWT_HD double calibration_bias(const Calibration& s) {
  switch (s.phase) {
    case kWidenLo: return s.lo;
    case kWidenHi: return s.hi;
    case kBisect: return 0.5 * (s.lo + s.hi);
    default: return s.result;
  }
}

// Moves the state on, given the mean keep probability at calibration_bias(s):
// widen the bracket until it holds the target, bisect until it is narrower than
// tol (relative) or max_iter steps are done, then one more density at the
// result (what the sample records as its expected density).
MCWT_HD void calibration_step(Calibration& s, double mean, double density, double tol, int max_iter) {
  switch (s.phase) {
    case kWidenLo:
      if (mean > density) {
        s.lo *= 2;
        if (s.lo < -1e6) s.failed = 1, s.phase = kDone;
      } else {
        s.phase = kWidenHi;
      }
      return;
    case kWidenHi:
      if (mean < density) {
        s.hi *= 2;
        if (s.hi > 1e6) s.failed = 1, s.phase = kDone;
      } else if (max_iter > 0) {
        s.phase = kBisect;
      } else {
        s.result = 0.5 * (s.lo + s.hi), s.phase = kFinal;
      }
      return;
    case kBisect: {
      const double mid = 0.5 * (s.lo + s.hi);
      if (mean < density) {
        s.lo = mid;
      } else {
        s.hi = mid;
      }
      const double scale = mid < 0 ? -mid : mid;
      if (s.hi - s.lo < tol * (scale > 1.0 ? scale : 1.0) || ++s.iter >= max_iter) {
        s.result = 0.5 * (s.lo + s.hi), s.phase = kFinal;
      }
      return;
    }
    case kFinal:
      s.expected = mean, s.phase = kDone;
      return;
    default:
      return;
  }
}

// ---- host side ---------------------------------------------------------------

inline Logit check_args(const char* op, const at::Tensor& weight,
                        const std::optional<at::Tensor>& connectivity, double u_mag,
                        double u_conn, double bias) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": weight must be float16, bfloat16, float32 or float64, got ", dtype);
  const auto finite32 = [](double x) {
    return std::isfinite(x) && std::fabs(x) <= std::numeric_limits<float>::max();
  };
  TORCH_CHECK(finite32(u_mag), op, ": u_mag must be finite in float32, got ", u_mag);
  TORCH_CHECK(finite32(u_conn), op, ": u_conn must be finite in float32, got ", u_conn);
  TORCH_CHECK(finite32(bias), op, ": bias must be finite in float32, got ", bias);
  if (connectivity.has_value()) {
    const at::Tensor& g = *connectivity;
    TORCH_CHECK(weight.dim() >= 2, op,
                ": connectivity needs a weight with an input dim (dim 1), got weight of shape ",
                weight.sizes());
    TORCH_CHECK(g.dim() == 1, op, ": connectivity must be 1-D, got shape ", g.sizes());
    TORCH_CHECK(g.size(0) == weight.size(1), op, ": connectivity must have length weight.size(1) = ",
                weight.size(1), ", got ", g.size(0));
    TORCH_CHECK(g.device() == weight.device(), op, ": connectivity must be on ", weight.device(),
                " like weight, got ", g.device());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), op,
                ": connectivity must be floating point, got ", g.scalar_type());
  }
  return {static_cast<float>(u_mag), static_cast<float>(u_conn), static_cast<float>(bias)};
}

// g laid out over one output row of the (contiguous) weight, float32: element i
// of the weight reads row[i % row.numel()]. Undefined when there is no connectivity.
inline at::Tensor connectivity_row(const at::Tensor& weight,
                                   const std::optional<at::Tensor>& connectivity) {
  if (!connectivity.has_value()) return at::Tensor();
  int64_t taps = 1;  // kernel positions per input channel
  for (int64_t d = 2; d < weight.dim(); ++d) taps *= weight.size(d);
  const int64_t channels = weight.size(1);
  return connectivity->to(at::kFloat).reshape({channels, 1}).expand({channels, taps}).contiguous().view(-1);
}

inline void check_calibration_args(double density, double tol, int64_t max_iter) {
  TORCH_CHECK(density > 0.0 && density < 1.0, "calibrate_bias: density must lie in (0, 1), got ", density);
  TORCH_CHECK(tol > 0.0, "calibrate_bias: tol must be positive, got ", tol);
  TORCH_CHECK(max_iter >= 0 && max_iter <= (int64_t{1} << 30), "calibrate_bias: max_iter must lie in [0, 2^30], got ",
              max_iter);
}

inline void check_k(const char* op, int64_t k, int64_t numel) {
  TORCH_CHECK(k >= 0 && k <= numel, op, ": k must be in [0, weight.numel() = ", numel, "], got ", k);
  TORCH_CHECK(numel <= (int64_t{1} << 32), op,
              ": exact-k sampling supports at most 2^32 weights, got ", numel);
}

}  // namespace sampling
}  // namespace mcwt_ext
