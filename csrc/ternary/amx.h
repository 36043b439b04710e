#pragma once
// AMX (Advanced Matrix Extensions) ternary GEMM for several tokens on the tile unit, where
// one TDPBUSD multiplies a 16 x 64 int8 tile by a 64 x 16 one (16K multiply-adds) in about
// the time vpdpbusd does 256. Used when the CPU has AMX-INT8, Linux has granted this
// process the tile state (arch_prctl), and a product has at least kAmxMinTokens tokens;
// one token stays on the streaming VNNI kernel. The integer results are exact, so they
// equal every other kernel's bit for bit.
//
// The activations are the B tiles, in the tile unit's "VNNI" layout: 4 consecutive k of
// one token in a dword, tokens side by side,
//   q_quads[(k / 4) * m_pad + m] = q_perm[m, k .. k + 3]     (dwords, padding tokens zero)
// with q_perm the g256-permuted activations the AVX-512 kernels use. The weights are the A
// tiles, 16 rows x 64 weights, decoded from the packed codes of each 256-group:
// - a decode batch or a short prompt (M <= kAmxFewTokenPasses * kAmxFewTokens; m_pad 4, 8
//   or a multiple of 16): a B tile holds up to 16 tokens; a 256-group of 16 rows is decoded
//   to its codes (0, 1, 2, TDPBUSD, the activation sums subtracted at the end) just ahead
//   of the tile unit, in L1, and used once, again for each further 16 tokens. At 8 tokens
//   the product costs 1.8x one token's GEMV from DRAM (2.7x on VNNI), 1.6x from L3 (3.7x).
// - longer prompts (m_pad a multiple of kAmxTokenBlock): 32 rows decoded whole to signed
//   bytes (TDPBSSD), reused by every 32-token block.
#include <cstddef>
#include <cstdint>

#include "ternary/ternary.h"

namespace r3mes {

// From 3 tokens the decode-batch kernel beats VNNI (2 tokens: 1.1x slower, 4: 0.7x the
// time, 8: 0.5x; 6912 x 2560, Sapphire Rapids, 2 threads).
constexpr std::size_t kAmxMinTokens = 3;
constexpr std::size_t kAmxFewTokens = 16;
constexpr std::size_t kAmxTokenBlock = 32;

// The AMX kernels' token padding: 4 or 8 tokens in one B tile, a multiple of 16 for the
// decode-batch kernel's passes, else a multiple of kAmxTokenBlock.
// Up to 4 passes of 16 tokens the decode-batch kernel beats decoding 32 rows whole (6912 x
// 2560 from DRAM, 2 threads: 24 tokens 1.12 -> 0.87 ms, 40 tokens 1.73 -> 1.23, 64 tokens
// 1.82 -> 1.65; at 128 it is 15% slower).
constexpr std::size_t kAmxFewTokenPasses = 4;
inline std::size_t amx_token_pad(std::size_t tokens) {
  if (tokens <= 4) return 4;
  if (tokens <= 8) return 8;
  if (tokens <= kAmxFewTokenPasses * kAmxFewTokens) return (tokens + 15) / 16 * 16;
  return (tokens + kAmxTokenBlock - 1) / kAmxTokenBlock * kAmxTokenBlock;
}

// Whether the AMX kernel can run here (compiled, CPU, OS permission; R3MES_AMX=0 and
// set_amx_enabled(false) turn it off).
bool amx_usable();
void set_amx_enabled(bool enabled);

// q_quads [kp / 4][m_pad] dwords from the g256-permuted activations q [M, kp].
namespace isa_amx {
void amx_pack_activations(const int8_t* q_perm, std::size_t M, std::size_t kp, int32_t* q_quads,
                          std::size_t m_pad);
}

// Rows [n0, n1) for all tokens; a.q_quads / a.m_pad set (see GemmArgs).
namespace isa_amx {
void ternary_gemm_rows_amx(const GemmArgs& a, std::size_t n0, std::size_t n1);
}

}  // namespace r3mes
