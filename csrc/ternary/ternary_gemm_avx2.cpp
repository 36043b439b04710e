// AVX2 ternary GEMM: one 32-byte block (128 weights) per register, decoded by
// shift+mask against plain activation loads; u8 x s8 products via vpmaddubsw.
#include <immintrin.h>

#include "common/avx2_hsum.h"
#include "ternary/ternary.h"

namespace r3mes {
namespace isa_avx2 {
namespace {

template <int T>
void rows_tokens(const GemmArgs& a, std::size_t n, std::size_t m0) {
  const std::size_t kp = padded_k(a.K);
  const uint8_t* row = a.packed + n * packed_row_bytes(a.K);
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
  // Decode streams weights: prefetch the row kPrefetchTiles * 4 rows ahead (as the
  // AVX-512 kernels do for their 4-row tiles).
  const std::size_t ahead = kPrefetchTiles * 4;
  const bool prefetch_ahead = m0 == 0 && a.M <= kStreamTokens && n + ahead < a.N;
  const std::size_t row_bytes = packed_row_bytes(a.K);
  for (std::size_t b = 0; b < kp / 128; ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * b));
    if (prefetch_ahead && (b & 1) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(row + ahead * row_bytes + 32 * b), R3MES_WEIGHT_PREFETCH_HINT);
    __m256i codes[4];
    codes[0] = _mm256_and_si256(v, mask);
    codes[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
    codes[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    codes[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
    for (int t = 0; t < T; ++t) {
      const int8_t* q = a.q + (m0 + t) * kp + 128 * b;
      // |code * q| <= 256 per byte, 512 per pair, 2048 over the 4 slices: fits int16.
      __m256i s16 = _mm256_maddubs_epi16(
          codes[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      for (int p = 1; p < 4; ++p)
        s16 = _mm256_add_epi16(
            s16, _mm256_maddubs_epi16(
                     codes[p], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * p))));
      acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16, ones));
    }
  }
  for (int t = 0; t < T; ++t) store_output(a, m0 + t, n, hsum_epi32(acc[t]) - a.qsum[m0 + t]);
}

}  // namespace

void ternary_gemm_rows_avx2(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  for (std::size_t n = n0; n < n1; ++n) {
    std::size_t m = 0;
    for (; m + 4 <= a.M; m += 4) rows_tokens<4>(a, n, m);
    switch (a.M - m) {
      case 3: rows_tokens<3>(a, n, m); break;
      case 2: rows_tokens<2>(a, n, m); break;
      case 1: rows_tokens<1>(a, n, m); break;
      default: break;
    }
  }
}

}  // namespace isa_avx2
}  // namespace r3mes
