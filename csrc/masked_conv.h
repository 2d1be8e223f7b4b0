// What the CPU and CUDA kernels of the fused masked layers share: the argument
// checks and the NaN-propagating element functions. Spec:
// mcwt_ext/_reference/masked_conv.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>

#include "hd.h"

namespace mcwt_ext {
namespace masked_conv {

// NaN-propagating, like torch.relu and max_pool2d.
template <typename T>
MCWT_HD T relu(T v) {
  return v < T(0) ? T(0) : v;
}
template <typename T>
MCWT_HD T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

inline void check_layer_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                             const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " must equal input dtype ", input.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": mask shape ", mask.sizes(),
              " must equal weight shape ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": input has ", input.size(1),
              " channels/features but weight expects ", weight.size(1));
  TORCH_CHECK(weight.device() == input.device() && mask.device() == input.device(), op,
              ": input, weight and mask must be on one device, got ", input.device(), ", ",
              weight.device(), ", ", mask.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias must have shape [",
                weight.size(0), "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == input.scalar_type(), op, ": bias dtype ", b.scalar_type(),
                " must equal input dtype ", input.scalar_type());
    TORCH_CHECK(b.device() == input.device(), op, ": bias must be on ", input.device(),
                ", got ", b.device());
  }
}

// Validates the conv op's arguments; returns the conv output size {Ho, Wo}.
inline std::array<int64_t, 2> check_conv_args(const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& mask,
                                        const std::optional<at::Tensor>& bias,
                                        at::IntArrayRef padding, bool pool) {
  constexpr const char* op = "masked_conv2d_relu_sums";
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D [N, C, H, W], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [K, C, kh, kw], got ",
              weight.sizes());
  check_layer_args(op, input, weight, mask, bias);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight kernel size must be positive, got ", weight.sizes());
  const int64_t ho = input.size(2) + 2 * padding[0] - weight.size(2) + 1;
  const int64_t wo = input.size(3) + 2 * padding[1] - weight.size(3) + 1;
  TORCH_CHECK(ho >= 1 && wo >= 1, op, ": kernel ", weight.size(2), "x", weight.size(3),
              " is larger than the padded input ", input.size(2) + 2 * padding[0], "x",
              input.size(3) + 2 * padding[1]);
  TORCH_CHECK(!pool || (ho >= 2 && wo >= 2), op, ": conv output ", ho, "x", wo,
              " is too small for 2x2 max-pooling");
  return {ho, wo};
}

inline void check_linear_args(const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "masked_linear_relu_sums";
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D [N, in], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  check_layer_args(op, input, weight, mask, bias);
}

// IEEE float32 convolutions and matmuls for the lifetime of the scope, whatever
// the global TF32 settings (cuDNN convs default to TF32): the sums are
// connectivity, compared across devices, and TF32's 10-bit mantissa moves a
// channel mean by ~1e-4 relative, enough to change masks. The previous
// settings come back on exit; one mutex orders our scopes, so overlapping ops
// on several threads cannot leave a setting changed.
class Ieee32Scope {
 public:
  explicit Ieee32Scope(at::Float32Backend backend)
      : lock_(mutex()),
        backend_(backend),
        conv_(at::globalContext().float32Precision(backend, at::Float32Op::CONV)),
        matmul_(at::globalContext().float32Precision(backend, at::Float32Op::MATMUL)) {
    at::globalContext().setFloat32Precision(backend, at::Float32Op::CONV, at::Float32Precision::IEEE);
    at::globalContext().setFloat32Precision(backend, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  }
  ~Ieee32Scope() {
    at::globalContext().setFloat32Precision(backend_, at::Float32Op::CONV, conv_);
    at::globalContext().setFloat32Precision(backend_, at::Float32Op::MATMUL, matmul_);
  }
  Ieee32Scope(const Ieee32Scope&) = delete;
  Ieee32Scope& operator=(const Ieee32Scope&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
  at::Float32Backend backend_;
  at::Float32Precision conv_, matmul_;
};

}  // namespace masked_conv
}  // namespace mcwt_ext
