// Philox words for a block of consecutive element groups, on CPU.
//
// The scalar round (philox.h) does not vectorise well: compilers emulate the
// 32x32->64 multiply with 64x64 multiplies. Here one group's state
// (x0, x1, x2, x3) fills a 128-bit lane, so one pmuludq multiplies x0 and x2
// together, one in-lane shuffle reorders the products and the words come out
// already in element order. AVX2 holds 2 groups per register, AVX-512 4; the
// widest the CPU has is picked once at load time, else the scalar loop (which
// compilers vectorise well enough for SSE2). Every variant equals
// philox::group_words exactly (csrc/philox.h is the spec).
#pragma once

#include <cstdint>

#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MCWT_PHILOX_X86 1
#endif

namespace mcwt_ext {
namespace philox {

// Writes the 4 * n_groups words of groups first_group .. first_group + n_groups - 1.
using BlockWordsFn = void (*)(uint64_t first_group, int64_t n_groups, uint64_t offset, Key key,
                              uint32_t* words);

inline void block_words_scalar(uint64_t first_group, int64_t n_groups, uint64_t offset, Key key,
                               uint32_t* words) {
  for (int64_t l = 0; l < n_groups; ++l) {
    const Words r = group_words(first_group + l, offset, key);
    words[4 * l + 0] = r.x0;
    words[4 * l + 1] = r.x1;
    words[4 * l + 2] = r.x2;
    words[4 * l + 3] = r.x3;
  }
}

#if defined(MCWT_PHILOX_X86)

// The two widths differ only in the names of their intrinsics. Each 128-bit
// lane holds one group: 64-bit halves (group, offset) = words (x0, x1, x2, x3).
// (GCC 12 warns falsely about its own AVX-512 intrinsics under -Wall.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MCWT_PHILOX_BLOCK(NAME, TARGET, VEC, LANES, SET_PAIR, LOAD, MUL, SHUF, SRLI, XOR, ADD, STORE) \
  __attribute__((target(TARGET))) inline void NAME(uint64_t first_group, int64_t n_groups,          \
                                                   uint64_t offset, Key key, uint32_t* words) {     \
    constexpr int64_t kInterleave = 8; /* independent registers in flight, to hide latency */      \
    constexpr int64_t kStep = (LANES) * kInterleave;                                                \
    /* per 128-bit lane, 64-bit halves: (M0, M1) multiplies x0 and x2; (k0, k1) is [k0, 0, k1, 0] */ \
    const VEC mult = SET_PAIR(kM0, kM1);                                                            \
    const VEC bump = SET_PAIR(kW0, kW1);                                                            \
    const VEC key0 = SET_PAIR(key.k0, key.k1);                                                      \
    int64_t l = 0;                                                                                  \
    for (; l + kStep <= n_groups; l += kStep) {                                                     \
      alignas(64) uint64_t counter[2 * kStep];                                                      \
      for (int64_t j = 0; j < kStep; ++j) {                                                         \
        counter[2 * j] = first_group + static_cast<uint64_t>(l + j);                               \
        counter[2 * j + 1] = offset;                                                                \
      }                                                                                             \
      VEC s[kInterleave];                                                                           \
      for (int64_t v = 0; v < kInterleave; ++v) s[v] = LOAD(counter + 2 * (LANES) * v);            \
      VEC k = key0;                                                                                 \
      for (int round = 0; round < kRounds; ++round) {                                               \
        for (int64_t v = 0; v < kInterleave; ++v) {                                                 \
          /* products [lo0, hi0, lo1, hi1] -> [hi1, lo1, hi0, lo0] ^ [x1, 0, x3, 0] ^ [k0, 0, k1, 0] */ \
          const VEC p = MUL(s[v], mult);                                                            \
          s[v] = XOR(XOR(SHUF(p, 0x1B), SRLI(s[v], 32)), k);                                        \
        }                                                                                           \
        k = ADD(k, bump);                                                                           \
      }                                                                                             \
      for (int64_t v = 0; v < kInterleave; ++v) STORE(words + 4 * (l + (LANES) * v), s[v]);        \
    }                                                                                               \
    block_words_scalar(first_group + l, n_groups - l, offset, key, words + 4 * l);                  \
  }

#define MCWT_PAIR256(lo, hi) _mm256_set_epi64x(hi, lo, hi, lo)
#define MCWT_PAIR512(lo, hi) _mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo)
#define MCWT_LOAD256(p) _mm256_load_si256(reinterpret_cast<const __m256i*>(p))
#define MCWT_STORE256(p, v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v)
#define MCWT_SHUF512(v, imm) _mm512_shuffle_epi32(v, static_cast<_MM_PERM_ENUM>(imm))

MCWT_PHILOX_BLOCK(block_words_avx2, "avx2", __m256i, 2, MCWT_PAIR256, MCWT_LOAD256,
                  _mm256_mul_epu32, _mm256_shuffle_epi32, _mm256_srli_epi64, _mm256_xor_si256,
                  _mm256_add_epi32, MCWT_STORE256)
MCWT_PHILOX_BLOCK(block_words_avx512, "avx512f", __m512i, 4, MCWT_PAIR512, _mm512_load_si512,
                  _mm512_mul_epu32, MCWT_SHUF512, _mm512_srli_epi64, _mm512_xor_si512,
                  _mm512_add_epi32, _mm512_storeu_si512)

#pragma GCC diagnostic pop
#undef MCWT_PHILOX_BLOCK
#undef MCWT_PAIR256
#undef MCWT_PAIR512
#undef MCWT_LOAD256
#undef MCWT_STORE256
#undef MCWT_SHUF512

#endif  // MCWT_PHILOX_X86

// The widest variant this CPU runs.
inline BlockWordsFn pick_block_words() {
#if defined(MCWT_PHILOX_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return block_words_avx512;
  if (__builtin_cpu_supports("avx2")) return block_words_avx2;
  return block_words_scalar;  // the compiler's SSE2 vectorisation of it is as fast
#else
  return block_words_scalar;
#endif
}

}  // namespace philox
}  // namespace mcwt_ext
