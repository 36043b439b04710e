// Per-token absmax int8 activation quantisation: scalar reference + dispatch.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "common/thread_pool.h"
#include "ternary/quantized_acts.h"
#include "ternary/ternary.h"

namespace r3mes {

float absmax_scalar(const float* x, std::size_t k, bool* finite) {
  float m = 0.0f;
  bool ok = true;
  for (std::size_t i = 0; i < k; ++i) {
    float a = std::fabs(x[i]);
    ok &= std::isfinite(a);
    m = std::max(m, a);
  }
  *finite = ok;
  return m;
}

int32_t quantize_row_scalar(const float* x, std::size_t k, float scale, int8_t* q) {
  int32_t sum = 0;
  for (std::size_t i = 0; i < k; ++i) {
    float r = std::nearbyint(x[i] * scale);  // round half to even, as torch.round
    r = std::min(127.0f, std::max(-128.0f, r));
    q[i] = static_cast<int8_t>(r);
    sum += q[i];
  }
  return sum;
}

bool quantize_activations(const float* x, std::size_t rows, std::size_t k, int8_t* q,
                          std::size_t q_stride, float* scale, int32_t* qsum, SimdLevel level) {
  auto absmax = absmax_scalar;
  auto quantize_row = quantize_row_scalar;
  if (level >= SimdLevel::Avx512) {
    absmax = isa_avx512::absmax_avx512;
    quantize_row = isa_avx512::quantize_row_avx512;
  } else if (level == SimdLevel::Avx2) {
    absmax = isa_avx2::absmax_avx2;
    quantize_row = isa_avx2::quantize_row_avx2;
  }
  bool all_finite = true;
  for (std::size_t r = 0; r < rows; ++r) {
    bool finite = true;
    float m = absmax(x + r * k, k, &finite);
    if (!finite) {
      all_finite = false;
      break;
    }
    // (1/m)*127, not 127/m: torch evaluates `127 / t` as t.reciprocal() * 127, and
    // HF BitNet writes the scale that way; this keeps the scales bit-identical.
    float s = (1.0f / std::max(m, 1e-5f)) * 127.0f;
    scale[r] = s;
    qsum[r] = quantize_row(x + r * k, k, s, q + r * q_stride);
    if (q_stride > k) std::memset(q + r * q_stride + k, 0, q_stride - k);
  }
  return all_finite;
}

QuantizedActs quantize_rows(const float* x, std::size_t m, std::size_t k, std::size_t row_stride) {
  QuantizedActs a;
  a.q.resize(m * row_stride);
  a.scale.resize(m);
  a.qsum.resize(m);
  if (!quantize_activations(x, m, k, a.q.data(), row_stride, a.scale.data(), a.qsum.data(),
                            active_simd_level()))
    throw std::invalid_argument("x: activations contain NaN or Inf");
  return a;
}

AlignedVector<uint8_t> unsigned_activations(const int8_t* q, std::size_t n) {
  AlignedVector<uint8_t> u(n);
  for (std::size_t i = 0; i < n; ++i) u[i] = static_cast<uint8_t>(q[i]) ^ 0x80u;
  return u;
}

}  // namespace r3mes
