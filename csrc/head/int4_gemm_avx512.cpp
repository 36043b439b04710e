// AVX-512BW 4-bit head (also the AVX-512 VNNI level: vpmaddubsw + vpmaddwd multiply by the
// group scale on the way, which vpdpbusd alone cannot).
// Per 64 values and row: the nibbles become signed weights (and, shift, subtract 8),
// vpmaddubsw(u, w) sums pairs into int16 (|2 * 255 * 8| fits), vpmaddwd with the group
// scale broadcast sums pairs of those times the scale into int32 - exact.
// A tile of four rows is read once for up to two tokens at a time; the first token pass
// prefetches rows two tiles ahead into L2, as the int8 head does.
#include <immintrin.h>

#include "head/int4_gemm.h"

namespace r3mes {
namespace isa_avx512 {
namespace {

constexpr std::size_t kPrefetchRowTiles = 2;

template <int R, int T, int G>
inline void tile(const Int4GemmArgs& a, std::size_t kp, std::size_t n, std::size_t m) {
  const std::size_t row_bytes = kp / 2, groups = kp / G;
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const uint8_t* w = a.w + n * row_bytes;
  const uint8_t* sub = a.sub + n * groups;
  const uint8_t* x = a.u + m * kp;
  const bool prefetch = m == 0 && n + (kPrefetchRowTiles + 1) * R <= a.N;
  const uint8_t* ahead = w + kPrefetchRowTiles * R * row_bytes;
  const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (std::size_t b = 0; b < kp / kInt4Block; ++b) {
    if (prefetch)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * row_bytes + b * 64), _MM_HINT_T1);
    __m512i xlo[T], xhi[T];
    for (int t = 0; t < T; ++t) {
      xlo[t] = _mm512_loadu_si512(x + t * kp + b * kInt4Block);
      xhi[t] = _mm512_loadu_si512(x + t * kp + b * kInt4Block + 64);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_loadu_si512(w + r * row_bytes + b * 64);
      const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, low4), eight);
      const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), eight);
      if constexpr (G == 64) {
        const __m512i s_lo = _mm512_set1_epi16(sub[r * groups + 2 * b]);
        const __m512i s_hi = _mm512_set1_epi16(sub[r * groups + 2 * b + 1]);
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm512_add_epi32(acc[r][t],
                                       _mm512_madd_epi16(_mm512_maddubs_epi16(xlo[t], lo), s_lo));
          acc[r][t] = _mm512_add_epi32(acc[r][t],
                                       _mm512_madd_epi16(_mm512_maddubs_epi16(xhi[t], hi), s_hi));
        }
      } else {
        const __m512i s = _mm512_set1_epi16(sub[r * groups + b]);
        for (int t = 0; t < T; ++t) {
          const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(xlo[t], lo),
                                                 _mm512_maddubs_epi16(xhi[t], hi));
          acc[r][t] = _mm512_add_epi32(acc[r][t], _mm512_madd_epi16(pairs, s));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      store_int4_output(a, m + t, n + r,
                        _mm512_reduce_add_epi32(acc[r][t]) - a.w_offset[n + r]);
}

template <int R, int G>
inline void row_tile(const Int4GemmArgs& a, std::size_t kp, std::size_t n) {
  std::size_t m = 0;
  for (; m + 2 <= a.M; m += 2) tile<R, 2, G>(a, kp, n, m);
  if (m < a.M) tile<R, 1, G>(a, kp, n, m);
}

template <int G>
void rows(const Int4GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int4_padded_k(a.K);
  std::size_t n = n0;
  for (; n + 4 <= n1; n += 4) row_tile<4, G>(a, kp, n);
  for (; n < n1; ++n) row_tile<1, G>(a, kp, n);
}

}  // namespace

void int4_gemm_rows(const Int4GemmArgs& a, std::size_t n0, std::size_t n1) {
  if (a.group == 64) rows<64>(a, n0, n1);
  else rows<128>(a, n0, n1);
}

}  // namespace isa_avx512
}  // namespace r3mes
