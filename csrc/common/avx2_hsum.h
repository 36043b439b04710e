#pragma once
// The sum of an AVX2 register's eight int32 lanes, for the AVX2 kernels (include only from
// files compiled for AVX2: internal linkage, so no copy of another ISA's can stand in).
#include <immintrin.h>

#include <cstdint>

namespace r3mes {
namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace
}  // namespace r3mes
