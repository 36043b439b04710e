// AVX2 Q4_0 x Q8_0 GEMM and Q8_0 quantisation. The AVX-512 kernel's arithmetic (see
// q4_gemm_avx512.cpp) on the 8-row halves of a group: a half's bytes of a chunk are 32
// contiguous bytes, so the layout is the same at every level. 16 registers hold a tile of
// 4 tokens: per token an int16 pair accumulator, then its float accumulator.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "text/q4_gemm.h"

namespace r3mes {
namespace isa_avx2 {
namespace {

constexpr int kMaxTileTokens = 4;
constexpr std::size_t kHalfRows = kQ4Rows / 2;

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int TT>
void half_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, std::size_t g,
               std::size_t h, std::size_t t0) {
  const std::size_t nb = w.k / kQ4Block;
  const uint8_t* p = w.packed + g * nb * kQ4GroupBlockBytes + h * 32;
  const float* s = w.scale + g * nb * kQ4Rows + h * kHalfRows;
  const int8_t* qb = a.q + t0 * kQ4Block;  // the tile's tokens in a block: qb + 32 t
  const float* d = a.d + t0;
  const int32_t* off = a.offset + t0;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[TT];
  for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
  for (std::size_t b = 0; b < nb; ++b, p += kQ4GroupBlockBytes, s += kQ4Rows, qb += a.t * kQ4Block,
                              d += a.t, off += a.t) {
    __m256i pairs[TT];
    for (int t = 0; t < TT; ++t) pairs[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c * kQ4ChunkBytes));
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        const int8_t* qt = qb + t * kQ4Block;
        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(lo, broadcast4(qt + 4 * c)));
        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(hi, broadcast4(qt + 16 + 4 * c)));
      }
    }
    const __m256 dw = _mm256_loadu_ps(s);
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) {
      const __m256i isum = _mm256_add_epi32(_mm256_set1_epi32(off[t]), _mm256_madd_epi16(pairs[t], ones));
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw), _mm256_set1_ps(d[t]),
                               acc[t]);
    }
  }
  const std::size_t n0 = g * kQ4Rows + h * kHalfRows, rows = std::min(kHalfRows, w.n - n0);
  alignas(32) float out[kHalfRows];
  for (int t = 0; t < TT; ++t) {
    _mm256_store_ps(out, acc[t]);
    float* dst = y + (t0 + t) * w.n + n0;
    for (std::size_t r = 0; r < rows; ++r) dst[r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
  }
}

template <int TT>
void half_tile_n(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, std::size_t g,
                 std::size_t h, std::size_t t0, int tokens) {
  if constexpr (TT > 1) {
    if (tokens < TT) return half_tile_n<TT - 1>(w, a, bias, y, g, h, t0, tokens);
  }
  half_tile<TT>(w, a, bias, y, g, h, t0);
}

}  // namespace

void q4_gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                  std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1) {
  for (std::size_t g = g0; g < g1; ++g)
    for (std::size_t h = 0; h < 2 && g * kQ4Rows + h * kHalfRows < w.n; ++h)
      for (std::size_t t = t0; t < t1; t += kMaxTileTokens)
        half_tile_n<kMaxTileTokens>(w, a, bias, y, g, h, t,
                                    static_cast<int>(std::min<std::size_t>(kMaxTileTokens, t1 - t)));
}

// As the AVX-512 version: the scalar spec's operations on 8 values at a time; vcvtps2dq
// rounds to nearest even as lrintf does, and the packs saturate as the clamp does.
void quantize_q8_0_rows(const float* x, std::size_t t, std::size_t k, std::size_t t0,
                        std::size_t t1, int8_t* q, float* d, int32_t* offset) {
  const std::size_t nb = k / kQ4Block;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (std::size_t i = t0; i < t1; ++i)
    for (std::size_t b = 0; b < nb; ++b) {
      const float* xb = x + i * k + b * kQ4Block;
      __m256 xv[4], m = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        xv[i] = _mm256_loadu_ps(xb + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, xv[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float amax = _mm_cvtss_f32(m4);
      const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[i], vid));
      // packs interleave the 128-bit lanes; the permute puts the 32 bytes back in order.
      const __m256i w16 = _mm256_packs_epi32(qi[0], qi[1]), x16 = _mm256_packs_epi32(qi[2], qi[3]);
      const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, x16),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + (b * t + i) * kQ4Block), b8);
      // Sum of the 32 bytes: vpmaddubsw with ones pairs them in int16, vpmaddwd in int32.
      const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), b8),
                                            _mm256_set1_epi16(1));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      d[b * t + i] = dd;
      offset[b * t + i] = -8 * _mm_cvtsi128_si32(s4);
    }
}

}  // namespace isa_avx2
}  // namespace r3mes
