#pragma once
// AMX (Advanced Matrix Extensions) prefill GEMM: the ternary GEMM for many tokens on the
// tile unit, where one TDPBSSD multiplies a 16 x 64 int8 tile by a 64 x 16 one (16K
// multiply-adds) in the time vpdpbusd does 256. Used when the CPU has AMX-INT8, Linux has
// granted this process the tile state (arch_prctl), and a product has at least
// kAmxMinTokens tokens; decode (one token) stays on the streaming VNNI kernel. The integer
// results are exact, so they equal every other kernel's bit for bit.
//
// Operands: the weights are the A tiles: 16 rows x 64 weights as signed bytes in {-1,0,1},
// decoded from the packed codes of each 256-group in the same order the AVX-512 kernels use
// (so the activations are the g256-permuted ones). The activations are the B tiles, in the
// tile unit's "VNNI" layout: 4 consecutive k of one token in a dword, tokens side by side,
//   q_quads[(k / 4) * m_pad + m] = q_perm[m, k .. k + 3]     (dwords; m_pad = M rounded up
// to 32, padding tokens zero). C tiles are 16 weight rows x 16 tokens of int32.
#include <cstddef>
#include <cstdint>

#include "ternary/ternary.h"

namespace r3mes {

constexpr std::size_t kAmxMinTokens = 16;
constexpr std::size_t kAmxTokenBlock = 32;

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
