#pragma once
// Per-thread building blocks of the ternary kernels, shared by the CUDA kernels
// and by the host emulation (emulate.cpp) that checks their index math on
// machines without a GPU. Everything here is pure integer arithmetic on the
// layout of layout.h.
#include <cstdint>

#if defined(__CUDACC__)
#define R3MES_HD __host__ __device__ __forceinline__
#else
#define R3MES_HD inline
#endif

namespace r3mes::cuda {

constexpr uint32_t kCodeMask = 0x03030303u;

// c + sum_b int8(a.byte b) * int8(b.byte b): __dp4a on the device, its
// definition on the host. The codes (0..2) are valid non-negative int8s.
R3MES_HD int32_t dp4a_s8(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int i = 0; i < 4; ++i)
    c += static_cast<int32_t>(static_cast<int8_t>(a >> (8 * i))) *
         static_cast<int32_t>(static_cast<int8_t>(b >> (8 * i)));
  return c;
#endif
}

// ---- GEMV (dp4a) ------------------------------------------------------------
// codes[4 i + p] = the codes of weights 64c + 16i + 4p + 0..3 of one chunk
// (words w[0..3]), one per byte: the dp4a operand matching activation word
// 4i + p of the chunk's 64 activation bytes.
R3MES_HD void decode_chunk(const uint32_t w[4], uint32_t codes[16]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 4; ++i) {
    codes[4 * i + 0] = w[i] & kCodeMask;
    codes[4 * i + 1] = (w[i] >> 2) & kCodeMask;
    codes[4 * i + 2] = (w[i] >> 4) & kCodeMask;
    codes[4 * i + 3] = (w[i] >> 6) & kCodeMask;
  }
}

// acc + sum over the chunk of code * q; act[j] is int32 word j (bytes 4j..4j+3)
// of the chunk's activations.
R3MES_HD int32_t codes_dot(const uint32_t codes[16], const uint32_t act[16], int32_t acc) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 16; ++j) acc = dp4a_s8(codes[j], act[j], acc);
  return acc;
}

// ---- GEMM (mma.sync.m16n8k32 s8) ----------------------------------------------
// A warp computes a tile of 16 weight rows (mma's M) x 8 tokens (mma's N) over
// one 64-weight chunk c as two k-steps ks = 0, 1 of 32. Lane = 4 g + t4 holds
// A rows g and g + 8 and B column (token) g. Because a dot product may visit k
// in any order that A and B share, the kernel assigns mma k-slots to real k so
// that every lane reads *one* 32-bit weight word per row and *one* 16-byte run
// of activations per token:
//
//   mma k-slot (ks, j, t4, b), i.e. A column / B row 16 j + 4 t4 + b of k-step ks,
//   holds real k = 64 c + 16 t4 + 8 ks + 4 j + b          (j, b = 0..3 / 0..1)
//
// A fragment (PTX "m16n8k32 .s8" layout): a0 = row g, cols 4 t4 + b; a1 = row
// g + 8, same cols; a2 = row g, cols 16 + 4 t4 + b; a3 = row g + 8, same cols.
// With word t4 of the chunk holding k = 16 t4 + 4 p + b at bits 2p of byte b,
// a0/a1 are p = 2 ks and a2/a3 are p = 2 ks + 1.
// B fragment: b0 = rows (k) 4 t4 + b, b1 = rows 16 + 4 t4 + b, column g, i.e.
// bytes 8 ks + b and 8 ks + 4 + b of the lane's 16 activation bytes
// [16 t4, 16 t4 + 16) of the chunk: words 2 ks and 2 ks + 1.

// Index (in 32-bit words from the row start) of the weight word lane t4 reads for chunk c.
R3MES_HD int64_t mma_weight_word(int64_t c, int t4) { return 4 * c + t4; }
// Index (in 16-byte vectors from the token row start) of the activations lane t4 reads.
R3MES_HD int64_t mma_act_vector(int64_t c, int t4) { return 4 * c + t4; }

R3MES_HD void mma_a_fragment(uint32_t w_row_g, uint32_t w_row_g8, int ks, uint32_t a[4]) {
  const int s0 = 4 * ks, s1 = 4 * ks + 2;
  a[0] = (w_row_g >> s0) & kCodeMask;
  a[1] = (w_row_g8 >> s0) & kCodeMask;
  a[2] = (w_row_g >> s1) & kCodeMask;
  a[3] = (w_row_g8 >> s1) & kCodeMask;
}

R3MES_HD void mma_b_fragment(const uint32_t act[4], int ks, uint32_t b[2]) {
  b[0] = act[2 * ks];
  b[1] = act[2 * ks + 1];
}

}  // namespace r3mes::cuda
