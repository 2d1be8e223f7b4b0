// CUDA kernels of the mask-sampling ops: logistic_bernoulli, expected_density,
// logistic_topk (schemas in csrc/mcwt.cpp, spec in mcwt_ext/_reference/sampling.py).
//
// Each thread takes chunks of kGroupsPerThread Philox groups (4 consecutive
// elements each), grid-stride: per group one Philox call, one 4-wide load of
// weights, one 4-byte store of mask bytes; one modulo per chunk for the
// connectivity index. Results depend only on the element index, never on the
// launch shape.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <math_constants.h>
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../sampling.h"

namespace mcwt_ext {
namespace sampling {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
// Philox groups (of 4 elements) per thread and grid-stride step: 16 elements,
// so the connectivity index is computed with one modulo per 16 elements and
// advanced by increments after that.
constexpr int kGroupsPerThread = 4;

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

// Reads a weight tensor's groups and turns them into keep denominators
// 1 + exp(-z) (sampling.h). index_t is uint32_t when every element index fits,
// else uint64_t.
template <typename scalar_t, typename index_t>
struct GroupDenominators {
  using scalar_type = scalar_t;
  using index_type = index_t;
  const scalar_t* __restrict__ weight;
  const float* __restrict__ g;  // connectivity per input channel (weight dim 1), or nullptr
  index_t taps;                 // elements per (output, input channel): kh*kw, 1 for linear
  index_t channels;             // weight.size(1)
  index_t numel;
  bool vector_loads;  // weight is aligned for Vec4 loads
  Logit coeffs;

  // Position of element i in its output row: input channel and tap.
  struct RowIndex {
    index_t channel, tap;
  };

  // The one division per chunk.
  __device__ __forceinline__ RowIndex row_index(index_t first) const {
    if (g == nullptr) return {0, 0};
    const index_t q = first / taps;
    return {q % channels, first - q * taps};
  }

  // d[j] of the group's 4 elements; c is the running row position.
  __device__ __forceinline__ void operator()(index_t group, RowIndex& c, float (&d)[4]) const {
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
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float gj = 0.0f;
      if (g != nullptr) {
        gj = g[c.channel];
        if (++c.tap == taps) {
          c.tap = 0;
          c.channel = c.channel + 1 == channels ? 0 : c.channel + 1;
        }
      }
      d[j] = keep_denominator(w[j], gj, coeffs);
    }
  }
};

// Calls body(group, c) for every group of this thread's chunks: kGroupsPerThread
// consecutive groups per chunk, chunks grid-strided, c the running row position.
template <typename index_t, typename Probs, typename Body>
__device__ __forceinline__ void for_each_group(const Probs& probs, index_t groups, const Body& body) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x * kGroupsPerThread;
  for (index_t chunk = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kGroupsPerThread;
       chunk < groups; chunk += stride) {
    auto c = probs.row_index(chunk * 4);
#pragma unroll
    for (int i = 0; i < kGroupsPerThread; ++i) {
      if (chunk + i < groups) body(chunk + i, c);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    bernoulli_kernel(GroupDenominators<scalar_t, index_t> probs, index_t groups, uint64_t offset,
                     philox::Key key, bool* __restrict__ mask) {
  for_each_group(probs, groups, [&](index_t group, auto& c) {
    float d[4];
    probs(group, c, d);
    const philox::Words r = philox::group_words(group, offset, key);
    const uint32_t words[4] = {r.x0, r.x1, r.x2, r.x3};
    const index_t first = group * 4;
    if (first + 4 <= probs.numel) {  // mask is freshly allocated: 4-byte aligned
      uchar4 m;
      m.x = keep(words[0], d[0]);
      m.y = keep(words[1], d[1]);
      m.z = keep(words[2], d[2]);
      m.w = keep(words[3], d[3]);
      reinterpret_cast<uchar4*>(mask)[group] = m;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (first + j < probs.numel) mask[first + j] = keep(words[j], d[j]);
      }
    }
  });
}

using BlockReduce = cub::BlockReduce<double, kThreads>;

// This block's float64 sum of p = 1/d over its groups (in thread 0).
template <typename scalar_t, typename index_t>
__device__ __forceinline__ double block_density_sum(const GroupDenominators<scalar_t, index_t>& probs,
                                                    index_t groups, typename BlockReduce::TempStorage& scratch) {
  double sum = 0.0;
  for_each_group(probs, groups, [&](index_t group, auto& c) {
    float d[4];
    probs(group, c, d);
    const index_t first = group * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) sum += first + j < probs.numel ? static_cast<double>(1.0f / d[j]) : 0.0;
  });
  return BlockReduce(scratch).Sum(sum);
}

// The blocks' partials added in a fixed order (each thread a fixed strided share, then a block
// reduction), in thread 0: the same sum whatever the scheduling.
__device__ __forceinline__ double sum_partials(const double* partials, int blocks,
                                               typename BlockReduce::TempStorage& scratch) {
  double sum = 0.0;
  for (int i = threadIdx.x; i < blocks; i += kThreads) sum += partials[i];
  return BlockReduce(scratch).Sum(sum);
}

// Per-block float64 partial sums of p = 1/d; the partials are added in a
// fixed order afterwards, so the result does not depend on scheduling.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    density_kernel(GroupDenominators<scalar_t, index_t> probs, index_t groups,
                   double* __restrict__ block_sums) {
  __shared__ typename BlockReduce::TempStorage scratch;
  const double block_sum = block_density_sum(probs, groups, scratch);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = block_sum;
}

// calibrate_bias in one cooperative launch (no host round trip per step): each
// step of sampling.h's Calibration evaluates the mean keep probability at the
// state's bias (block partials, grid barrier, block 0 adds them in a fixed
// order and moves the state, grid barrier), until the state is done. The grid
// is at most the GPU's resident blocks, as a grid barrier requires.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    calibrate_kernel(GroupDenominators<scalar_t, index_t> probs, index_t groups, double density, double tol,
                     int max_iter, double* __restrict__ partials, Calibration* state) {
  cg::grid_group grid = cg::this_grid();
  __shared__ typename BlockReduce::TempStorage scratch;
  __shared__ double bias;
  __shared__ int phase;
  const volatile Calibration* seen = state;  // written by block 0 between barriers: never cached
  while (true) {
    if (threadIdx.x == 0) {
      phase = seen->phase;
      Calibration copy;
      copy.lo = seen->lo, copy.hi = seen->hi, copy.result = seen->result, copy.phase = phase;
      bias = calibration_bias(copy);
    }
    __syncthreads();
    if (phase == kDone) return;  // the same value in every block: no barrier is left waiting
    GroupDenominators<scalar_t, index_t> at_bias = probs;
    at_bias.coeffs.bias = static_cast<float>(bias);
    const double block_sum = block_density_sum(at_bias, groups, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = block_sum;
    grid.sync();
    if (blockIdx.x == 0) {
      __syncthreads();  // scratch is reused
      const double total = sum_partials(partials, gridDim.x, scratch);
      if (threadIdx.x == 0) calibration_step(*state, total / static_cast<double>(probs.numel), density, tol, max_iter);
    }
    grid.sync();
  }
}

__global__ void calibration_start_kernel(Calibration* state) { *state = Calibration(); }

__global__ void calibration_result_kernel(const Calibration* __restrict__ state, double* __restrict__ out) {
  out[0] = state->failed ? CUDART_NAN : state->result;
  out[1] = state->expected;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    topk_key_kernel(GroupDenominators<scalar_t, index_t> probs, index_t groups, uint64_t offset,
                    philox::Key key, int64_t* __restrict__ packed) {
  for_each_group(probs, groups, [&](index_t group, auto& c) {
    float d[4];
    probs(group, c, d);
    const philox::Words r = philox::group_words(group, offset, key);
    const uint32_t words[4] = {r.x0, r.x1, r.x2, r.x3};
    const index_t first = group * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (first + j < probs.numel) packed[first + j] = pack_topk_key(topk_key(d[j], words[j]), first + j);
    }
  });
}

// ---- exact top-k by radix select ------------------------------------------------------------
// Packed keys are distinct int64; flipping the sign bit orders them as uint64.
// The k-th largest, T, is found 8 bits at a time from the top: each pass
// histograms the next digit of the keys that share the prefix found so far
// (integer atomics: exact counts), then one thread picks the digit holding the
// k-th largest and narrows the prefix. After 8 passes, or as soon as every key
// of the chosen digit is kept, the prefix (lower bits 0) is a threshold T that
// keeps exactly k keys: the mask is key >= T. No sort, no index array, no host
// synchronisation.
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

struct RadixState {
  unsigned long long prefix;  // digits found so far
  unsigned long long k;       // rank of T among the keys that match the prefix (1 = largest)
  unsigned long long done;    // 1 once the prefix (lower bits 0) is a threshold keeping exactly k
  unsigned long long hist[kRadixBins];
};

__device__ __forceinline__ uint64_t ordered_key(int64_t packed) {
  return static_cast<uint64_t>(packed) ^ 0x8000000000000000ull;
}

__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(const int64_t* __restrict__ packed, int64_t n, int shift,
                           RadixState* __restrict__ state) {
  if (state->done) return;  // the same for the whole grid: no barrier is skipped by some threads only
  __shared__ unsigned int hist[kRadixBins];
  for (int i = threadIdx.x; i < kRadixBins; i += kThreads) hist[i] = 0;
  __syncthreads();
  // Bits above `shift + kRadixBits` must equal the prefix (none on the first pass).
  const int above = shift + kRadixBits;
  const uint64_t high_mask = above >= 64 ? 0ull : ~0ull << above;
  const uint64_t prefix = state->prefix;
  // The loop runs over whole warps (kThreads and the stride are multiples of 32), so every lane
  // of a warp takes the same number of turns and all 32 reach __match_any_sync together: it is
  // called with the full mask. A lane past n, or whose key leaves the prefix, votes the sentinel
  // digit -1 and adds nothing. (__activemask() would name the lanes that happen to be converged
  // at that point, which independent thread scheduling does not fix.)
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + (threadIdx.x & ~31u); base < n;
       base += stride) {
    const int64_t i = base + lane;
    int digit = -1;
    if (i < n) {
      const uint64_t u = ordered_key(packed[i]);
      if ((u & high_mask) == prefix) digit = static_cast<int>((u >> shift) & (kRadixBins - 1));
    }
    // Keys crowd into few digits (top bits: sign and exponent): one atomic per digit per warp.
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRadixBins; i += kThreads) {
    if (hist[i] != 0) atomicAdd(&state->hist[i], static_cast<unsigned long long>(hist[i]));
  }
}

// One thread: the digit holding the k-th largest; clears the histogram for the
// next pass. The first pass starts from k_first.
__global__ void radix_pick_kernel(int shift, unsigned long long k_first, RadixState* __restrict__ state) {
  if (state->done) return;
  unsigned long long k = shift == 64 - kRadixBits ? k_first : state->k;
  int digit = kRadixBins - 1;
  for (; digit > 0; --digit) {
    const unsigned long long count = state->hist[digit];
    if (k <= count) break;
    k -= count;
  }
  state->prefix |= static_cast<unsigned long long>(digit) << shift;
  state->k = k;
  // All keys of this digit are kept: the prefix with zero lower bits is the threshold
  // (usually after 4 passes, once the float part of the keys is decided).
  if (k == state->hist[digit]) state->done = 1;
  for (int i = 0; i < kRadixBins; ++i) state->hist[i] = 0;
}

__global__ void __launch_bounds__(kThreads)
    keep_at_least_kernel(const int64_t* __restrict__ packed, int64_t n,
                         const RadixState* __restrict__ state, bool* __restrict__ mask) {
  const uint64_t threshold = state->prefix;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    mask[i] = ordered_key(packed[i]) >= threshold;
  }
}

// Blocks of `kernel` (kThreads threads, no dynamic shared memory) that the GPU holds at once:
// its SMs times the blocks one SM holds, as the runtime computes it from the kernel's registers
// and shared memory and the SM's limits (2,048 threads on sm_80/sm_90, 1,536 on sm_86/sm_89, and
// so on), never assumed. The grids below stride over their work with this many blocks. The block
// count sets only how the work is split: every result is the same for any count, except
// expected_density's block partials, which then add up in another (fixed) order on another GPU.
template <typename Kernel>
int64_t resident_blocks(Kernel* kernel) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  return static_cast<int64_t>(std::max(per_sm, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Mask of the k largest packed keys (all distinct), k in [1, n].
at::Tensor keep_top_k_radix(const at::Tensor& packed, int64_t k, at::IntArrayRef shape,
                            cudaStream_t stream) {
  const int64_t n = packed.numel();
  at::Tensor state_buf = at::zeros({static_cast<int64_t>(sizeof(RadixState))}, packed.options().dtype(at::kByte));
  auto* state = reinterpret_cast<RadixState*>(state_buf.data_ptr<uint8_t>());
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      (n + kThreads - 1) / kThreads, std::min(resident_blocks(radix_histogram_kernel),
                                              resident_blocks(keep_at_least_kernel)))));
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    radix_histogram_kernel<<<blocks, kThreads, 0, stream>>>(packed.const_data_ptr<int64_t>(), n, shift, state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_pick_kernel<<<1, 1, 0, stream>>>(shift, static_cast<unsigned long long>(k), state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor mask = at::empty(shape, packed.options().dtype(at::kBool));
  keep_at_least_kernel<<<blocks, kThreads, 0, stream>>>(packed.const_data_ptr<int64_t>(), n, state,
                                                        mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

template <typename Kernel>
int launch_blocks(Kernel* kernel, int64_t groups) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kGroupsPerThread;
  const int64_t needed = (groups + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, resident_blocks(kernel))));
}

// Sums the density kernel's block partials in a fixed order (one block, each
// thread a fixed strided share, then a block reduction) and divides by numel.
__global__ void __launch_bounds__(kThreads)
    density_finish_kernel(const double* __restrict__ block_sums, int blocks, double numel,
                          double* __restrict__ out) {
  __shared__ typename BlockReduce::TempStorage scratch;
  const double total = sum_partials(block_sums, blocks, scratch);
  if (threadIdx.x == 0) *out = total / numel;
}

// Calls launch(probs, groups) with the denominator reader for weight's dtype
// and the narrowest index type that holds every element index. g: float32
// connectivity per input channel, or undefined.
template <typename Launch>
void with_denominators(const at::Tensor& weight, const at::Tensor& g, Logit coeffs,
                       const Launch& launch) {
  int64_t taps = 1;  // kernel positions per input channel
  for (int64_t d = 2; d < weight.dim(); ++d) taps *= weight.size(d);
  const int64_t channels = weight.dim() >= 2 ? weight.size(1) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mcwt_sampling_cuda", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const bool vector_loads = reinterpret_cast<uintptr_t>(w) % sizeof(Vec4<scalar_t>) == 0;
    const float* gp = g.defined() ? g.const_data_ptr<float>() : nullptr;
    const int64_t numel = weight.numel();
    const int64_t groups = (numel + 3) / 4;
    if (numel + 4 * kThreads * kGroupsPerThread <= std::numeric_limits<int32_t>::max()) {
      using Reader = GroupDenominators<scalar_t, uint32_t>;
      launch(Reader{w, gp, static_cast<uint32_t>(taps), static_cast<uint32_t>(channels),
                    static_cast<uint32_t>(numel), vector_loads, coeffs},
             static_cast<uint32_t>(groups));
    } else {
      using Reader = GroupDenominators<scalar_t, uint64_t>;
      launch(Reader{w, gp, static_cast<uint64_t>(taps), static_cast<uint64_t>(channels),
                    static_cast<uint64_t>(numel), vector_loads, coeffs},
             static_cast<uint64_t>(groups));
    }
  });
}

// Connectivity as the kernels read it: float32, contiguous (no copy when it
// already is), one value per input channel.
at::Tensor connectivity_f32(const std::optional<at::Tensor>& connectivity) {
  return connectivity.has_value() ? connectivity->to(at::kFloat).contiguous() : at::Tensor();
}

// Host work per call is kept to the checks, one allocation and one launch:
// small layers are bound by it, not by the kernel.
at::Tensor logistic_bernoulli_cuda(const at::Tensor& weight,
                                   const std::optional<at::Tensor>& connectivity, double u_mag,
                                   double u_conn, double bias, int64_t seed, int64_t offset) {
  const Logit c = check_args("logistic_bernoulli", weight, connectivity, u_mag, u_conn, bias);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  at::Tensor mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  if (w.numel() == 0) return mask;
  const at::Tensor g = connectivity_f32(connectivity);
  const philox::Key key = philox::make_key(seed);
  const uint64_t off = static_cast<uint64_t>(offset);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool* out = mask.data_ptr<bool>();
  with_denominators(w, g, c, [&](auto probs, auto groups) {
    using P = decltype(probs);
    auto* kernel = bernoulli_kernel<typename P::scalar_type, typename P::index_type>;
    kernel<<<launch_blocks(kernel, groups), kThreads, 0, stream>>>(probs, groups, off, key, out);
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
  const at::Tensor g = connectivity_f32(connectivity);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // One allocation: the result, then the block partials.
  at::Tensor scratch;
  with_denominators(w, g, c, [&](auto probs, auto groups) {
    using P = decltype(probs);
    auto* kernel = density_kernel<typename P::scalar_type, typename P::index_type>;
    const int blocks = launch_blocks(kernel, groups);
    scratch = at::empty({1 + blocks}, w.options().dtype(at::kDouble));
    double* partials = scratch.data_ptr<double>() + 1;
    kernel<<<blocks, kThreads, 0, stream>>>(probs, groups, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    density_finish_kernel<<<1, kThreads, 0, stream>>>(partials, blocks, static_cast<double>(numel),
                                                      scratch.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return scratch[0];
}

at::Tensor calibrate_bias_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& connectivity,
                               double u_mag, double u_conn, double density, double tol, int64_t max_iter) {
  const Logit c = check_args("calibrate_bias", weight, connectivity, u_mag, u_conn, 0.0);
  check_calibration_args(density, tol, max_iter);
  TORCH_CHECK(weight.numel() > 0, "calibrate_bias: weight has no elements");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = connectivity_f32(connectivity);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int cooperative = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, w.get_device()));
  TORCH_CHECK(cooperative, "calibrate_bias: this GPU cannot launch cooperative kernels");
  // One allocation: the state (its bytes rounded up to doubles), then the block partials.
  constexpr int64_t state_doubles = (sizeof(Calibration) + sizeof(double) - 1) / sizeof(double);
  at::Tensor scratch;
  with_denominators(w, g, c, [&](auto probs, auto groups) {
    using P = decltype(probs);
    auto* kernel = calibrate_kernel<typename P::scalar_type, typename P::index_type>;
    const int blocks = launch_blocks(kernel, groups);  // <= resident blocks: the grid barrier holds
    scratch = at::empty({state_doubles + blocks}, w.options().dtype(at::kDouble));
    Calibration* state = reinterpret_cast<Calibration*>(scratch.data_ptr<double>());
    calibration_start_kernel<<<1, 1, 0, stream>>>(state);  // not a copy from the host: that would sync
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    double* partials = scratch.data_ptr<double>() + state_doubles;
    int iters = static_cast<int>(max_iter);
    void* args[] = {&probs, &groups, &density, &tol, &iters, &partials, &state};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(blocks), dim3(kThreads),
                                               args, 0, stream));
  });
  // [bias, expected density], still on the device (the caller reads both in one copy); a bias of
  // NaN says the target could not be bracketed (the CPU raises; raising here would need a sync).
  at::Tensor out = at::empty({2}, w.options().dtype(at::kDouble));
  calibration_result_kernel<<<1, 1, 0, stream>>>(reinterpret_cast<const Calibration*>(scratch.const_data_ptr<double>()),
                                                 out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor logistic_topk_cuda(const at::Tensor& weight,
                              const std::optional<at::Tensor>& connectivity, double u_mag,
                              double u_conn, double bias, int64_t k, int64_t seed, int64_t offset) {
  const Logit c = check_args("logistic_topk", weight, connectivity, u_mag, u_conn, bias);
  check_k("logistic_topk", k, weight.numel());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  if (k == 0) return at::zeros(w.sizes(), w.options().dtype(at::kBool));
  at::Tensor packed = at::empty({w.numel()}, w.options().dtype(at::kLong));
  const at::Tensor g = connectivity_f32(connectivity);
  const philox::Key key = philox::make_key(seed);
  const uint64_t off = static_cast<uint64_t>(offset);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int64_t* out = packed.data_ptr<int64_t>();
  with_denominators(w, g, c, [&](auto probs, auto groups) {
    using P = decltype(probs);
    auto* kernel = topk_key_kernel<typename P::scalar_type, typename P::index_type>;
    kernel<<<launch_blocks(kernel, groups), kThreads, 0, stream>>>(probs, groups, off, key, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return keep_top_k_radix(packed, k, w.sizes(), stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(mcwt_ext, CUDA, m) {
  m.impl("logistic_bernoulli", &logistic_bernoulli_cuda);
  m.impl("expected_density", &expected_density_cuda);
  m.impl("logistic_topk", &logistic_topk_cuda);
  m.impl("calibrate_bias", &calibrate_bias_cuda);
}

}  // namespace sampling
}  // namespace mcwt_ext
