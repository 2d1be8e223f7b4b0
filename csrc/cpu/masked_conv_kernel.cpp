// CPU kernels of the fused masked layers: masked_conv2d_relu_sums and
// masked_linear_relu_sums (schemas in csrc/mcwt.cpp).
//
// Each op returns the activation entering the next layer and, from the same
// pass that writes it, that activation's per-channel sums in float64 -- the
// connectivity of the next layer's inputs, before the caller divides by the
// number of positions. ATen does the conv/matmul; one fused epilogue pass over
// its output then applies ReLU, [2x2 max-pool], writes y and accumulates the
// sums, so no later pass re-reads the activations to measure connectivity.
// Argument checks and the NaN-propagating relu / nan_max: csrc/masked_conv.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../masked_conv.h"

namespace mcwt_ext {
namespace masked_conv {

namespace {

// ReLU in place. A loop of its own compiles to vector max instructions; fused
// with the float64 accumulation below, GCC emits a branch per element instead,
// which random signs mispredict half the time (~4x slower).
template <typename scalar_t>
void relu_inplace(scalar_t* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    p[i] = relu(p[i]);
  }
}

// Sum in float64 with four independent lanes (a fixed order: the result does
// not depend on the thread count).
template <typename scalar_t>
double sum_double(const scalar_t* p, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) {
      acc[l] += static_cast<double>(p[i + l]);
    }
  }
  for (; i < n; ++i) {
    acc[0] += static_cast<double>(p[i]);
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// ReLU in place over one contiguous plane; returns its sum. Block by block, so
// the sum re-reads each block from L1, not from memory.
template <typename scalar_t>
double relu_inplace_sum(scalar_t* p, int64_t n) {
  constexpr int64_t kBlock = 2048;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    relu_inplace(p + b, len);
    total += sum_double(p + b, len);
  }
  return total;
}

// 2x2 max-pool (floor mode) of one ho x wo plane z into a (ho/2) x (wo/2) plane y,
// then ReLU (max and ReLU commute); returns y's sum.
template <typename scalar_t>
double pool_relu_sum(const scalar_t* z, int64_t ho, int64_t wo, scalar_t* y) {
  const int64_t hy = ho / 2, wy = wo / 2;
  double acc = 0.0;
  for (int64_t py = 0; py < hy; ++py) {
    const scalar_t* r0 = z + (2 * py) * wo;
    const scalar_t* r1 = r0 + wo;
    scalar_t* out = y + py * wy;
    for (int64_t px = 0; px < wy; ++px) {
      out[px] = relu(nan_max(nan_max(r0[2 * px], r0[2 * px + 1]),
                             nan_max(r1[2 * px], r1[2 * px + 1])));
    }
    acc += sum_double(out, wy);  // the row just written, from L1
  }
  return acc;
}

// Grain for at::parallel_for so that each task touches ~32K activations.
int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems_per_item));
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_relu_sums_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const std::optional<at::Tensor>& bias, at::IntArrayRef padding, bool pool) {
  const auto out = check_conv_args(input, weight, mask, bias, padding, pool);
  const int64_t n = input.size(0), k = weight.size(0), ho = out[0], wo = out[1];
  const int64_t hy = pool ? ho / 2 : ho, wy = pool ? wo / 2 : wo;

  // weight * mask materialises a masked copy: cheap on CPU, where the weight is
  // tiny next to the activations, and ATen's conv wants a dense weight. The
  // bias goes into the conv. Contiguous operands give a contiguous NCHW output
  // (a channels-last one would make ATen pick a channels-last output).
  // IEEE float32 whatever the user set for oneDNN (onednn_below_ieee): then
  // ATen's im2col + BLAS conv, slower, never less exact.
  const at::Tensor x = input.contiguous(), wm = (weight * mask).contiguous();
  const at::Tensor z =
      (x.scalar_type() == at::kFloat && onednn_below_ieee(/*conv=*/true))
          ? at::_slow_conv2d_forward(x, wm, {weight.size(2), weight.size(3)}, bias, /*stride=*/{1, 1}, padding)
                .contiguous()
          : at::conv2d(x, wm, bias, /*stride=*/{1, 1}, padding).contiguous();
  at::Tensor y = pool ? at::empty({n, k, hy, wy}, z.options()) : z;  // no pool: in place
  at::Tensor sums = at::zeros({k}, z.options().dtype(at::kDouble));
  if (n == 0 || k == 0) {
    return {y, sums};
  }

  // One partial sum per (image, channel) plane, reduced over images in a fixed
  // order afterwards: deterministic at any thread count.
  std::vector<double> plane_sums(static_cast<size_t>(n * k));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "masked_conv2d_relu_sums_cpu", [&] {
        scalar_t* zp = z.data_ptr<scalar_t>();
        scalar_t* yp = y.data_ptr<scalar_t>();
        at::parallel_for(0, n * k, grain_for(ho * wo), [&](int64_t begin, int64_t end) {
          for (int64_t plane = begin; plane < end; ++plane) {
            plane_sums[plane] =
                pool ? pool_relu_sum(zp + plane * ho * wo, ho, wo, yp + plane * hy * wy)
                     : relu_inplace_sum(zp + plane * ho * wo, ho * wo);
          }
        });
      });
  double* s = sums.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k; ++c) {
      s[c] += plane_sums[i * k + c];
    }
  }
  return {y, sums};
}

std::tuple<at::Tensor, at::Tensor> masked_linear_relu_sums_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, mask, bias);
  const int64_t n = input.size(0), k = weight.size(0);
  // Masked copy of the weight: see masked_conv2d_relu_sums_cpu.
  // Where the user let oneDNN's matmuls go below IEEE float32, in float64
  // and rounded once: never less exact than IEEE float32.
  at::Tensor y;
  if (input.scalar_type() == at::kFloat && onednn_below_ieee(/*conv=*/false)) {
    const auto wide = [](const at::Tensor& t) { return t.to(at::kDouble); };
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(wide(*bias)) : std::nullopt;
    y = at::linear(wide(input), wide(weight * mask), b).to(at::kFloat).contiguous();
  } else {
    y = at::linear(input.contiguous(), weight * mask, bias).contiguous();
  }
  at::Tensor sums = at::zeros({k}, y.options().dtype(at::kDouble));
  if (n == 0 || k == 0) {
    return {y, sums};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "masked_linear_relu_sums_cpu", [&] {
        scalar_t* yp = y.data_ptr<scalar_t>();
        double* s = sums.data_ptr<double>();
        // Tasks own column ranges and walk all rows in order: each unit's sum
        // is accumulated by one task, in a fixed order.
        at::parallel_for(0, k, grain_for(n), [&](int64_t begin, int64_t end) {
          std::vector<double> acc(static_cast<size_t>(end - begin), 0.0);
          for (int64_t i = 0; i < n; ++i) {
            scalar_t* row = yp + i * k + begin;
            relu_inplace(row, end - begin);
            for (int64_t j = 0; j < end - begin; ++j) {
              acc[j] += static_cast<double>(row[j]);
            }
          }
          std::copy(acc.begin(), acc.end(), s + begin);
        });
      });
  return {y, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(mcwt_ext, CPU, m) {
  m.impl("masked_conv2d_relu_sums", &masked_conv2d_relu_sums_cpu);
  m.impl("masked_linear_relu_sums", &masked_linear_relu_sums_cpu);
}

}  // namespace masked_conv
}  // namespace mcwt_ext
