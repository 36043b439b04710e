// 4-bit LM head: weight quantisation, the scalar reference and the dispatcher.
#include "head/int4_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"
#include "ternary/quantized_acts.h"

namespace r3mes {
namespace {

// Candidate steps max|w| / c for a group. c = 7 keeps the largest value exact on the
// positive side; larger c trade the extremes for a finer grid over the bulk (clamped at
// -8 / 7), which wins on heavy-tailed groups.
constexpr float kStepDivisors[] = {6.5f, 7.0f, 7.25f, 7.5f, 7.75f, 8.0f, 8.5f, 9.0f, 10.0f};

inline int quantize_value(float v, float inv_step) {
  return static_cast<int>(std::min(7.0f, std::max(-8.0f, std::nearbyint(v * inv_step))));
}

// Weighted squared error of the group on the grid of `step` (weights: the importance of
// each input feature, 1 without one).
float group_error(const float* w, const float* imp, std::size_t len, float step) {
  const float inv = 1.0f / step;
  float err = 0.0f;
  for (std::size_t i = 0; i < len; ++i) {
    const float d = w[i] - static_cast<float>(quantize_value(w[i], inv)) * step;
    err += (imp ? imp[i] : 1.0f) * d * d;
  }
  return err;
}

float best_step(const float* w, const float* imp, std::size_t len) {
  float m = 0.0f;
  for (std::size_t i = 0; i < len; ++i) m = std::max(m, std::fabs(w[i]));
  if (m == 0.0f) return 0.0f;
  float best = m / kStepDivisors[0], best_err = INFINITY;
  for (float c : kStepDivisors) {
    const float err = group_error(w, imp, len, m / c);
    if (err < best_err) best_err = err, best = m / c;
  }
  // Least squares for the step given the rounded values, once: a free gain when the
  // candidates straddle the optimum.
  double num = 0.0, den = 0.0;
  const float inv = 1.0f / best;
  for (std::size_t i = 0; i < len; ++i) {
    const double q = quantize_value(w[i], inv), a = imp ? imp[i] : 1.0f;
    num += a * w[i] * q;
    den += a * q * q;
  }
  if (den > 0.0) {
    const float refined = static_cast<float>(num / den);
    if (refined > 0.0f && group_error(w, imp, len, refined) < best_err) best = refined;
  }
  return best;
}

inline int weight_at(const uint8_t* row, std::size_t k) {
  const uint8_t byte = row[k / kInt4Block * (kInt4Block / 2) + k % (kInt4Block / 2)];
  return ((k % kInt4Block) < kInt4Block / 2 ? (byte & 15) : (byte >> 4)) - 8;
}

}  // namespace

bool quantize_int4_weight(const float* w, std::size_t n, std::size_t k, std::size_t group,
                          const float* importance, uint8_t* packed, uint8_t* sub, float* scale,
                          int32_t* offset) {
  for (std::size_t i = 0; i < n * k; ++i)
    if (!(std::fabs(w[i]) <= 3.4028235e38f)) return false;
  const std::size_t kp = int4_padded_k(k), groups = kp / group, row_bytes = kp / 2;
  parallel_for(n, 64, [&](std::size_t r0, std::size_t r1) {
    std::vector<float> steps(groups);
    std::vector<int8_t> q(kp);
    for (std::size_t r = r0; r < r1; ++r) {
      const float* row = w + r * k;
      float top = 0.0f;
      for (std::size_t g = 0; g < groups; ++g) {
        const std::size_t k0 = g * group, len = k0 < k ? std::min(group, k - k0) : 0;
        steps[g] = best_step(row + k0, importance ? importance + k0 : nullptr, len);
        top = std::max(top, steps[g]);
      }
      // d: the row's float step unit; a group's step is sub * d with sub an integer.
      const float d = top > 0.0f ? top / 255.0f : 1.0f;
      uint32_t off = 0;  // unsigned: the trick's intermediate may wrap, the result does not
      std::fill(q.begin(), q.end(), int8_t{0});
      for (std::size_t g = 0; g < groups; ++g) {
        const int s = std::clamp(static_cast<int>(std::nearbyint(steps[g] / d)), 1, 255);
        sub[r * groups + g] = static_cast<uint8_t>(s);
        const float inv = 1.0f / (static_cast<float>(s) * d);
        int32_t sum = 0;
        for (std::size_t i = g * group; i < std::min((g + 1) * group, k); ++i) {
          q[i] = static_cast<int8_t>(quantize_value(row[i], inv));
          sum += q[i];
        }
        off += static_cast<uint32_t>(s) * static_cast<uint32_t>(sum) * 128u;
      }
      uint8_t* out = packed + r * row_bytes;
      for (std::size_t b = 0; b < kp / kInt4Block; ++b)
        for (std::size_t j = 0; j < kInt4Block / 2; ++j) {
          const int lo = q[b * kInt4Block + j] + 8, hi = q[b * kInt4Block + kInt4Block / 2 + j] + 8;
          out[b * (kInt4Block / 2) + j] = static_cast<uint8_t>(lo | (hi << 4));
        }
      scale[r] = 1.0f / d;
      offset[r] = static_cast<int32_t>(off);
    }
  });
  return true;
}

void int4_gemm_rows_scalar(const Int4GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int4_padded_k(a.K), groups = kp / a.group;
  for (std::size_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * (kp / 2);
    for (std::size_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.q + m * kp;
      int64_t acc = 0;
      for (std::size_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (std::size_t k = g * a.group; k < (g + 1) * a.group; ++k) dot += x[k] * weight_at(row, k);
        acc += static_cast<int64_t>(a.sub[n * groups + g]) * dot;
      }
      store_int4_output(a, m, n, static_cast<int32_t>(acc));
    }
  }
}

void int4_gemm(const Int4GemmArgs& args, SimdLevel level) {
  if (args.M == 0 || args.N == 0) return;
  Int4GemmArgs a = args;
  // The SIMD kernels multiply unsigned activations (vpmaddubsw): u = q + 128, undone with
  // the row offsets.
  AlignedVector<uint8_t> u;
  auto fn = int4_gemm_rows_scalar;
  if (level != SimdLevel::Scalar) {
    u = unsigned_activations(a.q, a.M * int4_padded_k(a.K));
    a.u = u.data();
    fn = level >= SimdLevel::Avx512 ? isa_avx512::int4_gemm_rows : isa_avx2::int4_gemm_rows;
  }
  parallel_rows(a.N, [&](std::size_t n0, std::size_t n1) { fn(a, n0, n1); });
}

}  // namespace r3mes
