// AVX-512 activation quantisation; same results as the scalar reference.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "ternary/ternary.h"

namespace r3mes {
namespace isa_avx512 {

float absmax_avx512(const float* x, std::size_t k, bool* finite) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  std::size_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);  // NaN or Inf
    m = _mm512_max_ps(m, a);
  }
  if (i < k) {
    __mmask16 tail = static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + i));
    bad |= _mm512_mask_cmp_ps_mask(tail, a, inf, _CMP_NLT_UQ);
    m = _mm512_max_ps(m, a);
  }
  *finite = bad == 0;
  return _mm512_reduce_max_ps(m);
}

int32_t quantize_row_avx512(const float* x, std::size_t k, float scale, int8_t* q) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512i sum = _mm512_setzero_si512();
  std::size_t i = 0;
  for (; i < k; i += 16) {
    __mmask16 mask = k - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                 : static_cast<__mmask16>((1u << (k - i)) - 1);
    // cvtps rounds half to even under the default MXCSR, as torch.round.
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), s));
    v = _mm512_max_epi32(_mm512_set1_epi32(-128), _mm512_min_epi32(_mm512_set1_epi32(127), v));
    v = _mm512_maskz_mov_epi32(mask, v);
    _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtepi32_epi8(v));
    sum = _mm512_add_epi32(sum, v);
  }
  return _mm512_reduce_add_epi32(sum);
}

}  // namespace isa_avx512
}  // namespace r3mes
