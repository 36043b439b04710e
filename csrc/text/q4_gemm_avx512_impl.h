#pragma once
// AVX-512 Q4_0 x Q8_0 GEMM shared by the avx512 and avx512vnni translation units (see
// q4_gemm.h for the layout). One group of 16 rows and a tile of up to 16 tokens: per block
// the group's 4 chunks become 8 vectors of 16 rows x 4 unsigned weights, kept in registers
// while every token of the tile reads them; a token's block sum starts at -8 * sum(q) and
// takes 8 products of 4 bytes (the token's 4 activation bytes broadcast to all rows), then
// is scaled (d_w vector times d_a) into one float accumulator a token. Dot is how each unit
// multiplies 4 unsigned by 4 signed bytes into int32 lanes. Internal linkage: the two
// copies never mix.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "text/q4_gemm.h"

namespace r3mes {
namespace {

constexpr int kMaxTileTokens = 16;  // 8 weight vectors + 16 accumulators + temporaries < 32

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <class Dot, int TT>
void group_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, std::size_t g,
                std::size_t t0) {
  const std::size_t nb = w.k / kQ4Block;
  const uint8_t* p = w.packed + g * nb * kQ4GroupBlockBytes;
  const float* s = w.scale + g * nb * kQ4Rows;
  // The tile's tokens in a block: q at qb + 32 t, d and offset at [t], one step a block.
  const int8_t* qb = a.q + t0 * kQ4Block;
  const float* d = a.d + t0;
  const int32_t* off = a.offset + t0;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
#pragma GCC unroll 1
  for (std::size_t b = 0; b < nb; ++b, p += kQ4GroupBlockBytes, s += kQ4Rows, qb += a.t * kQ4Block,
                              d += a.t, off += a.t) {
    __m512i wv[8];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(p + c * kQ4ChunkBytes);
      wv[c] = _mm512_and_si512(v, low4);
      wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 dw = _mm512_loadu_ps(s);
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      const __m512i isum = Dot::block(_mm512_set1_epi32(off[t]), wv, qb + t * kQ4Block);
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), dw), _mm512_set1_ps(d[t]),
                               acc[t]);
    }
  }
  const std::size_t n0 = g * kQ4Rows, rows = std::min(kQ4Rows, w.n - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1u);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
    _mm512_mask_storeu_ps(y + (t0 + t) * w.n + n0, mask, _mm512_add_ps(acc[t], bv));
}

template <class Dot, int TT>
void group_tile_n(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, std::size_t g,
                  std::size_t t0, int tokens) {
  if constexpr (TT > 1) {
    if (tokens < TT) return group_tile_n<Dot, TT - 1>(w, a, bias, y, g, t0, tokens);
  }
  group_tile<Dot, TT>(w, a, bias, y, g, t0);
}

template <class Dot>
void gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, std::size_t g0,
               std::size_t g1, std::size_t t0, std::size_t t1) {
  // Equal tiles (14 tokens: 7 + 7, not 12 + 2): each tile unpacks the weights once.
  const std::size_t tiles = (t1 - t0 + kMaxTileTokens - 1) / kMaxTileTokens;
  for (std::size_t g = g0; g < g1; ++g) {
    std::size_t t = t0;
    for (std::size_t i = 0; i < tiles; ++i) {
      const int tokens = static_cast<int>((t1 - t + (tiles - i) - 1) / (tiles - i));
      group_tile_n<Dot, kMaxTileTokens>(w, a, bias, y, g, t, tokens);
      t += tokens;
    }
  }
}

}  // namespace
}  // namespace r3mes
