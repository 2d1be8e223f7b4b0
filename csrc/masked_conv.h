// What the CPU and CUDA kernels of the fused masked layers share: the argument
// checks and the NaN-propagating element functions. Spec:
// mcwt_ext/_reference/masked_conv.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR: the float32 precision API changed

#include <array>
#include <cstdint>
#include <mutex>
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

// Which library's float32 settings an Ieee32Scope pins: cuDNN/cuBLAS or oneDNN.
enum class Ieee32Backend { CUDA, MKLDNN };

// The float32 precision API of the torch we compile against: per-op enums
// (2.10+), per-op strings (2.9), or the older allow_tf32 flags.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
#define MCWT_FP32_API 2
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
#define MCWT_FP32_API 1
#else
#define MCWT_FP32_API 0
#endif

// IEEE float32 convolutions and matmuls for the lifetime of the scope, whatever
// the global TF32 settings (cuDNN convs default to TF32): the sums are
// connectivity, compared across devices, and TF32's 10-bit mantissa moves a
// channel mean by ~1e-4 relative, enough to change masks. The previous
// settings come back on exit; one mutex orders our scopes, so overlapping ops
// on several threads cannot leave a setting changed.
class Ieee32Scope {
 public:
  explicit Ieee32Scope(Ieee32Backend backend) : lock_(mutex()), backend_(backend) {
    auto& ctx = at::globalContext();
#if MCWT_FP32_API == 2
    conv_ = ctx.float32Precision(api_backend(), at::Float32Op::CONV);
    matmul_ = ctx.float32Precision(api_backend(), at::Float32Op::MATMUL);
    ctx.setFloat32Precision(api_backend(), at::Float32Op::CONV, at::Float32Precision::IEEE);
    ctx.setFloat32Precision(api_backend(), at::Float32Op::MATMUL, at::Float32Precision::IEEE);
#elif MCWT_FP32_API == 1
    conv_ = ctx.float32Precision(api_backend(), "conv");
    matmul_ = ctx.float32Precision(api_backend(), "matmul");
    ctx.setFloat32Precision(api_backend(), "conv", "ieee");
    ctx.setFloat32Precision(api_backend(), "matmul", "ieee");
#else
    if (backend_ == Ieee32Backend::CUDA) {
      conv_ = ctx.allowTF32CuDNN();
      matmul_ = ctx.allowTF32CuBLAS();
      ctx.setAllowTF32CuDNN(false);
      ctx.setAllowTF32CuBLAS(false);
    } else {
      conv_ = matmul_ = ctx.allowTF32OneDNN();
      ctx.setAllowTF32OneDNN(false);
    }
#endif
  }
  ~Ieee32Scope() {
    auto& ctx = at::globalContext();
#if MCWT_FP32_API == 2
    ctx.setFloat32Precision(api_backend(), at::Float32Op::CONV, conv_);
    ctx.setFloat32Precision(api_backend(), at::Float32Op::MATMUL, matmul_);
#elif MCWT_FP32_API == 1
    ctx.setFloat32Precision(api_backend(), "conv", conv_);
    ctx.setFloat32Precision(api_backend(), "matmul", matmul_);
#else
    if (backend_ == Ieee32Backend::CUDA) {
      ctx.setAllowTF32CuDNN(conv_);
      ctx.setAllowTF32CuBLAS(matmul_);
    } else {
      ctx.setAllowTF32OneDNN(conv_);
    }
#endif
  }
  Ieee32Scope(const Ieee32Scope&) = delete;
  Ieee32Scope& operator=(const Ieee32Scope&) = delete;

 private:
#if MCWT_FP32_API == 2
  using Setting = at::Float32Precision;
  at::Float32Backend api_backend() const {
    return backend_ == Ieee32Backend::CUDA ? at::Float32Backend::CUDA : at::Float32Backend::MKLDNN;
  }
#elif MCWT_FP32_API == 1
  using Setting = std::string;
  std::string api_backend() const { return backend_ == Ieee32Backend::CUDA ? "cuda" : "mkldnn"; }
#else
  using Setting = bool;
#endif
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
  Ieee32Backend backend_;
  Setting conv_{}, matmul_{};
};

}  // namespace masked_conv
}  // namespace mcwt_ext
