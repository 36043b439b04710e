// AVX2 int8 GEMM: sign-extend to int16 and vpmaddwd (exact, no saturation).
#include <immintrin.h>

#include "ternary/int8_gemm.h"

namespace r3mes {
namespace isa_avx2 {

void int8_gemm_rows_avx2(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int8_padded_k(a.K);
  for (std::size_t n = n0; n < n1; ++n) {
    const int8_t* w = a.w + n * kp;
    for (std::size_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q + m * kp;
      __m256i acc = _mm256_setzero_si256();
      for (std::size_t k = 0; k < kp; k += 16) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
        __m256i qv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wv, qv));
      }
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      store_int8_output(a, m, n, _mm_cvtsi128_si32(s));
    }
  }
}

}  // namespace isa_avx2
}  // namespace r3mes
