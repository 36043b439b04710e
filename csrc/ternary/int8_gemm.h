#pragma once
// int8 x int8 GEMM for the layers that stay 8-bit (the LM head): weights are
// per-row absmax int8, rows zero-padded to a multiple of 64 (kInt8Align).
//   y[m, n] = float(sum_k q[m,k] * w[n,k]) / (x_scale[m] * w_scale[n])
// with w_scale[n] = 127 / max(max|W_n|, 1e-5), as the activation scales.
#include <cstddef>
#include <cstdint>

#include "common/cpu_features.h"

namespace r3mes {

constexpr std::size_t kInt8Align = 64;
static inline std::size_t int8_padded_k(std::size_t k) { return (k + kInt8Align - 1) / kInt8Align * kInt8Align; }

struct Int8GemmArgs {
  const int8_t* w;          // [N, Kp]
  const int32_t* w_rowsum;  // [N] sum of each row, for the unsigned-activation trick
  const float* w_scale;     // [N]
  const int8_t* q;          // [M, Kp] zero padded
  const float* x_scale;     // [M]
  std::size_t M, N, K;
  float* out;               // [M, N]
  const uint8_t* u = nullptr;  // q + 128 (filled by int8_gemm for the VNNI kernel)
  const int16_t* q16 = nullptr;  // q widened to int16 (filled by int8_gemm for AVX2)
  // The AMX kernel's activations (filled by int8_gemm; layout in ternary/amx.h).
  const int32_t* q_quads = nullptr;
  std::size_t m_pad = 0;
};

// Quantises one row per call; returns false on NaN/Inf.
bool quantize_int8_weight(const float* w, std::size_t n, std::size_t k, int8_t* out,
                          float* scale, int32_t* rowsum);
void int8_gemm(const Int8GemmArgs& args, SimdLevel level);

void int8_gemm_rows_scalar(const Int8GemmArgs& a, std::size_t n0, std::size_t n1);
namespace isa_avx2 {
void int8_gemm_rows_avx2(const Int8GemmArgs& a, std::size_t n0, std::size_t n1);  // needs q16
void widen_activations_avx2(const int8_t* q, std::size_t count, int16_t* out);
}
namespace isa_avx512 {
void int8_gemm_rows_avx512(const Int8GemmArgs& a, std::size_t n0, std::size_t n1);
}
namespace isa_avx512vnni {
void int8_gemm_rows_avx512vnni(const Int8GemmArgs& a, std::size_t n0, std::size_t n1);
}
// Several tokens on the tile unit (q_quads, m_pad set; u too, for a last partial block).
namespace isa_amx {
void int8_gemm_rows_amx(const Int8GemmArgs& a, std::size_t n0, std::size_t n1);
}

static inline void store_int8_output(const Int8GemmArgs& a, std::size_t m, std::size_t n, int32_t acc) {
  a.out[m * a.N + n] = static_cast<float>(acc) / (a.x_scale[m] * a.w_scale[n]);
}

}  // namespace r3mes
