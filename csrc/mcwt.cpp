// Schemas of every mcwt_ext op, and the Python module `mcwt_ext._C`.
//
// Kernels register per backend in cpu/*.cpp and cuda/*.cu (TORCH_LIBRARY_IMPL);
// fake kernels and the Python wrappers live in mcwt_ext/ops/.

#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "conv_path.h"

#if defined(MCWT_WITH_CUDA)
#include <cuda.h>
#define MCWT_CUDA_VERSION CUDA_VERSION
#else
#define MCWT_CUDA_VERSION 0
#endif

namespace {
std::string conv_path_name_of(int64_t in_channels, int64_t out_channels, int64_t kernel_h, int64_t kernel_w,
                              at::ScalarType dtype, int64_t capability) {
  using namespace mcwt_ext::masked_conv;
  return conv_path_name(conv_path(in_channels, out_channels, kernel_h, kernel_w, dtype, capability));
}
}  // namespace

TORCH_LIBRARY(mcwt_ext, m) {
  // Mask sampling (cpu/sampling_kernel.cpp, cuda/sampling_kernel.cu).
  m.def("logistic_bernoulli(Tensor weight, Tensor? connectivity, float u_mag, float u_conn, "
        "float bias, int seed, int offset) -> Tensor");
  m.def("expected_density(Tensor weight, Tensor? connectivity, float u_mag, float u_conn, "
        "float bias) -> Tensor");
  m.def("logistic_topk(Tensor weight, Tensor? connectivity, float u_mag, float u_conn, "
        "float bias, int k, int seed, int offset) -> Tensor");
  // The intercept at which expected_density is `density` (bisection), and the density there:
  // [bias, expected density], float64 on weight's device (on CUDA: one launch, no host sync).
  m.def("calibrate_bias(Tensor weight, Tensor? connectivity, float u_mag, float u_conn, "
        "float density, float tol, int max_iter) -> Tensor");
  // Masked layers fused with channel sums (cpu/masked_conv*, cuda/masked_conv*).
  m.def("masked_conv2d_relu_sums(Tensor input, Tensor weight, Tensor mask, Tensor? bias, "
        "int[2] padding, bool pool) -> (Tensor, Tensor)");
  m.def("masked_linear_relu_sums(Tensor input, Tensor weight, Tensor mask, Tensor? bias) "
        "-> (Tensor, Tensor)");
  // The CUDA path of a masked conv layer (conv_path.h): "cudnn" or "direct", on any build.
  m.def("conv_path(int in_channels, int out_channels, int kernel_h, int kernel_w, ScalarType dtype, "
        "int capability) -> str", &conv_path_name_of);
}

// No functions here: every op goes through the dispatcher. The attributes
// record what this binary was compiled against, checked at import by
// mcwt_ext/_extension.py.
#define MCWT_STR2(x) #x
#define MCWT_STR(x) MCWT_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = TORCH_VERSION;
#if defined(MCWT_SOURCE_SHA256)
  m.attr("source_sha256") = MCWT_STR(MCWT_SOURCE_SHA256);  // setup.py: digest of csrc/ + setup.py
#endif
  m.attr("cuda_version") = MCWT_CUDA_VERSION;  // e.g. 13000; 0 when built without CUDA kernels
}
