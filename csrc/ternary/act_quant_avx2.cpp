// AVX2 activation quantisation; same results as the scalar reference.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "ternary/ternary.h"

namespace r3mes {
namespace isa_avx2 {

float absmax_avx2(const float* x, std::size_t k, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 m = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  std::size_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or Inf
    m = _mm256_max_ps(m, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float result = *std::max_element(lanes, lanes + 8);
  bool ok = _mm256_movemask_ps(bad) == 0;
  bool tail_ok = true;
  float tail = absmax_scalar(x + i, k - i, &tail_ok);
  *finite = ok && tail_ok;
  return std::max(result, tail);
}

int32_t quantize_row_avx2(const float* x, std::size_t k, float scale, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256i sum = _mm256_setzero_si256();
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::size_t i = 0;
  for (; i + 32 <= k; i += 32) {
    // cvtps rounds half to even under the default MXCSR, as torch.round.
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), s));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), s));
    __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), s));
    __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), s));
    __m256i ab = _mm256_packs_epi32(a, b);
    __m256i cd = _mm256_packs_epi32(c, d);
    __m256i abcd = _mm256_packs_epi16(ab, cd);  // saturates = clamp(-128, 127)
    abcd = _mm256_permutevar8x32_epi32(abcd, perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), abcd);
    __m256i wide = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(abcd)),
                                     _mm256_set1_epi16(1));
    wide = _mm256_add_epi32(wide, _mm256_madd_epi16(
                                      _mm256_cvtepi8_epi16(_mm256_extracti128_si256(abcd, 1)),
                                      _mm256_set1_epi16(1)));
    sum = _mm256_add_epi32(sum, wide);
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int32_t total = 0;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  return total + quantize_row_scalar(x + i, k - i, scale, q + i);
}

}  // namespace isa_avx2
}  // namespace r3mes
