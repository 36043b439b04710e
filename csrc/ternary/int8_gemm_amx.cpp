// AMX int8 GEMM for several tokens (the LM head of a decode batch or a prefill; see
// ternary/int8_gemm.h and ternary/amx.h). Compiled with AMX flags; only called after
// amx_usable() said yes.
//
// The weights are int8 already, so the A tiles are loaded straight from the weight matrix
// (16 rows x 64 bytes at the row stride): nothing is decoded, and the head streams at the
// memory's rate whatever the number of tokens, where vpdpbusd at 8 tokens is compute-bound.
// B: the tokens' activations as q_quads (ternary/amx.h's layout), 16 or fewer tokens a
// block. C tile p sums the k-slices p, p + 4, ... (64 bytes each) of the block's rows: four
// independent products queued for the tile unit, added at the end. Exact integer sums, so
// the outputs equal the VNNI kernel's bit for bit.
#include <immintrin.h>

#include <algorithm>

#include "ternary/amx.h"
#include "ternary/amx_tiles.h"
#include "ternary/int8_gemm.h"

namespace r3mes {
namespace isa_amx {
namespace {

// out[m, n + i] for the block's valid rows (below n_end) and tokens [m0, m0 + cols) below
// M, as store_int8_output: float(acc) / (x_scale[m] * w_scale[n]).
void store_block(const Int8GemmArgs& a, const int32_t* c, std::size_t cols, std::size_t n,
                 std::size_t n_end, std::size_t m0) {
  const TileColumns column(cols, n_end - n);
  const __m512 w_scale = _mm512_maskz_loadu_ps(column.keep, a.w_scale + n);
  for (std::size_t j = 0; j < cols && m0 + j < a.M; ++j) {
    const std::size_t m = m0 + j;
    const __m512 acc = _mm512_cvtepi32_ps(column(c, j));
    const __m512 y = _mm512_div_ps(acc, _mm512_mul_ps(_mm512_set1_ps(a.x_scale[m]), w_scale));
    _mm512_mask_storeu_ps(a.out + m * a.N + n, column.keep, y);
  }
}

// C tile kC += slice of rows at w (stride kp) and k-quads at b.
template <int kC, int kA, int kB>
inline void slice(const int8_t* w, long kp, const int32_t* b, long b_stride) {
  tile_load<kA>(w, kp);
  tile_load<kB>(b, b_stride);
  tile_dpbssd<kC, kA, kB>();
}

}  // namespace

void int8_gemm_rows_amx(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int8_padded_k(a.K), m_pad = a.m_pad;
  const std::size_t cols = std::min<std::size_t>(m_pad, 16);  // tokens a block
  const long b_stride = static_cast<long>(m_pad * sizeof(int32_t));
  const long lda = static_cast<long>(kp);
  alignas(64) int32_t c[4 * 16 * 16];
  configure_tiles(cols);
  // The A tiles read 16 whole rows: a last block past the matrix's end goes to VNNI.
  const std::size_t amx_end = n0 + std::min(n1 - n0, (a.N - n0) / 16 * 16);
  for (std::size_t n = n0; n < amx_end; n += 16) {
    // No software prefetch: 16 rows read a slice at a time are streams the hardware
    // prefetcher follows (the next block prefetched as well measured equal or slower).
    const int8_t* w = a.w + n * kp;
    for (std::size_t m0 = 0; m0 < a.M; m0 += cols) {
      zero_c();
      std::size_t k = 0;
      for (; k + 256 <= kp; k += 256) {
        const int32_t* b = a.q_quads + (k / 4) * m_pad + m0;
        slice<0, 4, 6>(w + k, lda, b, b_stride);
        slice<1, 5, 7>(w + k + 64, lda, b + 16 * m_pad, b_stride);
        slice<2, 4, 6>(w + k + 128, lda, b + 32 * m_pad, b_stride);
        slice<3, 5, 7>(w + k + 192, lda, b + 48 * m_pad, b_stride);
      }
      const int32_t* b = a.q_quads + (k / 4) * m_pad + m0;  // up to 3 slices left
      if (k < kp) slice<0, 4, 6>(w + k, lda, b, b_stride);
      if (k + 64 < kp) slice<1, 5, 7>(w + k + 64, lda, b + 16 * m_pad, b_stride);
      if (k + 128 < kp) slice<2, 4, 6>(w + k + 128, lda, b + 32 * m_pad, b_stride);
      store_and_sum_c(c, cols);
      store_block(a, c, cols, n, n1, m0);
    }
  }
  _tile_release();
  if (amx_end < n1) isa_avx512vnni::int8_gemm_rows_avx512vnni(a, amx_end, n1);
}

}  // namespace isa_amx
}  // namespace r3mes
