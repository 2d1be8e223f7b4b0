// CUDA kernels of the mask-sampling ops: logistic_bernoulli, expected_density,
// logistic_topk (schemas in csrc/mcwt.cpp, spec in mcwt_ext/_reference/sampling.py).
//
// One thread per Philox group of 4 consecutive elements, grid-stride: one
// Philox call, one 4-wide load of weights, one 4-byte store of mask bytes.
// Results depend only on the element index, never on the launch shape.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../sampling.h"

namespace mcwt_ext {
namespace sampling {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

// Reads a weight tensor's groups and turns them into keep probabilities.
// index_t is uint32_t when every element index fits, else uint64_t.
template <typename scalar_t, typename index_t>
struct GroupProbabilities {
  const scalar_t* __restrict__ weight;
  const float* __restrict__ g_row;  // connectivity over one output row, or nullptr
  index_t row_len;
  index_t numel;
  bool vector_loads;  // weight is aligned for Vec4 loads
  Logit coeffs;

  __device__ __forceinline__ void operator()(index_t group, float (&p)[4]) const {
    const index_t first = group * 4;
    float w[4];
    if (vector_loads && first + 4 <= numel) {
      const Vec4<scalar_t> v = reinterpret_cast<const Vec4<scalar_t>*>(weight)[group];
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = static_cast<float>(v.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = first + j < numel ? static_cast<float>(weight[first + j]) : 0.0f;
    }
    index_t c = g_row != nullptr ? first % row_len : 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float g = 0.0f;
      if (g_row != nullptr) {
        g = g_row[c];
        c = c + 1 == row_len ? 0 : c + 1;
      }
      p[j] = keep_probability(w[j], g, coeffs);
    }
  }
};

template <typename index_t>
__device__ __forceinline__ index_t grid_start() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename index_t>
__device__ __forceinline__ index_t grid_stride() {
  return static_cast<index_t>(gridDim.x) * blockDim.x;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    bernoulli_kernel(GroupProbabilities<scalar_t, index_t> probs, index_t groups, uint64_t offset,
                     philox::Key key, bool* __restrict__ mask) {
  for (index_t group = grid_start<index_t>(); group < groups; group += grid_stride<index_t>()) {
    float p[4];
    probs(group, p);
    const philox::Words r = philox::group_words(group, offset, key);
    const uint32_t words[4] = {r.x0, r.x1, r.x2, r.x3};
    const index_t first = group * 4;
    if (first + 4 <= probs.numel) {  // mask is freshly allocated: 4-byte aligned
      uchar4 m;
      m.x = uniform24(words[0]) < p[0];
      m.y = uniform24(words[1]) < p[1];
      m.z = uniform24(words[2]) < p[2];
      m.w = uniform24(words[3]) < p[3];
      reinterpret_cast<uchar4*>(mask)[group] = m;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (first + j < probs.numel) mask[first + j] = uniform24(words[j]) < p[j];
      }
    }
  }
}

// Per-block float64 partial sums of p; the host adds the partials in a fixed
// order, so the result does not depend on scheduling.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    density_kernel(GroupProbabilities<scalar_t, index_t> probs, index_t groups,
                   double* __restrict__ block_sums) {
  double sum = 0.0;
  for (index_t group = grid_start<index_t>(); group < groups; group += grid_stride<index_t>()) {
    float p[4];
    probs(group, p);
    const index_t first = group * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) sum += first + j < probs.numel ? static_cast<double>(p[j]) : 0.0;
  }
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage scratch;
  const double block_sum = BlockReduce(scratch).Sum(sum);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = block_sum;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    topk_key_kernel(GroupProbabilities<scalar_t, index_t> probs, index_t groups, uint64_t offset,
                    philox::Key key, int64_t* __restrict__ packed) {
  for (index_t group = grid_start<index_t>(); group < groups; group += grid_stride<index_t>()) {
    float p[4];
    probs(group, p);
    const philox::Words r = philox::group_words(group, offset, key);
    const uint32_t words[4] = {r.x0, r.x1, r.x2, r.x3};
    const index_t first = group * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (first + j < probs.numel) packed[first + j] = pack_topk_key(topk_key(p[j], words[j]), first + j);
    }
  }
}

int launch_blocks(int64_t groups) {
  const int64_t needed = (groups + kThreads - 1) / kThreads;
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                           (2048 / kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, resident)));
}

// Calls launch(probs, groups) with the probability reader for weight's dtype
// and the narrowest index type that holds every element index.
template <typename Launch>
void with_probabilities(const at::Tensor& weight, const at::Tensor& row, Logit coeffs,
                        const Launch& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mcwt_sampling_cuda", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const bool vector_loads = reinterpret_cast<uintptr_t>(w) % sizeof(Vec4<scalar_t>) == 0;
    const float* g_row = row.defined() ? row.const_data_ptr<float>() : nullptr;
    const int64_t numel = weight.numel();
    const int64_t row_len = row.defined() ? row.numel() : 1;
    const int64_t groups = (numel + 3) / 4;
    if (numel + 4 <= std::numeric_limits<int32_t>::max()) {
      launch(GroupProbabilities<scalar_t, uint32_t>{w, g_row, static_cast<uint32_t>(row_len),
                                                    static_cast<uint32_t>(numel), vector_loads, coeffs},
             static_cast<uint32_t>(groups));
    } else {
      launch(GroupProbabilities<scalar_t, uint64_t>{w, g_row, static_cast<uint64_t>(row_len),
                                                    static_cast<uint64_t>(numel), vector_loads, coeffs},
             static_cast<uint64_t>(groups));
    }
  });
}

at::Tensor logistic_bernoulli_cuda(const at::Tensor& weight,
                                   const std::optional<at::Tensor>& connectivity, double u_mag,
                                   double u_conn, double bias, int64_t seed, int64_t offset) {
  const Logit c = check_args("logistic_bernoulli", weight, connectivity, u_mag, u_conn, bias);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor row = connectivity_row(w, connectivity);
  at::Tensor mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return mask;
  const philox::Key key = philox::make_key(seed);
  const uint64_t off = static_cast<uint64_t>(offset);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool* out = mask.data_ptr<bool>();
  with_probabilities(w, row, c, [&](auto probs, auto groups) {
    bernoulli_kernel<<<launch_blocks(groups), kThreads, 0, stream>>>(probs, groups, off, key, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

at::Tensor expected_density_cuda(const at::Tensor& weight,
                                 const std::optional<at::Tensor>& connectivity, double u_mag,
                                 double u_conn, double bias) {
  const Logit c = check_args("expected_density", weight, connectivity, u_mag, u_conn, bias);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t numel = w.numel();
  if (numel == 0) {  // the mean over no weights is NaN, as torch.mean
    return at::full({}, std::numeric_limits<double>::quiet_NaN(), w.options().dtype(at::kDouble));
  }
  const at::Tensor row = connectivity_row(w, connectivity);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor block_sums;
  with_probabilities(w, row, c, [&](auto probs, auto groups) {
    const int blocks = launch_blocks(groups);
    block_sums = at::empty({blocks}, w.options().dtype(at::kDouble));
    density_kernel<<<blocks, kThreads, 0, stream>>>(probs, groups, block_sums.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return block_sums.sum().div_(static_cast<double>(numel));
}

at::Tensor logistic_topk_cuda(const at::Tensor& weight,
                              const std::optional<at::Tensor>& connectivity, double u_mag,
                              double u_conn, double bias, int64_t k, int64_t seed, int64_t offset) {
  const Logit c = check_args("logistic_topk", weight, connectivity, u_mag, u_conn, bias);
  check_k("logistic_topk", k, weight.numel());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor row = connectivity_row(w, connectivity);
  at::Tensor packed = at::empty({w.numel()}, w.options().dtype(at::kLong));
  if (w.numel() > 0) {
    const philox::Key key = philox::make_key(seed);
    const uint64_t off = static_cast<uint64_t>(offset);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    int64_t* out = packed.data_ptr<int64_t>();
    with_probabilities(w, row, c, [&](auto probs, auto groups) {
      topk_key_kernel<<<launch_blocks(groups), kThreads, 0, stream>>>(probs, groups, off, key, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return keep_top_k(packed, k, w.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(mcwt_ext, CUDA, m) {
  m.impl("logistic_bernoulli", &logistic_bernoulli_cuda);
  m.impl("expected_density", &expected_density_cuda);
  m.impl("logistic_topk", &logistic_topk_cuda);
}

}  // namespace sampling
}  // namespace mcwt_ext
