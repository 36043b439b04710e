// AMX ternary GEMM (see ternary/amx.h). Compiled with AMX flags; only called after
// amx_usable() said yes.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ternary/amx.h"

namespace r3mes {
namespace isa_amx {
namespace {

// Tile registers: C 0-3 (2 row tiles x 2 token tiles), A (weights) 4-5, B (tokens) 6-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Weights of rows [n, n + 32) as signed bytes, all kp of them, in g256-permuted order:
// w[r * kp + 256 g + 64 p + i] = code - 1. Rows past n_end are zero.
void decode_rows(const GemmArgs& a, std::size_t n, std::size_t n_end, int8_t* w) {
  const std::size_t kp = padded_k(a.K), row_bytes = packed_row_bytes(a.K);
  const __m512i mask = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  for (std::size_t r = 0; r < 32; ++r) {
    int8_t* dst = w + r * kp;
    if (n + r >= n_end) {
      std::memset(dst, 0, kp);
      continue;
    }
    const uint8_t* row = a.packed + (n + r) * row_bytes;
    for (std::size_t g = 0; g < kp / kGroupWeights; ++g) {
      const __m512i v = _mm512_loadu_si512(row + g * kGroupBytes);
      for (int p = 0; p < 4; ++p) {
        const __m512i codes = _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), mask);
        _mm512_storeu_si512(dst + g * kGroupWeights + 64 * p, _mm512_sub_epi8(codes, one));
      }
    }
  }
}

// Writes C tile c[i * 16 + j] (weight row n + i, token m + j) as store_output would, 16
// rows of one token at a time: a column of the tile, gathered, is a run of the output row.
void store_tile(const GemmArgs& a, const int32_t* c, std::size_t n, std::size_t n_end,
                std::size_t m) {
  if (n >= n_end) return;
  const std::size_t rows = std::min<std::size_t>(16, n_end - n);
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                             5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  for (std::size_t j = 0; j < 16 && m + j < a.M; ++j) {
    const __m512i acc = _mm512_i32gather_epi32(column, c + j, 4);
    const std::size_t token = m + j;
    if (a.out_f32 == nullptr) {
      _mm512_mask_storeu_epi32(a.out_i32 + token * a.N + n, keep, acc);
      continue;
    }
    // The same float steps as store_output: float(acc) / (s_x * s_w) (+ bias).
    __m512 y = _mm512_div_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(a.x_scale[token] * a.w_scale));
    if (a.bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, a.bias + n));
    _mm512_mask_storeu_ps(a.out_f32 + token * a.N + n, keep, y);
  }
}

}  // namespace

void amx_pack_activations(const int8_t* q_perm, std::size_t M, std::size_t kp, int32_t* q_quads,
                          std::size_t m_pad) {
  // A transpose of dwords, [M][kp / 4] -> [kp / 4][m_pad], in blocks that stay in L1.
  std::memset(q_quads, 0, kp / 4 * m_pad * sizeof(int32_t));
  constexpr std::size_t kBlock = 64;
  for (std::size_t k0 = 0; k0 < kp / 4; k0 += kBlock)
    for (std::size_t m = 0; m < M; ++m) {
      const int8_t* src = q_perm + m * kp;
      const std::size_t k1 = std::min(kp / 4, k0 + kBlock);
      for (std::size_t kq = k0; kq < k1; ++kq) {
        int32_t v;
        std::memcpy(&v, src + 4 * kq, 4);
        q_quads[kq * m_pad + m] = v;
      }
    }
}

void ternary_gemm_rows_amx(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = padded_k(a.K), m_pad = a.m_pad;
  // Plain new/delete, no std container: this file is compiled for AMX and must not define
  // template code the baseline could end up calling (see scripts/check_isa_symbols.py).
  int8_t* const w = new int8_t[32 * kp];
  alignas(64) int32_t c[4][16 * 16];
  configure_tiles();
  for (std::size_t n = n0; n < n1; n += 32) {
    decode_rows(a, n, n1, w);
    for (std::size_t m = 0; m < a.M; m += kAmxTokenBlock) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (std::size_t k = 0; k < kp; k += 64) {
        _tile_loadd(4, w + k, static_cast<long>(kp));
        _tile_loadd(5, w + 16 * kp + k, static_cast<long>(kp));
        const int32_t* b = a.q_quads + (k / 4) * m_pad + m;
        _tile_loadd(6, b, static_cast<long>(m_pad * 4));
        _tile_loadd(7, b + 16, static_cast<long>(m_pad * 4));
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      for (int rt = 0; rt < 2; ++rt)
        for (int tt = 0; tt < 2; ++tt) store_tile(a, c[2 * rt + tt], n + 16 * rt, n1, m + 16 * tt);
    }
  }
  _tile_release();
  delete[] w;
}

}  // namespace isa_amx
}  // namespace r3mes
