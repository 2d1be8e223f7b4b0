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

inline void check_k(const char* op, int64_t k, int64_t numel) {
  TORCH_CHECK(k >= 0 && k <= numel, op, ": k must be in [0, weight.numel() = ", numel, "], got ", k);
  TORCH_CHECK(numel <= (int64_t{1} << 32), op,
              ": exact-k sampling supports at most 2^32 weights, got ", numel);
}

}  // namespace sampling
}  // namespace mcwt_ext
