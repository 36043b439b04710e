// AMX ternary GEMM (see ternary/amx.h). Compiled with AMX flags; only called after
// amx_usable() said yes.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ternary/amx.h"
#include "ternary/amx_tiles.h"

namespace r3mes {
namespace isa_amx {
namespace {

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
// With kCodes the tile holds sums of codes times activations (weight + 1), and each
// token's activation sum comes off.
template <bool kCodes = false>
void store_tile(const GemmArgs& a, const int32_t* c, std::size_t cols, std::size_t n,
                std::size_t n_end, std::size_t m) {
  if (n >= n_end) return;
  const TileColumns column(cols, n_end - n);
  const __mmask16 keep = column.keep;
  for (std::size_t j = 0; j < cols && m + j < a.M; ++j) {
    const std::size_t token = m + j;
    __m512i acc = column(c, j);
    if constexpr (kCodes) acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(a.qsum[token]));
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

// A decode batch: up to kAmxFewTokens tokens in one B tile (16 k-quads x `cols` tokens;
// more tokens take a pass each, the block's rows read back from L1/L2), against 16 weight
// rows at a time over all of K. The A tiles are the weights' codes (0, 1,
// 2) as unsigned bytes (TDPBUSD; the activation sums come off at the end), decoded one
// 256-group ahead of the tile unit into one of two L1 buffers, so no row is decoded whole
// and each decoded byte is used once, from L1. C tile p sums slice p (64 weights) of every
// group: four independent products always queued for the tile unit; added at the end.
// Measured at 8 tokens against this with 32 or 64 rows a block (B loaded once for 2 or 4
// row tiles): 0.28 ms against 0.42 for 6912 x 2560 on one core; B tiles of 8 tokens
// instead of 16: 0.56 -> 0.28 ms (the B tiles come from L2, and their bytes are the cost).
constexpr std::size_t kFewRows = 16;
constexpr std::size_t kFewChunk = kFewRows * kGroupWeights;  // one group of the block, decoded

// Group g of the block's rows into chunk: slice p's tile (16 rows x 64 codes) at p * 1024.
void decode_few_group(const uint8_t* const* rows, std::size_t g, int8_t* chunk) {
  const __m512i mask = _mm512_set1_epi8(3);
  for (std::size_t r = 0; r < kFewRows; ++r) {
    const __m512i v = _mm512_loadu_si512(rows[r] + g * kGroupBytes);
    int8_t* dst = chunk + r * 64;
    _mm512_store_si512(dst, _mm512_and_si512(v, mask));
    _mm512_store_si512(dst + 1024, _mm512_and_si512(_mm512_srli_epi16(v, 2), mask));
    _mm512_store_si512(dst + 2048, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
    _mm512_store_si512(dst + 3072, _mm512_and_si512(_mm512_srli_epi16(v, 6), mask));
  }
}

// Rows [n, n + 16): past n_end the last row is read again (valid memory) and its outputs
// are not stored. next_block: the following block's rows, prefetched into L2 meanwhile.
void few_tokens_block(const GemmArgs& a, std::size_t n, std::size_t n_end, std::size_t m0,
                      std::size_t cols, const uint8_t* next_block, int8_t* buf, int32_t* c) {
  const std::size_t kp = padded_k(a.K), row_bytes = packed_row_bytes(a.K);
  const uint8_t* rows[kFewRows];
  for (std::size_t r = 0; r < kFewRows; ++r)
    rows[r] = a.packed + std::min(n + r, n_end - 1) * row_bytes;
  zero_c();
  const long b_stride = static_cast<long>(a.m_pad * sizeof(int32_t));
  const std::size_t groups = kp / kGroupWeights;
  decode_few_group(rows, 0, buf);
  for (std::size_t g = 0; g < groups; ++g) {
    // The next block, one contiguous run of 16 rows, into L2: 16 lines of it a group, in
    // order. (Measured from DRAM at 8 tokens: this order or a line a row, 1-3 blocks ahead,
    // T0, T1 or T2: all within 5%; the kernel then runs at 1.8x one token's GEMV, against
    // 1.6x with its weights in L3, because the prefetches and the B tiles' L1 misses share
    // the core's few line-fill buffers.)
    if (next_block != nullptr && g < row_bytes / 64)
      for (std::size_t r = 0; r < kFewRows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next_block + (g * kFewRows + r) * 64),
                     _MM_HINT_T1);
    if (g + 1 < groups) decode_few_group(rows, g + 1, buf + ((g + 1) & 1) * kFewChunk);
    const int8_t* chunk = buf + (g & 1) * kFewChunk;
    const int32_t* b = a.q_quads + g * (kGroupWeights / 4) * a.m_pad + m0;
    tile_load<4>(chunk, 64);
    tile_load<6>(b, b_stride);
    tile_dpbusd<0, 4, 6>();
    tile_load<5>(chunk + 1024, 64);
    tile_load<7>(b + 16 * a.m_pad, b_stride);
    tile_dpbusd<1, 5, 7>();
    tile_load<4>(chunk + 2048, 64);
    tile_load<6>(b + 32 * a.m_pad, b_stride);
    tile_dpbusd<2, 4, 6>();
    tile_load<5>(chunk + 3072, 64);
    tile_load<7>(b + 48 * a.m_pad, b_stride);
    tile_dpbusd<3, 5, 7>();
  }
  store_and_sum_c(c, cols);
  store_tile<true>(a, c, cols, n, n_end, m0);
}

void few_tokens_rows(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  alignas(64) int8_t buf[2 * kFewChunk];
  alignas(64) int32_t c[4 * 16 * kAmxFewTokens];
  const std::size_t cols = std::min(a.m_pad, kAmxFewTokens);
  configure_tiles(cols);
  const std::size_t row_bytes = packed_row_bytes(a.K);
  for (std::size_t n = n0; n < n1; n += kFewRows) {
    const uint8_t* next =
        n + 2 * kFewRows <= n1 ? a.packed + (n + kFewRows) * row_bytes : nullptr;
    for (std::size_t m0 = 0; m0 < a.M; m0 += cols)
      few_tokens_block(a, n, n1, m0, cols, m0 == 0 ? next : nullptr, buf, c);
  }
  _tile_release();
}

}  // namespace

void amx_pack_activations(const int8_t* q_perm, std::size_t M, std::size_t kp, int32_t* q_quads,
                          std::size_t m_pad) {
  // A transpose of dwords, [M][kp / 4] -> [kp / 4][m_pad], in blocks that stay in L1; every
  // dword written (the padding tokens' as 0), so q_quads needs no clearing first.
  constexpr std::size_t kBlock = 64;
  for (std::size_t k0 = 0; k0 < kp / 4; k0 += kBlock) {
    const std::size_t k1 = std::min(kp / 4, k0 + kBlock);
    for (std::size_t m = 0; m < M; ++m) {
      const int8_t* src = q_perm + m * kp;
      for (std::size_t kq = k0; kq < k1; ++kq) {
        int32_t v;
        std::memcpy(&v, src + 4 * kq, 4);
        q_quads[kq * m_pad + m] = v;
      }
    }
    for (std::size_t kq = k0; M < m_pad && kq < k1; ++kq)
      std::memset(q_quads + kq * m_pad + M, 0, (m_pad - M) * sizeof(int32_t));
  }
}

void ternary_gemm_rows_amx(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = padded_k(a.K), m_pad = a.m_pad;
  if (m_pad <= kAmxFewTokenPasses * kAmxFewTokens) {
    few_tokens_rows(a, n0, n1);
    return;
  }
  // Plain new/delete, no std container: this file is compiled for AMX and must not define
  // template code the baseline could end up calling (see scripts/check_isa_symbols.py).
  int8_t* const w = new int8_t[32 * kp];
  alignas(64) int32_t c[4][16 * 16];
  configure_tiles(16);
  for (std::size_t n = n0; n < n1; n += 32) {
    decode_rows(a, n, n1, w);
    for (std::size_t m = 0; m < a.M; m += kAmxTokenBlock) {
      zero_c();
      for (std::size_t k = 0; k < kp; k += 64) {
        tile_load<4>(w + k, static_cast<long>(kp));
        tile_load<5>(w + 16 * kp + k, static_cast<long>(kp));
        const int32_t* b = a.q_quads + (k / 4) * m_pad + m;
        tile_load<6>(b, static_cast<long>(m_pad * 4));
        tile_load<7>(b + 16, static_cast<long>(m_pad * 4));
        tile_dpbssd<0, 4, 6>();
        tile_dpbssd<1, 4, 7>();
        tile_dpbssd<2, 5, 6>();
        tile_dpbssd<3, 5, 7>();
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      for (int rt = 0; rt < 2; ++rt)
        for (int tt = 0; tt < 2; ++tt)
          store_tile(a, c[2 * rt + tt], 16, n + 16 * rt, n1, m + 16 * tt);
    }
  }
  _tile_release();
  delete[] w;
}

}  // namespace isa_amx
}  // namespace r3mes
