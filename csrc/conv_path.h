// Which CUDA path computes a masked conv layer (cuda/masked_conv_kernel.cu): a
// fixed function of the layer's shapes, its dtype and the GPU's compute
// capability. Never a timing: the two paths round differently, and the sums
// they return are connectivity, which feeds the sampler, so a choice that
// could differ between two processes on the same GPU would give them other
// masks. Plain C++ (no CUDA): the op `conv_path` exposes the same function on
// every build, so the path is recorded and tested on any machine.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace mcwt_ext {
namespace masked_conv {

enum class ConvPath { kCudnn, kDirect };

inline const char* conv_path_name(ConvPath path) {
  return path == ConvPath::kDirect ? "direct" : "cudnn";
}

// The rule. cuDNN for every layer, on every GPU and dtype, until timings say
// otherwise. Reasoning: no GPU has timed the direct kernel since it was
// rewritten (benchmarks/RESULTS.md: "CUDA: not measured yet"), while cuDNN is
// tested on every shape and every capability torch supports; in IEEE float32
// (these ops never use TF32) both paths run on the same FP32 units, so the
// direct kernel's only sure gain is skipping the masked-weight copy, which is
// small next to a batch of activations. `benchmarks/bench_connectivity.py
// --section op --device cuda` times both paths per layer shape: where the direct
// kernel wins there by a clear margin, the rule names those shapes (by these
// arguments, never by a measurement at run time). MCWT_CONV_IMPL=direct runs it
// meanwhile (conv_path below).
inline ConvPath conv_path_rule(int64_t in_channels, int64_t out_channels, int64_t kernel_h,
                               int64_t kernel_w, at::ScalarType dtype, int64_t capability) {
  (void)in_channels, (void)out_channels, (void)kernel_h, (void)kernel_w, (void)dtype, (void)capability;
  return ConvPath::kCudnn;
}

// MCWT_CONV_IMPL (debugging only: "cudnn" or "direct"; unset, empty or "auto":
// the rule). The direct kernel falls back to cuDNN where its shared-memory
// tiles cannot hold the layer's kernel (cuda/masked_conv_kernel.cu).
inline ConvPath conv_path(int64_t in_channels, int64_t out_channels, int64_t kernel_h,
                          int64_t kernel_w, at::ScalarType dtype, int64_t capability) {
  const char* v = std::getenv("MCWT_CONV_IMPL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) {
    return conv_path_rule(in_channels, out_channels, kernel_h, kernel_w, dtype, capability);
  }
  if (std::strcmp(v, "cudnn") == 0) return ConvPath::kCudnn;
  if (std::strcmp(v, "direct") == 0) return ConvPath::kDirect;
  TORCH_CHECK(false, "masked_conv2d_relu_sums: MCWT_CONV_IMPL must be 'auto', 'cudnn' or 'direct', got '",
              v, "'");
}

}  // namespace masked_conv
}  // namespace mcwt_ext
