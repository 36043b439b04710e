// AVX-512BW int8 GEMM: sign-extend to int16 and vpmaddwd (exact).
#include <immintrin.h>

#include "ternary/int8_gemm.h"

namespace r3mes {
namespace isa_avx512 {

void int8_gemm_rows_avx512(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int8_padded_k(a.K);
  for (std::size_t n = n0; n < n1; ++n) {
    const int8_t* w = a.w + n * kp;
    for (std::size_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q + m * kp;
      __m512i acc = _mm512_setzero_si512();
      for (std::size_t k = 0; k < kp; k += 32) {
        __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
        __m512i qv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k)));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(wv, qv));
      }
      store_int8_output(a, m, n, _mm512_reduce_add_epi32(acc));
    }
  }
}

}  // namespace isa_avx512
}  // namespace r3mes
