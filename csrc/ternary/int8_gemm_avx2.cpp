// AVX2 int8 GEMM: weights and activations sign-extended to int16 and multiplied with
// vpmaddwd (exact, no saturation). The activations are widened once a call (q16, filled by
// int8_gemm); each 16-weight slice is widened once for up to 4 tokens, so a batch costs a
// load, a multiply-add and an add a token and slice (where widening both operands for every
// token had made 8 tokens cost 3.5x one).
#include <immintrin.h>

#include "common/avx2_hsum.h"
#include "ternary/int8_gemm.h"

namespace r3mes {
namespace isa_avx2 {
namespace {

template <int T>
void row_tokens(const Int8GemmArgs& a, std::size_t n, std::size_t m0) {
  const std::size_t kp = int8_padded_k(a.K);
  const int8_t* w = a.w + n * kp;
  __m256i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
  for (std::size_t k = 0; k < kp; k += 16) {
    const __m256i wv =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    for (int t = 0; t < T; ++t) {
      const __m256i qv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q16 + (m0 + t) * kp + k));
      acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(wv, qv));
    }
  }
  for (int t = 0; t < T; ++t) store_int8_output(a, m0 + t, n, hsum_epi32(acc[t]));
}

}  // namespace

void widen_activations_avx2(const int8_t* q, std::size_t count, int16_t* out) {
  std::size_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
  for (; i < count; ++i) out[i] = q[i];
}

void int8_gemm_rows_avx2(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  for (std::size_t n = n0; n < n1; ++n) {
    std::size_t m = 0;
    for (; m + 4 <= a.M; m += 4) row_tokens<4>(a, n, m);
    switch (a.M - m) {
      case 3: row_tokens<3>(a, n, m); break;
      case 2: row_tokens<2>(a, n, m); break;
      case 1: row_tokens<1>(a, n, m); break;
      default: break;
    }
  }
}

}  // namespace isa_avx2
}  // namespace r3mes
