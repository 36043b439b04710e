#pragma once
// Tile-unit helpers shared by the AMX kernels (ternary_gemm_amx.cpp, int8_gemm_amx.cpp).
// Include only in translation units compiled for AMX; everything here has internal linkage
// inside isa_amx (scripts/check_isa_symbols.py).
//
// Tile registers, in every kernel: C 0-3 (int32 sums), A 4-5 (weights: 16 rows x 64 bytes),
// B 6-7 (activations: 16 k-quads x the block's tokens, 4 bytes a token).
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace r3mes {
namespace isa_amx {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows; A 64 bytes wide, B and C 4 bytes a token for `tokens` (<= 16) tokens.
inline void configure_tiles(std::size_t tokens) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = t == 4 || t == 5 ? 64 : static_cast<uint16_t>(4 * tokens);
  }
  _tile_loadconfig(&cfg);
}

// Tile instructions with the tile numbers as template arguments (the intrinsics paste their
// arguments into the instruction text, so they take literals only). The loads clobber
// memory: the compiler must not sink stores below a tile load that reads them.
template <int kTile>
inline void tile_load(const void* base, long stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(kTile) : "memory");
}
template <int kC, int kA, int kB>
inline void tile_dpbusd() {  // C += A (unsigned bytes) . B (signed bytes)
  asm volatile("tdpbusd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(kC), "i"(kA), "i"(kB));
}
template <int kC, int kA, int kB>
inline void tile_dpbssd() {  // C += A (signed bytes) . B (signed bytes)
  asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(kC), "i"(kA), "i"(kB));
}

// The four C tiles (16 rows x `tokens` int32 each) to c, c + 16 tokens, ..., then their sum
// into the first.
inline void store_and_sum_c(int32_t* c, std::size_t tokens) {
  const std::size_t tile = 16 * tokens;
  const long stride = static_cast<long>(tokens * sizeof(int32_t));
  _tile_stored(0, c, stride);
  _tile_stored(1, c + tile, stride);
  _tile_stored(2, c + 2 * tile, stride);
  _tile_stored(3, c + 3 * tile, stride);
  for (std::size_t i = 0; i < tile; ++i) c[i] += c[tile + i] + c[2 * tile + i] + c[3 * tile + i];
}

// Reads a stored C tile (16 rows x `cols` int32, row-major) a token at a time: column j,
// gathered, is 16 consecutive outputs of token j; keep masks the rows that exist.
struct TileColumns {
  __m512i index;
  __mmask16 keep;
  TileColumns(std::size_t cols, std::size_t rows)
      : index(_mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(static_cast<int>(cols)))),
        keep(static_cast<__mmask16>((1u << std::min<std::size_t>(rows, 16)) - 1)) {}
  __m512i operator()(const int32_t* c, std::size_t j) const {
    return _mm512_i32gather_epi32(index, c + j, 4);
  }
};

inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

}  // namespace
}  // namespace isa_amx
}  // namespace r3mes
