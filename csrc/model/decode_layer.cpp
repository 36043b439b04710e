#include "model/decode_layer.h"

#include <cmath>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "attention/decode_attention.h"
#include "ternary/ternary.h"

namespace r3mes {
namespace {

// y = w * x / sqrt(mean(x^2) + eps) per row, as HF's BitNetRMSNorm (float32 result).
// The mean of squares is accumulated in float64, in 8 interleaved partial sums added as a
// tree (a fixed order, so deterministic, and at least as accurate as torch's float32
// reduction); one running sum was a chain of dependent adds, 4-5 ms of a decode step of 8
// rows of the 2B-4T shape.
void rms_norm(const float* x, const float* w, std::size_t rows, std::size_t n, float eps,
              float* y) {
  constexpr std::size_t kLanes = 8;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    double part[kLanes] = {};
    std::size_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (std::size_t j = 0; j < kLanes; ++j)
        part[j] += static_cast<double>(xr[i + j]) * xr[i + j];
    for (std::size_t j = 0; i < n; ++i, ++j) part[j] += static_cast<double>(xr[i]) * xr[i];
    for (std::size_t width = kLanes / 2; width > 0; width /= 2)
      for (std::size_t j = 0; j < width; ++j) part[j] += part[j + width];
    const double sq = part[0];
    const float variance = static_cast<float>(sq / static_cast<double>(n));
    const float inv = 1.0f / std::sqrt(variance + eps);
    float* yr = y + r * n;
    for (std::size_t i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

// q * cos + rotate_half(q) * sin over each head of each row, in place; rotate_half(q)
// is cat(-q[half:], q[:half]) (HF's convention).
void apply_rope(float* x, std::size_t rows, std::size_t heads, std::size_t head_dim,
                const float* cos, const float* sin, float* tmp /* [head_dim] */) {
  const std::size_t half = head_dim / 2;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* c = cos + r * head_dim;
    const float* s = sin + r * head_dim;
    for (std::size_t hd = 0; hd < heads; ++hd) {
      float* v = x + (r * heads + hd) * head_dim;
      for (std::size_t i = 0; i < half; ++i) {
        tmp[i] = v[i] * c[i] + (-v[i + half]) * s[i];
        tmp[i + half] = v[i + half] * c[i + half] + v[i] * s[i + half];
      }
      for (std::size_t i = 0; i < head_dim; ++i) v[i] = tmp[i];
    }
  }
}

// gate[i] = act(gate[i]) * up[i]. The ReLU^2 loop is written with vector max/multiply:
// compiled as a scalar loop with a branch on the sign of the gate (GCC does not if-convert a
// float select without -ffinite-math-only), mispredicted half the time, it took 3-4 ms of a
// decode step of 8 rows of the 2B-4T shape. max(g, 0) returns 0 for g = -0 or NaN, as the
// scalar select below.
void gated_activation(DecodeActivation activation, float* __restrict gate,
                      const float* __restrict up, std::size_t n) {
  if (activation == DecodeActivation::Relu2) {
    std::size_t i = 0;
#if defined(__SSE2__)
    const __m128 zero = _mm_setzero_ps();
    for (; i + 4 <= n; i += 4) {
      const __m128 r = _mm_max_ps(_mm_loadu_ps(gate + i), zero);
      _mm_storeu_ps(gate + i, _mm_mul_ps(_mm_mul_ps(r, r), _mm_loadu_ps(up + i)));
    }
#endif
    for (; i < n; ++i) {
      const float r = gate[i] > 0.0f ? gate[i] : 0.0f;
      gate[i] = r * r * up[i];
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

// Runs `count` projections of the same input x [B, in] in one pool hand-off.
bool project(const DecodeLayerSpec& spec, const int* which, std::size_t count, const float* x,
             std::size_t B, float* const* outs, DecodeScratch& scratch, SimdLevel level) {
  GemmArgs args[kNumProjections];
  for (std::size_t i = 0; i < count; ++i) {
    const DecodeProjection& p = spec.proj[which[i]];
    DoraCall& call = scratch.calls[which[i]];
    if (!call.prepare(x, B, p.in, p.packed, p.out, p.w_scale, nullptr, p.adapters,
                      p.mix.data(), p.base_w.empty() ? nullptr : p.base_w.data(), p.mix_rows,
                      outs[i], level, p.base_factor.empty() ? nullptr : p.base_factor.data()))
      return false;
    args[i] = call.args;
  }
  ternary_gemm_multi(args, count, level);
  return true;
}

}  // namespace

bool decode_layer_step(const DecodeLayerSpec& spec, float* h, std::size_t B, const KvBlocks& kv,
                       const int64_t* start, const int64_t* pos, const float* cos,
                       const float* sin, DecodeScratch& s, SimdLevel level) {
  const std::size_t H = spec.hidden, I = spec.intermediate, D = spec.head_dim;
  const std::size_t qn = spec.heads * D, kvn = spec.kv_heads * D;
  s.x.resize(B * H);
  s.q.resize(B * qn);
  s.k.resize(B * kvn);
  s.v.resize(B * kvn);
  s.o.resize(B * qn);
  s.gate.resize(B * I);
  s.up.resize(B * I);
  s.y.resize(B * H);
  s.rope.resize(D);
  s.lengths.resize(B);

  // ---- attention
  rms_norm(h, spec.input_norm, B, H, spec.eps, s.x.data());
  {
    const int which[3] = {kQ, kK, kV};
    float* outs[3] = {s.q.data(), s.k.data(), s.v.data()};
    if (!project(spec, which, 3, s.x.data(), B, outs, s, level)) return false;
  }
  apply_rope(s.q.data(), B, spec.heads, D, cos, sin, s.rope.data());
  apply_rope(s.k.data(), B, spec.kv_heads, D, cos, sin, s.rope.data());
  for (std::size_t b = 0; b < B; ++b) {
    const std::size_t p = static_cast<std::size_t>(pos[b]);
    s.lengths[b] = pos[b] + 1;
    for (std::size_t g = 0; g < spec.kv_heads; ++g) {
      const std::size_t dst = kv.offset(b, spec.kv_heads, g, p, D);
      const std::size_t src = (b * spec.kv_heads + g) * D;
      for (std::size_t d = 0; d < D; ++d) {
        kv.k[dst + d] = s.k[src + d];
        kv.v[dst + d] = s.v[src + d];
      }
    }
  }
  decode_attention(s.q.data(), kv, start, s.lengths.data(), B, spec.heads, spec.kv_heads, D,
                   spec.attn_scaling, s.o.data());
  const float* o = s.o.data();
  if (spec.attn_sub_norm != nullptr) {
    rms_norm(s.o.data(), spec.attn_sub_norm, B, qn, spec.eps, s.q.data());
    o = s.q.data();
  }
  {
    const int which[1] = {kO};
    float* outs[1] = {s.y.data()};
    if (!project(spec, which, 1, o, B, outs, s, level)) return false;
  }
  for (std::size_t i = 0; i < B * H; ++i) h[i] = h[i] + s.y[i];

  // ---- MLP
  rms_norm(h, spec.post_norm, B, H, spec.eps, s.x.data());
  {
    const int which[2] = {kGate, kUp};
    float* outs[2] = {s.gate.data(), s.up.data()};
    if (!project(spec, which, 2, s.x.data(), B, outs, s, level)) return false;
  }
  float* a = s.gate.data();
  gated_activation(spec.activation, a, s.up.data(), B * I);
  const float* mlp_in = a;
  if (spec.ffn_sub_norm != nullptr) {
    rms_norm(a, spec.ffn_sub_norm, B, I, spec.eps, s.up.data());
    mlp_in = s.up.data();
  }
  {
    const int which[1] = {kDown};
    float* outs[1] = {s.y.data()};
    if (!project(spec, which, 1, mlp_in, B, outs, s, level)) return false;
  }
  for (std::size_t i = 0; i < B * H; ++i) h[i] = h[i] + s.y[i];
  return true;
}

}  // namespace r3mes
