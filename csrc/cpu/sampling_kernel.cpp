// CPU kernels of the mask-sampling ops: logistic_bernoulli, expected_density,
// logistic_topk (schemas in csrc/mcwt.cpp, spec in mcwt_ext/_reference/sampling.py).
//
// The weight is walked in blocks of kBlock elements (whole Philox groups).
// Each block draws the random words of all its groups first (philox_block.h),
// then runs one branch-free, vectorised loop of logit -> 1 + exp(-z) -> compare.
// Every result depends only on the element index, so the output is the same
// for any thread count or grain.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "../sampling.h"
#include "philox_block.h"

// One binary, best SIMD width at load time (GCC function multiversioning).
// All arithmetic is IEEE and unfused in every clone, so clones agree bit for bit.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MCWT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MCWT_SIMD_CLONES
#endif

namespace mcwt_ext {
namespace sampling {
namespace {

constexpr int64_t kGroups = 64;          // Philox groups per block
constexpr int64_t kBlock = 4 * kGroups;  // elements per block
constexpr int64_t kGrainBlocks = 32;     // smallest parallel task: 8192 elements (~15 us)

alignas(64) const float kZeros[kBlock] = {};  // g of a weight without connectivity

// Random words of a block's groups: the widest SIMD variant this CPU has.
const philox::BlockWordsFn block_words = philox::pick_block_words();

MCWT_SIMD_CLONES
void bernoulli_block(const float* w, const float* g, int64_t n, uint64_t first_group,
                     uint64_t offset, philox::Key key, Logit c, bool* out) {
  alignas(64) uint32_t words[kBlock];
  block_words(first_group, kGroups, offset, key, words);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = keep(words[i], keep_denominator(w[i], g[i], c));
  }
}

MCWT_SIMD_CLONES
double density_block(const float* w, const float* g, int64_t n, Logit c) {
  // 8 independent float64 accumulators: vectorisable without reassociating
  // any single sum, and summed in a fixed order.
  constexpr int64_t kLanes = 8;
  alignas(64) float p[kBlock];
  for (int64_t i = 0; i < n; ++i) p[i] = keep_probability(w[i], g[i], c);
  for (int64_t i = n; i < (n + kLanes - 1) / kLanes * kLanes; ++i) p[i] = 0.0f;
  double acc[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += p[i + j];
  }
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

MCWT_SIMD_CLONES
void topk_block(const float* w, const float* g, int64_t n, uint64_t first_group,
                uint64_t offset, philox::Key key, Logit c, int64_t* out) {
  alignas(64) uint32_t words[kBlock];
  block_words(first_group, kGroups, offset, key, words);
  const uint64_t first = 4 * first_group;
  for (int64_t i = 0; i < n; ++i) {
    const float d = keep_denominator(w[i], g[i], c);
    out[i] = pack_topk_key(topk_key(d, words[i]), first + static_cast<uint64_t>(i));
  }
}

// Calls fn(block, first_element, n, w_float, g_float) for every block, in
// parallel; w_float and g_float hold the block's n weights and connectivities.
template <typename scalar_t, typename BlockFn>
void for_each_block(const at::Tensor& weight, const at::Tensor& row, const BlockFn& fn) {
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const int64_t numel = weight.numel();
  const float* g_row = row.defined() ? row.const_data_ptr<float>() : nullptr;
  const int64_t row_len = row.defined() ? row.numel() : 0;
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float w_buf[kBlock];
    alignas(64) float g_buf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock;
      const int64_t n = std::min(kBlock, numel - begin);
      const float* wf = w_buf;
      if constexpr (std::is_same_v<scalar_t, float>) {
        wf = w + begin;
      } else {
        for (int64_t i = 0; i < n; ++i) w_buf[i] = static_cast<float>(w[begin + i]);
      }
      const float* gf = kZeros;
      if (g_row != nullptr) {
        int64_t j = begin % row_len;
        if (j + n <= row_len) {
          gf = g_row + j;
        } else {  // the block wraps past the end of an output row
          for (int64_t i = 0; i < n; ++i) {
            g_buf[i] = g_row[j];
            j = (j + 1 == row_len) ? 0 : j + 1;
          }
          gf = g_buf;
        }
      }
      fn(b, begin, n, wf, gf);
    }
  });
}

template <typename BlockFn>
void dispatch_blocks(const at::Tensor& weight, const at::Tensor& row, const BlockFn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mcwt_sampling_cpu",
                                  [&] { for_each_block<scalar_t>(weight, row, fn); });
}

at::Tensor logistic_bernoulli_cpu(const at::Tensor& weight,
                                  const std::optional<at::Tensor>& connectivity, double u_mag,
                                  double u_conn, double bias, int64_t seed, int64_t offset) {
  const Logit c = check_args("logistic_bernoulli", weight, connectivity, u_mag, u_conn, bias);
  const at::Tensor w = weight.contiguous();
  const at::Tensor row = connectivity_row(w, connectivity);
  at::Tensor mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const philox::Key key = philox::make_key(seed);
  const uint64_t off = static_cast<uint64_t>(offset);
  dispatch_blocks(w, row, [&](int64_t b, int64_t begin, int64_t n, const float* wf, const float* gf) {
    bernoulli_block(wf, gf, n, b * kGroups, off, key, c, out + begin);
  });
  return mask;
}

// Mean keep probability of the contiguous weight w (row: connectivity_row).
double mean_keep(const at::Tensor& w, const at::Tensor& row, Logit c) {
  const int64_t numel = w.numel();
  std::vector<double> block_sums((numel + kBlock - 1) / kBlock);
  dispatch_blocks(w, row, [&](int64_t b, int64_t, int64_t n, const float* wf, const float* gf) {
    block_sums[b] = density_block(wf, gf, n, c);
  });
  double total = 0.0;  // fixed order: the same sum for any thread count
  for (const double s : block_sums) total += s;
  return total / static_cast<double>(numel);  // the mean over no weights is NaN, as torch.mean
}

at::Tensor expected_density_cpu(const at::Tensor& weight,
                                const std::optional<at::Tensor>& connectivity, double u_mag,
                                double u_conn, double bias) {
  const Logit c = check_args("expected_density", weight, connectivity, u_mag, u_conn, bias);
  const at::Tensor w = weight.contiguous();
  return at::scalar_tensor(mean_keep(w, connectivity_row(w, connectivity), c), w.options().dtype(at::kDouble));
}

// [bias, expected density at it]: the steps of sampling.h's Calibration, each one mean_keep,
// the same arithmetic as calling expected_density at each step's bias.
at::Tensor calibrate_bias_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& connectivity,
                              double u_mag, double u_conn, double density, double tol, int64_t max_iter) {
  Logit c = check_args("calibrate_bias", weight, connectivity, u_mag, u_conn, 0.0);
  check_calibration_args(density, tol, max_iter);
  const at::Tensor w = weight.contiguous();
  const at::Tensor row = connectivity_row(w, connectivity);
  Calibration s;
  while (s.phase != kDone) {
    c.bias = static_cast<float>(calibration_bias(s));
    calibration_step(s, mean_keep(w, row, c), density, tol, static_cast<int>(max_iter));
  }
  TORCH_CHECK(!s.failed, "calibrate_bias: could not bracket the target density");
  return at::tensor({s.result, s.expected}, w.options().dtype(at::kDouble));
}

at::Tensor logistic_topk_cpu(const at::Tensor& weight,
                             const std::optional<at::Tensor>& connectivity, double u_mag,
                             double u_conn, double bias, int64_t k, int64_t seed, int64_t offset) {
  const Logit c = check_args("logistic_topk", weight, connectivity, u_mag, u_conn, bias);
  check_k("logistic_topk", k, weight.numel());
  const at::Tensor w = weight.contiguous();
  const at::Tensor row = connectivity_row(w, connectivity);
  at::Tensor packed = at::empty({w.numel()}, w.options().dtype(at::kLong));
  int64_t* out = packed.data_ptr<int64_t>();
  const philox::Key key = philox::make_key(seed);
  const uint64_t off = static_cast<uint64_t>(offset);
  dispatch_blocks(w, row, [&](int64_t b, int64_t begin, int64_t n, const float* wf, const float* gf) {
    topk_block(wf, gf, n, b * kGroups, off, key, c, out + begin);
  });
  if (k == 0) return at::zeros(w.sizes(), w.options().dtype(at::kBool));
  // Keys are distinct: the k largest are those >= the k-th largest, found by
  // selection (std::nth_element on a copy, O(n)) instead of a top-k sort.
  std::vector<int64_t> keys(out, out + w.numel());
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<int64_t>());
  return packed.ge(keys[k - 1]).view(w.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(mcwt_ext, CPU, m) {
  m.impl("logistic_bernoulli", &logistic_bernoulli_cpu);
  m.impl("expected_density", &expected_density_cpu);
  m.impl("logistic_topk", &logistic_topk_cpu);
  m.impl("calibrate_bias", &calibrate_bias_cpu);
}

}  // namespace sampling
}  // namespace mcwt_ext
