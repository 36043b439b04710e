// AVX2 4-bit head: the AVX-512 kernel's arithmetic on 32-byte vectors (see
// int4_gemm_avx512.cpp); four rows a tile, one token
// at a time inside it.
#include <immintrin.h>

#include "common/avx2_hsum.h"
#include "head/int4_gemm.h"

namespace r3mes {
namespace isa_avx2 {
namespace {

template <int R, int G>
inline void tile(const Int4GemmArgs& a, std::size_t kp, std::size_t n, std::size_t m) {
  const std::size_t row_bytes = kp / 2, groups = kp / G;
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  const uint8_t* w = a.w + n * row_bytes;
  const uint8_t* sub = a.sub + n * groups;
  const uint8_t* x = a.u + m * kp;
  const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  for (std::size_t b = 0; b < kp / kInt4Block; ++b) {
    const uint8_t* xb = x + b * kInt4Block;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32));
    const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64));
    const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 96));
    for (int r = 0; r < R; ++r) {
      const uint8_t* wb = w + r * row_bytes + b * 64;
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32));
      const __m256i lo0 = _mm256_sub_epi8(_mm256_and_si256(v0, low4), eight);
      const __m256i lo1 = _mm256_sub_epi8(_mm256_and_si256(v1, low4), eight);
      const __m256i hi0 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), eight);
      const __m256i hi1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), eight);
      const __m256i p_lo = _mm256_add_epi16(_mm256_maddubs_epi16(x0, lo0), _mm256_maddubs_epi16(x1, lo1));
      const __m256i p_hi = _mm256_add_epi16(_mm256_maddubs_epi16(x2, hi0), _mm256_maddubs_epi16(x3, hi1));
      if constexpr (G == 64) {
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p_lo, _mm256_set1_epi16(sub[r * groups + 2 * b])));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p_hi, _mm256_set1_epi16(sub[r * groups + 2 * b + 1])));
      } else {
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_add_epi16(p_lo, p_hi),
                                                            _mm256_set1_epi16(sub[r * groups + b])));
      }
    }
  }
  for (int r = 0; r < R; ++r) store_int4_output(a, m, n + r, hsum_epi32(acc[r]) - a.w_offset[n + r]);
}

template <int G>
void rows(const Int4GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int4_padded_k(a.K);
  // Tokens inside the row tile: its rows stay in L1 while every token reads them.
  std::size_t n = n0;
  for (; n + 4 <= n1; n += 4)
    for (std::size_t m = 0; m < a.M; ++m) tile<4, G>(a, kp, n, m);
  for (; n < n1; ++n)
    for (std::size_t m = 0; m < a.M; ++m) tile<1, G>(a, kp, n, m);
}

}  // namespace

void int4_gemm_rows(const Int4GemmArgs& a, std::size_t n0, std::size_t n1) {
  if (a.group == 64) rows<64>(a, n0, n1);
  else rows<128>(a, n0, n1);
}

}  // namespace isa_avx2
}  // namespace r3mes
