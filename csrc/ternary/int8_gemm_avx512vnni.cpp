// AVX-512 VNNI int8 GEMM. vpdpbusd wants unsigned x signed bytes, so the
// activations are offset by +128 once per call (u = q + 128, made by int8_gemm) and the offset is
// removed with the weight row sums: sum(q*w) = sum(u*w) - 128*sum(w).
// A tile of four weight rows is read from memory once for all M tokens: the tokens are
// walked four at a time inside the tile, the rows staying in L1 (4 x 2560 bytes for the
// 2B-4T head). Walking the tokens outside the rows instead streamed the whole head once
// per token, which made a decode batch of B rows read the 329 MB head B times.
#include <immintrin.h>

#include "ternary/int8_gemm.h"
#include "ternary/vnni_asm.h"

namespace r3mes {
namespace isa_avx512vnni {
namespace {

// Rows [n, n + R) for tokens [m, m + T).
// With several tokens the tile's time is compute, long enough that the hardware prefetcher
// falls behind the row stream: the first token pass fetches the tile kPrefetchRowTiles
// ahead into L2.
constexpr std::size_t kPrefetchRowTiles = 2;

template <int R, int T>
inline void tile(const Int8GemmArgs& a, const uint8_t* u, std::size_t kp, std::size_t n,
                 std::size_t m) {
  __m512i acc[R][T];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const int8_t* w = a.w + n * kp;
  const uint8_t* x = u + m * kp;
  const bool prefetch = m == 0 && n + (kPrefetchRowTiles + 1) * R <= a.N;
  const int8_t* ahead = w + kPrefetchRowTiles * R * kp;
  for (std::size_t k = 0; k < kp; k += 64) {
    if (prefetch)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * kp + k), _MM_HINT_T1);
    __m512i xv[T];
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(x + t * kp + k);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * kp + k);
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) dpbusd_in_place(acc[r][t], xv[t], wv);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      store_int8_output(a, m + t, n + r,
                        _mm512_reduce_add_epi32(acc[r][t]) - 128 * a.w_rowsum[n + r]);
}

template <int R>
inline void row_tile(const Int8GemmArgs& a, const uint8_t* u, std::size_t kp, std::size_t n) {
  // Four tokens a tile (16 accumulators, 4 weight and 4 activation registers): a decode
  // batch of 8 rows reads each weight tile from L1 twice instead of four times. Measured on
  // the 2B-4T head's 16384 x 2560 slice, 8 tokens, one Zen 4 core: 4.5-5.2 ms with 2-token
  // tiles, 3.7-4.1 ms with 4.
  std::size_t m = 0;
  for (; m + 4 <= a.M; m += 4) tile<R, 4>(a, u, kp, n, m);
  for (; m + 2 <= a.M; m += 2) tile<R, 2>(a, u, kp, n, m);
  if (m < a.M) tile<R, 1>(a, u, kp, n, m);
}

}  // namespace

void int8_gemm_rows_avx512vnni(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int8_padded_k(a.K);
  std::size_t n = n0;
  for (; n + 4 <= n1; n += 4) row_tile<4>(a, a.u, kp, n);
  for (; n < n1; ++n) row_tile<1>(a, a.u, kp, n);
}

}  // namespace isa_avx512vnni
}  // namespace r3mes
