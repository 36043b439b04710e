#pragma once
// 4-bit LM head: int4 weights in groups along K with an integer (uint8) scale per group and
// a float scale per row, int8 activations; every dot product is exact in int32.
//
//   W[n, k] ~= w4[n, k] * sub[n, k / G] / w_scale[n]          w4 in [-8, 7], sub in [1, 255]
//   acc[m, n] = sum_g sub[n, g] * sum_{k in g} q[m, k] * w4[n, k]            (exact int32)
//   y[m, n]   = float(acc) / (x_scale[m] * w_scale[n])                  (as the int8 head)
//
// The group scale is an integer so the whole row is one integer sum: the result does not
// depend on the order of accumulation, hence is bit-identical at every SIMD level and
// thread count, like the ternary and int8 kernels. |acc| <= K * 127 * 8 * 255 < 2^31 holds
// for K <= kInt4MaxK.
//
// Packing, per row, per block of 128 values: 64 bytes, byte j holding value j of the block
// (low nibble) and value 64 + j (high nibble), each stored as w4 + 8. One 64-byte load
// then gives two 64-value halves whose activations are contiguous too.
#include <cstddef>
#include <cstdint>

#include "common/cpu_features.h"

namespace r3mes {

constexpr std::size_t kInt4Block = 128;
constexpr std::size_t kInt4MaxK = 8192;
static inline std::size_t int4_padded_k(std::size_t k) { return (k + kInt4Block - 1) / kInt4Block * kInt4Block; }
static inline bool int4_group_supported(std::size_t g) { return g == 64 || g == 128; }

struct Int4GemmArgs {
  const uint8_t* w;          // [N, Kp / 2] packed nibbles
  const uint8_t* sub;        // [N, Kp / G] group scales
  const int32_t* w_offset;   // [N] 128 * sum_g sub[g] * sum_{k in g} w4[k] (unsigned-activation trick)
  const float* w_scale;      // [N]
  const int8_t* q;           // [M, Kp] zero padded
  const float* x_scale;      // [M]
  std::size_t M, N, K, group;
  float* out;                // [M, N]
  const uint8_t* u = nullptr;  // q + 128 (filled by int4_gemm for the SIMD kernels)
};

// Quantises rows [0, n) of w [n, k]; false on NaN/Inf. Each group's step is the one of a
// few candidates (max|w| / c) with the least squared error, then rounded onto the row's
// integer sub-scale grid before the values are rounded, so the stored values are the best
// for the step the kernel actually uses. `importance` [k] (optional, >= 0) weighs each
// input feature's error, e.g. the mean square of the activations the head sees.
bool quantize_int4_weight(const float* w, std::size_t n, std::size_t k, std::size_t group,
                          const float* importance, uint8_t* packed, uint8_t* sub, float* scale,
                          int32_t* offset);
void int4_gemm(const Int4GemmArgs& args, SimdLevel level);

void int4_gemm_rows_scalar(const Int4GemmArgs& a, std::size_t n0, std::size_t n1);
namespace isa_avx2 {
void int4_gemm_rows(const Int4GemmArgs& a, std::size_t n0, std::size_t n1);
}
namespace isa_avx512 {
void int4_gemm_rows(const Int4GemmArgs& a, std::size_t n0, std::size_t n1);
}

// static: ISA-flagged files include this; an inline (weak) copy compiled for AVX-512
// could be the one the linker keeps for baseline callers.
static inline void store_int4_output(const Int4GemmArgs& a, std::size_t m, std::size_t n, int32_t acc) {
  a.out[m * a.N + n] = static_cast<float>(acc) / (a.x_scale[m] * a.w_scale[n]);
}

}  // namespace r3mes

namespace pybind11 {
class module_;
}
namespace r3mes {
void register_head_bindings(pybind11::module_& mod);
}  // namespace r3mes
