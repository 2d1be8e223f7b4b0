// What the CPU and CUDA kernels of the fused masked layers share: the argument
// checks and the NaN-propagating element functions. Spec:
// mcwt_ext/_reference/masked_conv.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR: the float32 precision API changed

#include <array>
#include <cstdint>
#include <optional>
#include <string>

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

// The float32 precision the user set for oneDNN's convs (conv) or matmuls,
// read and never written (a process-wide setting: writing it, even briefly,
// would change other threads' ops). True when it allows less than IEEE
// float32 (TF32 or BF16 arithmetic, which oneDNN uses only where the CPU has
// it); the CPU ops then take ATen's IEEE paths instead of oneDNN.
// The API of the torch we compile against: per-op enums (2.10+), per-op
// strings (2.9), or the older allow_tf32 flag.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
inline bool onednn_below_ieee(bool conv) {
  const at::Float32Precision p = at::globalContext().float32Precision(
      at::Float32Backend::MKLDNN, conv ? at::Float32Op::CONV : at::Float32Op::MATMUL);
  return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
}
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
inline bool onednn_below_ieee(bool conv) {
  const std::string p = at::globalContext().float32Precision("mkldnn", conv ? "conv" : "matmul");
  return p == "tf32" || p == "bf16";
}
#else
inline bool onednn_below_ieee(bool /*conv*/) { return at::globalContext().allowTF32OneDNN(); }
#endif

}  // namespace masked_conv
}  // namespace mcwt_ext
