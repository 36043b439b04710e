#pragma once
// Shared AVX-512 ternary GEMM body, included by the avx512 and avx512vnni
// translation units (each compiled for its own ISA; everything here has
// internal linkage so the two copies never mix).
//
// A tile of R rows x T tokens: per 256-weight group, each row's 64 packed
// bytes are loaded once and decoded into four code registers (shift + mask),
// each used against T activation registers (g256-permuted order).
#include <immintrin.h>

#include "ternary/ternary.h"

namespace r3mes {
namespace {

// Prefill (many tokens) decodes a row tile's codes once into `codes` [R][kp] (the
// activations' order: slice p of group g at g * 256 + 64 p) and every token tile reads them
// back from L1/L2: the shift and mask ops (7 a row and group) are paid once per row tile
// instead of once per token tile. Decode batches stream the weights and decode in registers.
template <int R>
inline void decode_rows(const GemmArgs& a, std::size_t n, uint8_t* codes, std::size_t kp) {
  const std::size_t row_bytes = packed_row_bytes(a.K);
  const __m512i mask = _mm512_set1_epi8(3);
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = a.packed + (n + r) * row_bytes;
    for (std::size_t g = 0; g < kp / kGroupWeights; ++g) {
      const __m512i v = _mm512_loadu_si512(row + g * kGroupBytes);
      for (int p = 0; p < 4; ++p)
        _mm512_storeu_si512(codes + r * kp + g * kGroupWeights + 64 * p,
                            _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), mask));
    }
  }
}

// Rows [n, n + R) x tokens [m0, m0 + T); the codes come from `codes` (decoded by
// decode_rows) when kDecoded, else from the packed rows.
template <class Dot, int R, int T, bool kDecoded>
inline void tile(const GemmArgs& a, std::size_t n, std::size_t m0, const uint8_t* codes) {
  const std::size_t kp = padded_k(a.K);
  const std::size_t row_bytes = packed_row_bytes(a.K);
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[R][T];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const uint8_t* rows[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) rows[r] = a.packed + (n + r) * row_bytes;
  const int8_t* qs[T];
  #pragma GCC unroll 16
  for (int t = 0; t < T; ++t) qs[t] = a.q + (m0 + t) * kp;

  // Decode streams weights from memory: the first token tile prefetches ahead (see
  // kPrefetchTiles, kStreamTokens).
  const bool prefetch_ahead =
      !kDecoded && m0 == 0 && a.M <= kStreamTokens && n + (kPrefetchTiles + 1) * R <= a.N;
  for (std::size_t g = 0; g < kp / kGroupWeights; ++g) {
    __m512i v[R];
    if constexpr (!kDecoded)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) v[r] = _mm512_loadu_si512(rows[r] + g * kGroupBytes);
    if (prefetch_ahead)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kPrefetchTiles * R * row_bytes +
                                                         g * kGroupBytes),
                     R3MES_WEIGHT_PREFETCH_HINT);
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + R * row_bytes + g * kGroupBytes),
                     _MM_HINT_T0);  // the next tile, from L2 into L1 (see ternary.h)
      }
    typename Dot::Partial part[R][T];
    #pragma GCC unroll 16
    for (int p = 0; p < 4; ++p) {
      const std::size_t k = g * kGroupWeights + 64 * p;
      __m512i x[T];
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) x[t] = _mm512_loadu_si512(qs[t] + k);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        __m512i c;
        if constexpr (kDecoded)
          c = _mm512_loadu_si512(codes + r * kp + k);
        else
          c = p == 0 ? _mm512_and_si512(v[r], mask)
                     : _mm512_and_si512(_mm512_srli_epi16(v[r], 2 * p), mask);
        #pragma GCC unroll 16
        for (int t = 0; t < T; ++t) Dot::step(part[r][t], acc[r][t], c, x[t], p);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) Dot::finish_group(part[r][t], acc[r][t]);
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      store_output(a, m0 + t, n + r, _mm512_reduce_add_epi32(acc[r][t]) - a.qsum[m0 + t]);
}

// Largest K whose decoded 4-row tile lives on the stack (32 KiB).
constexpr std::size_t kDecodedMaxK = 8192;

template <class Dot, int R, bool kDecoded>
inline void token_tiles(const GemmArgs& a, std::size_t n, const uint8_t* codes) {
  std::size_t m = 0;
  if (!kDecoded && a.M <= kStreamTokens) {
    // A decode batch: tiles of 3 tokens, whose 4 x 3 accumulators, 4 weight and 3
    // activation registers fit the register file (4 x 4 spills). A last tile of one token
    // would decode the weights again for a third of the work: 3 + 1 tokens go as 2 + 2.
    std::size_t triples = a.M / 3;
    if (a.M % 3 == 1 && triples > 0) --triples;
    for (; m < 3 * triples; m += 3) tile<Dot, R, 3, kDecoded>(a, n, m, codes);
    for (; m + 2 <= a.M; m += 2) tile<Dot, R, 2, kDecoded>(a, n, m, codes);
  }
  for (; m + 4 <= a.M; m += 4) tile<Dot, R, 4, kDecoded>(a, n, m, codes);
  switch (a.M - m) {
    case 3: tile<Dot, R, 3, kDecoded>(a, n, m, codes); break;
    case 2: tile<Dot, R, 2, kDecoded>(a, n, m, codes); break;
    case 1: tile<Dot, R, 1, kDecoded>(a, n, m, codes); break;
    default: break;
  }
}

template <class Dot, int R>
inline void row_tile(const GemmArgs& a, std::size_t n) {
  const std::size_t kp = padded_k(a.K);
  if (a.M > kStreamTokens && kp <= kDecodedMaxK) {
    alignas(64) uint8_t codes[R * kDecodedMaxK];
    decode_rows<R>(a, n, codes, kp);
    token_tiles<Dot, R, true>(a, n, codes);
  } else {
    token_tiles<Dot, R, false>(a, n, nullptr);
  }
}

template <class Dot>
inline void gemm_rows(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  std::size_t n = n0;
  for (; n + 4 <= n1; n += 4) row_tile<Dot, 4>(a, n);
  for (; n < n1; ++n) row_tile<Dot, 1>(a, n);
}

}  // namespace
}  // namespace r3mes
