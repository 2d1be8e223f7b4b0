// MCWT_HD: a function for host and device (nvcc), always inlined. Every header
// whose helpers the CPU and CUDA kernels share uses it.
#pragma once

// Always inlined: the CPU loops only vectorise with the whole formula in view.
#if defined(__CUDACC__)
#define MCWT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MCWT_HD inline __attribute__((always_inline))
#else
#define MCWT_HD inline
#endif
