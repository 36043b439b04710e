// AVX-512BW Q4_0 x Q8_0 GEMM (q4_gemm_avx512_impl.h) and Q8_0 quantisation (both AVX-512
// levels). Without VNNI a block's 8 products of 4 bytes are vpmaddubsw pairs summed in
// int16 - exact: a pair is at most 2 * 15 * 128 = 3840 in magnitude, eight of them 30720 -
// then widened once with vpmaddwd.
#include <immintrin.h>

#include "text/q4_gemm.h"
#include "text/q4_gemm_avx512_impl.h"

namespace r3mes {
namespace isa_avx512 {
namespace {

struct MaddubsDot {
  static inline __m512i block(__m512i acc, const __m512i* wv, const int8_t* qb) {
    __m512i pairs = _mm512_maddubs_epi16(wv[0], broadcast4(qb));
#pragma GCC unroll 8
    for (int j = 1; j < 8; ++j)
      pairs = _mm512_add_epi16(pairs, _mm512_maddubs_epi16(wv[j], broadcast4(qb + 4 * j)));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
};

}  // namespace

void q4_gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                  std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1) {
  gemm_tile<MaddubsDot>(w, a, bias, y, g0, g1, t0, t1);
}

// The scalar spec's arithmetic on a block at once: the same division, reciprocal and
// product, and vcvtps2dq rounds to nearest even as lrintf does; vpmovsdb's saturation is
// the clamp.
void quantize_q8_0_rows(const float* x, std::size_t t, std::size_t k, std::size_t t0,
                        std::size_t t1, int8_t* q, float* d, int32_t* offset) {
  const std::size_t nb = k / kQ4Block;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (std::size_t i = t0; i < t1; ++i)
    for (std::size_t b = 0; b < nb; ++b) {
      const float* xb = x + i * k + b * kQ4Block;
      int8_t* qb = q + (b * t + i) * kQ4Block;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
      const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
      const __m128i b0 = _mm512_cvtsepi32_epi8(q0), b1 = _mm512_cvtsepi32_epi8(q1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), b0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), b1);
      const __m512i sum = _mm512_add_epi32(_mm512_cvtepi8_epi32(b0), _mm512_cvtepi8_epi32(b1));
      d[b * t + i] = dd;
      offset[b * t + i] = -8 * _mm512_reduce_add_epi32(sum);
    }
}

}  // namespace isa_avx512
}  // namespace r3mes
