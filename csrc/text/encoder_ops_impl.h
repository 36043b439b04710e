#pragma once
// The encoder's fp32 steps (encoder_ops.h) on GCC vector-extension vectors V of 8 or 16
// floats: each ISA-flagged translation unit that includes this header instantiates them
// with its register width (Ymm, Zmm). Internal linkage: the copies never mix.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/vector_math.h"  // splat, vmin, vmax, exp_nonpositive
#include "text/encoder_ops.h"

namespace r3mes {
namespace {

typedef float Ymm __attribute__((vector_size(32)));
typedef float Zmm __attribute__((vector_size(64)));

template <class V>
constexpr std::size_t kLanes = sizeof(V) / sizeof(float);  // divides kOpLanes

template <class V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
template <class V>
inline float hsum(V v) {
  float s = 0.0f;
  for (std::size_t l = 0; l < kLanes<V>; ++l) s += v[l];
  return s;
}
template <class V>
inline float hmax(V v) {
  float m = v[0];
  for (std::size_t l = 1; l < kLanes<V>; ++l) m = std::max(m, v[l]);
  return m;
}

// A vector of keys (or of features) at a time: each score sums its products over the
// features in the spec's order, keys transposed into [head_dim][round_up(len, 16)]; the
// softmax's max and sum go by vectors (padding scores are -1e30, whose exp is 0). Four
// queries go together, four independent chains of FMAs (one would wait on each FMA's
// latency); a last partial group repeats its last query.
template <class V>
inline void attention_head_lanes(const AttentionHead& a) {
  constexpr std::size_t L = kLanes<V>, Q = kAttentionQueries;
  const std::size_t stride = 3 * a.h, hd = a.head_dim;
  const std::size_t lp = (a.len + kOpLanes - 1) / kOpLanes * kOpLanes;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* keys = a.qkv + a.s0 * stride + a.h + a.head * hd;
  const float* values = a.qkv + a.s0 * stride + 2 * a.h + a.head * hd;
  float* kt = a.scratch;            // [hd][lp]
  float* p = a.scratch + hd * lp;   // [Q][lp]
  // 16 keys at a time: the key rows read and the lines written stay in L1.
  for (std::size_t j0 = 0; j0 < lp; j0 += kOpLanes)
    for (std::size_t e = 0; e < hd; ++e)
      for (std::size_t j = j0; j < j0 + kOpLanes; ++j)
        kt[e * lp + j] = j < a.len ? keys[j * stride + e] : 0.0f;
  for (std::size_t i0 = 0; i0 < a.len; i0 += Q) {
    const float* q[Q];
    for (std::size_t r = 0; r < Q; ++r)
      q[r] = a.qkv + (a.s0 + std::min(i0 + r, a.len - 1)) * stride + a.head * hd;
    for (std::size_t jb = 0; jb < lp; jb += L) {
      V s[Q] = {};
      for (std::size_t e = 0; e < hd; ++e) {
        const V k = load<V>(kt + e * lp + jb);
        for (std::size_t r = 0; r < Q; ++r) s[r] += q[r][e] * k;
      }
      for (std::size_t r = 0; r < Q; ++r) store(p + r * lp + jb, s[r] * scale);
    }
    for (std::size_t r = 0; r < Q; ++r) {
      float* pr = p + r * lp;
      for (std::size_t j = a.len; j < lp; ++j) pr[j] = -1e30f;
      V top = splat<V>(-1e30f), sum{};
      for (std::size_t j = 0; j < lp; j += L) top = vmax(top, load<V>(pr + j));
      const float m = hmax(top);
      for (std::size_t j = 0; j < lp; j += L) {
        const V e = exp_nonpositive(load<V>(pr + j) - m);
        store(pr + j, e);
        sum += e;
      }
      const float inv = 1.0f / hsum(sum);
      for (std::size_t j = 0; j < lp; j += L) store(pr + j, load<V>(pr + j) * inv);
    }
    for (std::size_t eb = 0; eb < hd; eb += L) {
      V acc[Q] = {};
      for (std::size_t j = 0; j < a.len; ++j) {
        const V v = load<V>(values + j * stride + eb);
        for (std::size_t r = 0; r < Q; ++r) acc[r] += p[r * lp + j] * v;
      }
      for (std::size_t r = 0; r < Q && i0 + r < a.len; ++r)
        store(a.ctx + (a.s0 + i0 + r) * a.h + a.head * hd + eb, acc[r]);
    }
  }
}

template <class V>
inline void layernorm_rows_lanes(float* x, const float* y, const float* weight, const float* bias,
                                 std::size_t t0, std::size_t t1, std::size_t h, float eps) {
  constexpr std::size_t L = kLanes<V>;
  for (std::size_t i = t0; i < t1; ++i) {
    float* r = x + i * h;
    V m{};
    for (std::size_t j = 0; j < h; j += L) {
      const V v = y ? load<V>(r + j) + load<V>(y + i * h + j) : load<V>(r + j);
      store(r + j, v);
      m += v;
    }
    const float mean = hsum(m) / static_cast<float>(h);
    V var{};
    for (std::size_t j = 0; j < h; j += L) {
      const V d = load<V>(r + j) - mean;
      var += d * d;
    }
    const float inv = 1.0f / std::sqrt(hsum(var) / static_cast<float>(h) + eps);
    for (std::size_t j = 0; j < h; j += L)
      store(r + j, (load<V>(r + j) - mean) * inv * load<V>(weight + j) + load<V>(bias + j));
  }
}

template <class V>
inline V gelu_vector(V x) {
  const V z = vmax(vmin<V>(x * kInvSqrt2, splat<V>(kErfSaturation)), splat<V>(-kErfSaturation));
  const V z2 = z * z;
  V p = splat<V>(kErfNumerator[0]), q = splat<V>(kErfDenominator[0]);
  for (std::size_t i = 1; i < sizeof(kErfNumerator) / sizeof(float); ++i) p = p * z2 + kErfNumerator[i];
  for (std::size_t i = 1; i < sizeof(kErfDenominator) / sizeof(float); ++i) q = q * z2 + kErfDenominator[i];
  const V erf = vmax(vmin(z * p / q, splat<V>(1.0f)), splat<V>(-1.0f));
  const V half_x = x * 0.5f;
  return half_x + half_x * erf;
}

template <class V>
inline void gelu_lanes(float* x, std::size_t n) {
  constexpr std::size_t L = kLanes<V>;
  std::size_t i = 0;
  for (; i + L <= n; i += L) store(x + i, gelu_vector(load<V>(x + i)));
  if (i < n) {
    float tail[L] = {};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    store(tail, gelu_vector(load<V>(tail)));
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
  }
}

}  // namespace
}  // namespace r3mes
