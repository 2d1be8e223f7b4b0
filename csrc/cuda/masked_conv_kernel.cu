// CUDA kernels of the fused masked layers: masked_conv2d_relu_sums and
// masked_linear_relu_sums (schemas in csrc/mcwt.cpp, semantics in
// mcwt_ext/_reference/masked_conv.py).
//
// Each op returns the activation y entering the next layer and y's per-channel
// sums in float64 (the connectivity of the next layer's inputs, times the
// number of positions), measured in the pass that writes y.
//
// The conv has two paths, chosen per layer by a fixed rule of its shapes,
// dtype and the GPU's capability (conv_path.h; MCWT_CONV_IMPL=cudnn|direct
// overrides it for debugging):
//  - "cudnn": cuDNN conv of the masked weight (IEEE float32, asked per call),
//    then one fused epilogue kernel (ReLU, [2x2 max-pool], write y,
//    per-channel block sums).
//  - "direct": one tiled direct-convolution kernel that reads weight and mask
//    and masks on the fly (no masked weight copy), with the same epilogue
//    fused in registers. Kernels too large for its shared-memory tiles fall
//    back to "cudnn".
// The linear op is a 1x1 cuDNN conv of the masked weight plus the same epilogue.
//
// Sums are reduced deterministically in two stages: every block writes one
// partial per channel into a [K, blocks] float64 buffer, a second kernel adds
// each row in a fixed order. No atomics: equal inputs give equal bits.
//
// The per-thread steps of both kernels are __host__ __device__ functions of
// (block, thread) so that the kernels are only glue between barriers and the
// steps can be checked by emulating a launch on the host.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../conv_path.h"
#include "../masked_conv.h"

namespace mcwt_ext {
namespace masked_conv {

namespace {

MCWT_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
MCWT_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
MCWT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Explicit FMAs: the build passes --fmad=false (bit-exact sampling kernels),
// which would otherwise split every multiply-add of the direct conv in two.
MCWT_HD float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
MCWT_HD double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// KPT consecutive values from 16-byte aligned shared memory, in 16-byte loads.
template <int KPT>
MCWT_HD void load_vec(const float* p, float (&v)[KPT]) {
  static_assert(KPT % 4 == 0, "KPT must be a multiple of 4");
#pragma unroll
  for (int r = 0; r < KPT; r += 4) {
    const float4 t = *reinterpret_cast<const float4*>(p + r);
    v[r] = t.x;
    v[r + 1] = t.y;
    v[r + 2] = t.z;
    v[r + 3] = t.w;
  }
}
template <int KPT>
MCWT_HD void load_vec(const double* p, double (&v)[KPT]) {
  static_assert(KPT % 2 == 0, "KPT must be a multiple of 2");
#pragma unroll
  for (int r = 0; r < KPT; r += 2) {
    const double2 t = *reinterpret_cast<const double2*>(p + r);
    v[r] = t.x;
    v[r + 1] = t.y;
  }
}

// ---------------------------------------------------------------------------
// Fused epilogue over a conv/linear output z [N, K, hz, wz] (linear: hz = wz = 1):
// ReLU, [2x2 max-pool, floor mode], write y [N, K, hy, wy] (y aliases z without
// pool), per-channel sums. Block (bx, by) owns a tile of kt consecutive
// channels and a slice of the batch; one output of the tile per image is one
// thread's, so a thread's outputs all lie in one channel and are read
// coalesced, image after image, without index divisions in the inner loop.

constexpr int kEpilogueThreads = 256;

struct EpilogueShape {
  int64_t n, k, hz, wz, hy, wy;
  int64_t kt;      // channels per block: kt * hy * wy <= kEpilogueThreads unless kt == 1
  int64_t slices;  // blocks along the batch; partials are [K, slices]
  bool pool;
};

EpilogueShape plan_epilogue(int64_t n, int64_t k, int64_t hz, int64_t wz, bool pool,
                            int64_t sm_count) {
  EpilogueShape s{n, k, hz, wz, pool ? hz / 2 : hz, pool ? wz / 2 : wz, 1, 1, pool};
  const int64_t plane = s.hy * s.wy;
  s.kt = plane >= kEpilogueThreads ? 1 : imin(k, kEpilogueThreads / plane);
  const int64_t tiles = ceil_div(k, s.kt);
  // A few blocks per SM, but at least ~4 outputs per thread.
  const int64_t wanted = ceil_div(4 * sm_count, tiles);
  const int64_t most = imax(1, n * s.kt * plane / (4 * kEpilogueThreads));
  s.slices = imax(1, imin(imin(wanted, most), imin(n, 65535)));
  return s;
}

// Thread tid of block (bx, by): writes its outputs, returns their sum.
template <typename scalar_t>
MCWT_HD double epilogue_thread(int64_t bx, int64_t by, int tid, const scalar_t* z, scalar_t* y,
                               const EpilogueShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = s.hy * s.wy, z_plane = s.hz * s.wz;
  const int64_t k0 = bx * s.kt;
  const int64_t run = imin(s.kt, s.k - k0) * plane;  // the tile's outputs per image
  const int64_t n0 = by * s.n / s.slices, n1 = (by + 1) * s.n / s.slices;
  double sum = 0.0;
  for (int64_t j = tid; j < run; j += kEpilogueThreads) {
    const int64_t kk = j / plane, p = j - kk * plane;
    int64_t z_off = p;
    if (s.pool) {
      const int64_t py = p / s.wy, px = p - py * s.wy;
      z_off = 2 * py * s.wz + 2 * px;
    }
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t ch = n * s.k + k0 + kk;
      const scalar_t* q = z + ch * z_plane + z_off;
      acc_t v = static_cast<acc_t>(q[0]);
      if (s.pool) {
        v = nan_max(nan_max(v, static_cast<acc_t>(q[1])),
                    nan_max(static_cast<acc_t>(q[s.wz]), static_cast<acc_t>(q[s.wz + 1])));
      }
      const scalar_t out = static_cast<scalar_t>(relu(v));
      y[ch * plane + p] = out;
      sum += static_cast<double>(static_cast<acc_t>(out));
    }
  }
  return sum;
}

// Thread tid < (channels in the tile) adds its channel's thread sums red[] in
// a fixed order and writes the block's partial.
MCWT_HD void epilogue_partial(int64_t bx, int64_t by, int tid, const double* red,
                              double* partials, const EpilogueShape& s) {
  const int64_t plane = s.hy * s.wy;
  const int64_t k0 = bx * s.kt;
  if (tid >= imin(s.kt, s.k - k0)) {
    return;
  }
  const int64_t lo = plane < kEpilogueThreads ? tid * plane : 0;
  const int64_t hi = plane < kEpilogueThreads ? lo + plane : kEpilogueThreads;
  double t = 0.0;
  for (int64_t i = lo; i < hi; ++i) {
    t += red[i];
  }
  partials[(k0 + tid) * s.slices + by] = t;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kEpilogueThreads)
    relu_pool_sums_kernel(const scalar_t* z, scalar_t* y, double* __restrict__ partials,
                          const EpilogueShape s) {
  __shared__ double red[kEpilogueThreads];
  red[threadIdx.x] = epilogue_thread(blockIdx.x, blockIdx.y, threadIdx.x, z, y, s);
  __syncthreads();
  epilogue_partial(blockIdx.x, blockIdx.y, threadIdx.x, red, partials, s);
}

// Second stage: sums[k] = sum of partials[k, :], one block per channel, a
// strided pass then a shared-memory tree (fixed order).
constexpr int kReduceThreads = 128;

__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const double* __restrict__ partials, int64_t count,
                           double* __restrict__ sums) {
  __shared__ double red[kReduceThreads];
  const double* row = partials + blockIdx.x * count;
  double t = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) {
    t += row[i];
  }
  red[threadIdx.x] = t;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      red[threadIdx.x] += red[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = red[0];
  }
}

at::Tensor reduce_partials(const at::Tensor& partials, cudaStream_t stream) {
  const int64_t k = partials.size(0);
  at::Tensor sums = at::empty({k}, partials.options());
  if (k > 0) {
    reduce_partials_kernel<<<static_cast<unsigned>(k), kReduceThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), partials.size(1), sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return sums;
}

// z: contiguous [N, K, ...] holding hz x wz planes. Returns (y, sums).
std::tuple<at::Tensor, at::Tensor> relu_pool_sums(const at::Tensor& z, int64_t hz, int64_t wz,
                                                  bool pool) {
  const int64_t n = z.size(0), k = z.size(1);
  at::Tensor y = pool ? at::empty({n, k, hz / 2, wz / 2}, z.options()) : z;  // no pool: in place
  if (n == 0 || k == 0) {
    return {y, at::zeros({k}, z.options().dtype(at::kDouble))};
  }
  const EpilogueShape s = plan_epilogue(
      n, k, hz, wz, pool, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor partials = at::empty({k, s.slices}, z.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(k, s.kt)), static_cast<unsigned>(s.slices));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "relu_pool_sums",
                                  [&] {
                                    relu_pool_sums_kernel<scalar_t>
                                        <<<grid, kEpilogueThreads, 0, stream>>>(
                                            z.const_data_ptr<scalar_t>(),
                                            y.mutable_data_ptr<scalar_t>(),
                                            partials.mutable_data_ptr<double>(), s);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return {y, reduce_partials(partials, stream)};
}

// ---------------------------------------------------------------------------
// Direct convolution fused with the epilogue. A block owns one image, a
// kTH x kTW tile of conv outputs (kTH, kTW even, so 2x2 pool windows never
// straddle tiles) and kKB output channels. Thread tid owns the 2x2 quad q =
// tid % kQuads of the tile (one pool window, kept in registers) for the KPT
// channels of group g = tid / kQuads. Input channels are streamed through
// shared memory in chunks of cb: an input tile with its halo, zero-padded,
// and the chunk's weights multiplied by the mask while loading, laid out
// [c][tap][channel] so a thread reads its KPT weights in vector loads.

struct DirectShape {
  int64_t n, c, h, w, k, kh, kw, ph, pw;
  int64_t hy, wy;           // y plane (pooled or not)
  int64_t tiles_x, tiles;   // tiles per row of the conv region, per image
  int64_t cb;               // input channels per shared-memory chunk
  int64_t ws_offset;        // byte offset of the weight chunk in shared memory
  bool pool;
};

constexpr size_t kDirectSmemLimit = 48 * 1024;  // no opt-in needed up to 48 KiB

template <typename scalar_t_, int QH, int QW, int KG, int KPT>
struct DirectConv {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kQuads = QH * QW;
  static constexpr int kThreads = kQuads * KG;
  static constexpr int kKB = KG * KPT;  // output channels per block
  static constexpr int kTH = 2 * QH, kTW = 2 * QW;
  static_assert(kKB <= kThreads, "the block reduction uses one thread per channel");
  using Acc = acc_t[KPT][4];

  struct Pos {
    int64_t n, oy0, ox0, k0;  // image, tile origin in conv outputs, first channel
  };

  static MCWT_HD Pos position(int64_t bx, int64_t by, const DirectShape& s) {
    const int64_t n = bx / s.tiles, t = bx - n * s.tiles;
    const int64_t ty = t / s.tiles_x, tx = t - ty * s.tiles_x;
    return {n, ty * kTH, tx * kTW, by * kKB};
  }

  static MCWT_HD void init(int tid, const DirectShape& s, const Pos& pos, const scalar_t* bias,
                           Acc& acc) {
    const int g = tid / kQuads;
#pragma unroll
    for (int r = 0; r < KPT; ++r) {
      const int64_t k = pos.k0 + g * KPT + r;
      const acc_t b = (bias != nullptr && k < s.k) ? static_cast<acc_t>(bias[k]) : acc_t(0);
#pragma unroll
      for (int d = 0; d < 4; ++d) {
        acc[r][d] = b;
      }
    }
  }

  // Chunk [c0, c0 + cb) of input tile and masked weights into shared memory.
  static MCWT_HD void load_chunk(int tid, const DirectShape& s, const Pos& pos, int64_t c0,
                                 const scalar_t* x, const scalar_t* weight, const bool* mask,
                                 acc_t* xs, acc_t* ws) {
    const int cbn = static_cast<int>(imin(s.cb, s.c - c0));
    const int ih = kTH + static_cast<int>(s.kh) - 1, iw = kTW + static_cast<int>(s.kw) - 1;
    const int in_plane = ih * iw;
    for (int i = tid; i < cbn * in_plane; i += kThreads) {
      const int c = i / in_plane, r = i - c * in_plane;
      const int iy = r / iw, ix = r - iy * iw;
      const int64_t gy = pos.oy0 - s.ph + iy, gx = pos.ox0 - s.pw + ix;
      acc_t v = acc_t(0);
      if (gy >= 0 && gy < s.h && gx >= 0 && gx < s.w) {
        v = static_cast<acc_t>(x[((pos.n * s.c + c0 + c) * s.h + gy) * s.w + gx]);
      }
      xs[i] = v;
    }
    // Consecutive threads take consecutive output channels: conflict-free
    // stores; the strided global reads hit a few cached lines per channel.
    const int taps = static_cast<int>(s.kh * s.kw);
    for (int i = tid; i < cbn * taps * kKB; i += kThreads) {
      const int kk = i % kKB, ct = i / kKB;  // ct = c * taps + tap
      const int c = ct / taps, tap = ct - c * taps;
      const int64_t k = pos.k0 + kk;
      acc_t v = acc_t(0);
      if (k < s.k) {
        const int64_t gi = (k * s.c + c0 + c) * taps + tap;
        // Multiply rather than select, so a non-finite pruned weight behaves as in weight * mask.
        v = static_cast<acc_t>(weight[gi]) * static_cast<acc_t>(mask[gi]);
      }
      ws[i] = v;
    }
  }

  // Adds the chunk's contribution to the thread's 2x2 quad x KPT channels.
  static MCWT_HD void accumulate(int tid, const DirectShape& s, int cbn, const acc_t* xs,
                                 const acc_t* ws, Acc& acc) {
    const int q = tid % kQuads, g = tid / kQuads;
    const int qy = q / QW, qx = q - qy * QW;
    const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw);
    const int iw = kTW + kw - 1, in_plane = (kTH + kh - 1) * iw, taps = kh * kw;
    for (int c = 0; c < cbn; ++c) {
      const acc_t* xc = xs + c * in_plane + 2 * qy * iw + 2 * qx;
      const acc_t* wc = ws + c * taps * kKB + g * KPT;
      for (int i = 0; i < kh; ++i) {
        const acc_t* r0 = xc + i * iw;  // input row of the quad's top outputs
        const acc_t* r1 = r0 + iw;      // and of its bottom outputs
        acc_t a0 = r0[0], b0 = r1[0];
        for (int j = 0; j < kw; ++j) {
          const acc_t a1 = r0[j + 1], b1 = r1[j + 1];
          acc_t wv[KPT];
          load_vec<KPT>(wc + (i * kw + j) * kKB, wv);
#pragma unroll
          for (int r = 0; r < KPT; ++r) {
            acc[r][0] = fma_acc(wv[r], a0, acc[r][0]);
            acc[r][1] = fma_acc(wv[r], a1, acc[r][1]);
            acc[r][2] = fma_acc(wv[r], b0, acc[r][2]);
            acc[r][3] = fma_acc(wv[r], b1, acc[r][3]);
          }
          a0 = a1;
          b0 = b1;
        }
      }
    }
  }

  // ReLU, [pool], write y; the thread's per-channel sums go to red[kKB][kQuads].
  static MCWT_HD void store(int tid, const DirectShape& s, const Pos& pos, const Acc& acc,
                            scalar_t* y, double* red) {
    const int q = tid % kQuads, g = tid / kQuads;
    const int qy = q / QW, qx = q - qy * QW;
#pragma unroll
    for (int r = 0; r < KPT; ++r) {
      const int kk = g * KPT + r;
      const int64_t k = pos.k0 + kk;
      double sum = 0.0;
      if (k < s.k) {
        scalar_t* yk = y + (pos.n * s.k + k) * s.hy * s.wy;
        if (s.pool) {
          const int64_t py = pos.oy0 / 2 + qy, px = pos.ox0 / 2 + qx;
          if (py < s.hy && px < s.wy) {
            const scalar_t out = static_cast<scalar_t>(
                relu(nan_max(nan_max(acc[r][0], acc[r][1]), nan_max(acc[r][2], acc[r][3]))));
            yk[py * s.wy + px] = out;
            sum = static_cast<double>(static_cast<acc_t>(out));
          }
        } else {
#pragma unroll
          for (int d = 0; d < 4; ++d) {
            const int64_t oy = pos.oy0 + 2 * qy + (d >> 1), ox = pos.ox0 + 2 * qx + (d & 1);
            if (oy < s.hy && ox < s.wy) {
              const scalar_t out = static_cast<scalar_t>(relu(acc[r][d]));
              yk[oy * s.wy + ox] = out;
              sum += static_cast<double>(static_cast<acc_t>(out));
            }
          }
        }
      }
      red[kk * kQuads + q] = sum;
    }
  }

  // Thread tid < kKB adds channel k0 + tid over the block's quads (fixed order).
  static MCWT_HD void reduce(int tid, const DirectShape& s, const Pos& pos, const double* red,
                             double* partials, int64_t slot) {
    const int64_t k = pos.k0 + tid;
    if (tid >= kKB || k >= s.k) {
      return;
    }
    double t = 0.0;
    for (int q = 0; q < kQuads; ++q) {
      t += red[tid * kQuads + q];
    }
    partials[k * (s.n * s.tiles) + slot] = t;
  }
};

// Tile shapes: 16x16 conv outputs x 32 channels (256 threads) for large
// planes, 8x8 x 64 channels (128 threads) for planes of 8 or less.
template <typename scalar_t>
using DirectLarge = DirectConv<scalar_t, 8, 8, 4, 8>;
template <typename scalar_t>
using DirectSmall = DirectConv<scalar_t, 4, 4, 8, 8>;

struct DirectLaunch {
  int64_t grid_x, grid_y;
  size_t smem;
};

// Fills s.tiles*, s.cb and s.ws_offset for Conv; false if no chunk size fits
// the shared-memory limit or the grid is too large (then use the cuDNN path).
template <class Conv>
bool plan_direct(DirectShape& s, DirectLaunch& launch) {
  using acc_t = typename Conv::acc_t;
  const int64_t hz = s.pool ? 2 * s.hy : s.hy, wz = s.pool ? 2 * s.wy : s.wy;
  s.tiles_x = ceil_div(wz, Conv::kTW);
  s.tiles = ceil_div(hz, Conv::kTH) * s.tiles_x;
  const int64_t in_elems = (Conv::kTH + s.kh - 1) * (Conv::kTW + s.kw - 1);
  const int64_t w_elems = s.kh * s.kw * Conv::kKB;
  const size_t red_bytes = sizeof(double) * Conv::kKB * Conv::kQuads;
  for (int64_t cb = imax(1, imin(s.c, 16)); cb >= 1; cb /= 2) {
    const size_t xs_bytes = (cb * in_elems * sizeof(acc_t) + 15) / 16 * 16;
    const size_t total = xs_bytes + cb * w_elems * sizeof(acc_t);
    if (total <= kDirectSmemLimit) {
      s.cb = cb;
      s.ws_offset = static_cast<int64_t>(xs_bytes);
      launch.grid_x = s.n * s.tiles;
      launch.grid_y = ceil_div(s.k, Conv::kKB);
      launch.smem = total > red_bytes ? total : red_bytes;
      return launch.grid_x <= std::numeric_limits<int32_t>::max() && launch.grid_y <= 65535;
    }
  }
  return false;
}

DirectShape direct_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding,
                         std::array<int64_t, 2> conv_out, bool pool) {
  DirectShape s{};
  s.n = x.size(0);
  s.c = x.size(1);
  s.h = x.size(2);
  s.w = x.size(3);
  s.k = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.ph = padding[0];
  s.pw = padding[1];
  s.hy = pool ? conv_out[0] / 2 : conv_out[0];
  s.wy = pool ? conv_out[1] / 2 : conv_out[1];
  s.pool = pool;
  return s;
}

template <class Conv>
__global__ void __launch_bounds__(Conv::kThreads)
    direct_conv_relu_sums_kernel(const typename Conv::scalar_t* __restrict__ x,
                                 const typename Conv::scalar_t* __restrict__ weight,
                                 const bool* __restrict__ mask,
                                 const typename Conv::scalar_t* __restrict__ bias,
                                 typename Conv::scalar_t* __restrict__ y,
                                 double* __restrict__ partials, const DirectShape s) {
  using acc_t = typename Conv::acc_t;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* xs = reinterpret_cast<acc_t*>(smem);
  acc_t* ws = reinterpret_cast<acc_t*>(smem + s.ws_offset);
  const typename Conv::Pos pos = Conv::position(blockIdx.x, blockIdx.y, s);
  typename Conv::Acc acc;
  Conv::init(threadIdx.x, s, pos, bias, acc);
  for (int64_t c0 = 0; c0 < s.c; c0 += s.cb) {
    Conv::load_chunk(threadIdx.x, s, pos, c0, x, weight, mask, xs, ws);
    __syncthreads();
    Conv::accumulate(threadIdx.x, s, static_cast<int>(imin(s.cb, s.c - c0)), xs, ws, acc);
    __syncthreads();  // before the next chunk (or the sums) overwrite the tiles
  }
  double* red = reinterpret_cast<double*>(smem);
  Conv::store(threadIdx.x, s, pos, acc, y, red);
  __syncthreads();
  Conv::reduce(threadIdx.x, s, pos, red, partials, blockIdx.x);
}

// Runs the direct path with tile shape Conv; false if it does not fit.
template <class Conv>
bool direct_conv_relu_sums(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                           const std::optional<at::Tensor>& bias, DirectShape s, at::Tensor& y,
                           at::Tensor& sums) {
  using scalar_t = typename Conv::scalar_t;
  DirectLaunch launch{};
  if (!plan_direct<Conv>(s, launch)) {
    return false;
  }
  y = at::empty({s.n, s.k, s.hy, s.wy}, x.options());
  if (s.n == 0 || s.k == 0) {
    sums = at::zeros({s.k}, x.options().dtype(at::kDouble));
    return true;
  }
  at::Tensor partials = at::empty({s.k, s.n * s.tiles}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(launch.grid_x), static_cast<unsigned>(launch.grid_y));
  direct_conv_relu_sums_kernel<Conv><<<grid, Conv::kThreads, launch.smem, stream>>>(
      x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
      mask.const_data_ptr<bool>(), bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
      y.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<double>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sums = reduce_partials(partials, stream);
  return true;
}

using Result = std::tuple<at::Tensor, at::Tensor>;

// The direct path, or nothing when its shared-memory tiles cannot hold the kernel.
std::optional<Result> run_direct(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef padding, std::array<int64_t, 2> conv_out,
                                 bool pool) {
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const DirectShape s = direct_shape(x, w, padding, conv_out, pool);
  const int64_t hz = pool ? 2 * s.hy : s.hy, wz = pool ? 2 * s.wy : s.wy;
  at::Tensor y, sums;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_relu_sums_direct", [&] {
        done = (hz <= 8 || wz <= 8)
                   ? direct_conv_relu_sums<DirectSmall<scalar_t>>(x, w, m, b, s, y, sums)
                   : direct_conv_relu_sums<DirectLarge<scalar_t>>(x, w, m, b, s, y, sums);
      });
  if (!done) return std::nullopt;
  return Result{y, sums};
}

// cuDNN in IEEE float32, asked per call: at::cudnn_convolution's allow_tf32
// argument, never the process-wide TF32 settings (another thread's convs
// must keep the user's). benchmark=false: cuDNN's algorithm is not picked by
// timing (that would be a run-time choice again); deterministic=true: the same
// algorithm and bits in every process. The bias is added after the conv.
at::Tensor cudnn_conv_ieee(const at::Tensor& x, const at::Tensor& masked_weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef padding) {
  at::Tensor z = at::cudnn_convolution(x, masked_weight, padding, /*stride=*/{1, 1}, /*dilation=*/{1, 1},
                                       /*groups=*/1, /*benchmark=*/false, /*deterministic=*/true,
                                       /*allow_tf32=*/false);
  if (bias.has_value()) z.add_(bias->view({1, -1, 1, 1}));
  return z.contiguous();
}

// cuDNN needs a dense weight, so this path materialises the masked copy.
// Contiguous operands keep cuDNN from choosing a channels-last output.
Result run_cudnn(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                 const std::optional<at::Tensor>& bias, at::IntArrayRef padding,
                 std::array<int64_t, 2> conv_out, bool pool) {
  const at::Tensor z = cudnn_conv_ieee(x, (weight * mask).contiguous(), bias, padding);
  return relu_pool_sums(z, conv_out[0], conv_out[1], pool);
}

int64_t capability(const at::Tensor& x) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.get_device());
  return 10 * prop->major + prop->minor;
}

Result masked_conv2d_relu_sums_cuda(const at::Tensor& input, const at::Tensor& weight,
                                    const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                                    at::IntArrayRef padding, bool pool) {
  const auto conv_out = check_conv_args(input, weight, mask, bias, padding, pool);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  // The path is the rule's (conv_path.h): the same for the same shapes on the same GPU model.
  const ConvPath path = conv_path(weight.size(1), weight.size(0), weight.size(2), weight.size(3),
                                  input.scalar_type(), capability(x));
  if (path == ConvPath::kDirect) {
    if (auto result = run_direct(x, weight, mask, bias, padding, conv_out, pool)) return *result;
  }
  return run_cudnn(x, weight, mask, bias, padding, conv_out, pool);
}

std::tuple<at::Tensor, at::Tensor> masked_linear_relu_sums_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, mask, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  // A 1x1 cuDNN conv over [N, in, 1, 1]: cuBLAS has no per-call switch off
  // TF32, cuDNN has (cudnn_conv_ieee). The masked copy of the weight is small
  // next to a batch of activations.
  const int64_t n = input.size(0), k = weight.size(0), in = weight.size(1);
  const at::Tensor z = cudnn_conv_ieee(input.contiguous().view({n, in, 1, 1}),
                                       (weight * mask).contiguous().view({k, in, 1, 1}), bias, {0, 0});
  return relu_pool_sums(z.view({n, k}), 1, 1, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(mcwt_ext, CUDA, m) {
  m.impl("masked_conv2d_relu_sums", &masked_conv2d_relu_sums_cuda);
  m.impl("masked_linear_relu_sums", &masked_linear_relu_sums_cuda);
}

}  // namespace masked_conv
}  // namespace mcwt_ext
