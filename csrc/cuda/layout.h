#pragma once
// GPU weight layout of the ternary kernels, and its host-side repacking.
//
// Packed weight layout ("r3mes-cuda-2bit-c64", row-major, one row after another)
// ------------------------------------------------------------------------------
// Each weight w in {-1, 0, +1} is stored as the 2-bit code c = w + 1 in {0, 1, 2}
// (the same codes as the CPU layout in csrc/ternary/ternary.h). A row of K weights
// is padded with code 1 (weight 0) to Kp = ceil(K / 64) * 64 and cut into 16-byte
// *chunks* of 64 weights, so every row is row_bytes = Kp / 4 bytes, a multiple of
// 16: with a 16-byte aligned base, every chunk is a naturally aligned 16-byte load.
// A chunk is four little-endian 32-bit words i = 0..3; word i holds the 16 weights
// k = 64c + 16i + 0..15 as
//
//   word i, byte b (b = 0..3), bits [2p, 2p+1]  <-  c[k = 64c + 16i + 4p + b]
//
//   byte b of word i:  | c[16i+12+b] | c[16i+8+b] | c[16i+4+b] | c[16i+b] |  (msb .. lsb)
//
// so (word >> 2p) & 0x03030303 is four bytes holding the codes of the 4
// *consecutive* weights 64c + 16i + 4p + 0..3, in byte order: exactly the int32
// word of int8 activations at the same k. One shift and one AND decode 4 weights
// into a dp4a operand (GEMV), or into an mma.m16n8k32 A fragment register (GEMM,
// see fragments.h for the k permutation it uses).
//
// The kernels multiply codes, not weights:  sum_k w_k q_k = sum_k c_k q_k - sum_k q_k,
// with sum_k q_k ("qsum", per token) computed once by the activation quantiser.
// Padded weights meet padded activations, which are 0.
//
// Activations (int8, per-token absmax as DESIGN.md) are stored [M, Kp] with the
// same padded row length, zero-filled past K, so chunk c of a token row is the
// 64 bytes at q + m * Kp + 64 c (16-byte aligned).
#include <cstddef>
#include <cstdint>

namespace r3mes::cuda {

constexpr std::size_t kChunkWeights = 64;  // weights per 16-byte chunk
constexpr std::size_t kChunkBytes = 16;

inline std::size_t padded_k(std::size_t k) {
  return (k + kChunkWeights - 1) / kChunkWeights * kChunkWeights;
}
inline std::size_t packed_row_bytes(std::size_t k) { return padded_k(k) / 4; }
inline std::size_t chunks_per_row(std::size_t k) { return padded_k(k) / kChunkWeights; }

// Byte offset inside a row, and bit shift inside that byte, of weight k.
inline std::size_t weight_byte(std::size_t k) {
  const std::size_t c = k / 64, i = (k % 64) / 16, b = k % 4;
  return 16 * c + 4 * i + b;
}
inline unsigned weight_shift(std::size_t k) { return static_cast<unsigned>(2 * ((k % 16) / 4)); }

// Packs int8 ternary values t [n, k] (each in {-1, 0, 1}) into packed [n,
// packed_row_bytes(k)]. Returns the flat index of the first value outside
// {-1, 0, 1}, or -1 when all are valid (nothing is guaranteed written then).
std::ptrdiff_t repack_ternary(const int8_t* t, std::size_t n, std::size_t k, uint8_t* packed);

// Inverse of repack_ternary: t [n, k] from packed [n, packed_row_bytes(k)].
void unpack_ternary(const uint8_t* packed, std::size_t n, std::size_t k, int8_t* t);

}  // namespace r3mes::cuda
