// Philox-4x32-10 (Salmon et al., SC'11; the Random123 / cuRAND generator),
// shared by the CPU and CUDA kernels. Counter-based: the random words of an
// element depend only on (seed, element index, offset), never on thread
// count or launch shape. Reference: mcwt_ext/_reference/philox.py.
//
// Stream layout used by every sampling op: key = seed (low, high 32 bits);
// counter = (group, group >> 32, offset, offset >> 32), one call per group
// of 4 consecutive elements; element i takes word i % 4 of group i / 4.
#pragma once

#include <cstdint>

#include "hd.h"

namespace mcwt_ext {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Key {
  uint32_t k0, k1;
};

struct Words {
  uint32_t x0, x1, x2, x3;
};

MCWT_HD Key make_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

MCWT_HD Words philox4x32_10(Words c, Key k) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c.x0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c.x2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = {hi1 ^ c.x1 ^ k.k0, lo1, hi0 ^ c.x3 ^ k.k1, lo0};
    k = {k.k0 + kW0, k.k1 + kW1};
  }
  return c;
}

// The 4 words of element group `group` (elements 4*group .. 4*group+3).
MCWT_HD Words group_words(uint64_t group, uint64_t offset, Key key) {
  const Words counter{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                      static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  return philox4x32_10(counter, key);
}

}  // namespace philox
}  // namespace mcwt_ext
