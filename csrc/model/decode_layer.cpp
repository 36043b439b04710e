#include "model/decode_layer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "attention/decode_attention.h"
#include "common/half.h"
#include "common/target_clones.h"
#include "common/thread_pool.h"
#include "ternary/ternary.h"

namespace r3mes {
namespace {

// y = w * x / sqrt(mean(x^2) + eps) per row, as HF's BitNetRMSNorm (float32 result).
// The mean of squares is accumulated in float64, in 8 interleaved partial sums added as a
// tree (a fixed order, so deterministic, and at least as accurate as torch's float32
// reduction); one running sum was a chain of dependent adds, 4-5 ms of a decode step of 8
// rows of the 2B-4T shape. Cloned (common/target_clones.h): a float squared is exact in
// double, so an FMA leaves the sums as they are.
R3MES_CLONES void rms_norm(const float* x, const float* w, std::size_t rows, std::size_t n,
                           float eps, float* y) {
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
R3MES_CLONES void gated_activation(DecodeActivation activation, float* __restrict gate,
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

// h += y, the residual connection.
R3MES_CLONES void add_into(float* __restrict h, const float* __restrict y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) h[i] += y[i];
}

// A position's key and value (d floats each) into the cache at element offset dst; a half
// cache stores each rounded to nearest even (as torch's .half()).
void store_kv(const KvBlocks& kv, std::size_t dst, const float* k, const float* v,
              std::size_t d) {
  if (kv.type == KvType::F16) {
    auto* kh = static_cast<uint16_t*>(kv.k) + dst;
    auto* vh = static_cast<uint16_t*>(kv.v) + dst;
    for (std::size_t i = 0; i < d; ++i) {
      kh[i] = float_to_half(k[i]);
      vh[i] = float_to_half(v[i]);
    }
    return;
  }
  std::copy(k, k + d, static_cast<float*>(kv.k) + dst);
  std::copy(v, v + d, static_cast<float*>(kv.v) + dst);
}

// Prepares `count` projections of the same input x [B, in], to run in one pool hand-off on
// one quantised copy of x: the first call's, made by quantize_rows (each call's
// quantize_rows makes only what it does not share).
void prepare_projections(const DecodeLayerSpec& spec, const int* which, std::size_t count,
                         const float* x, std::size_t B, float* const* outs,
                         DecodeScratch& scratch, SimdLevel level) {
  for (std::size_t i = 0; i < count; ++i) {
    const DecodeProjection& p = spec.proj[which[i]];
    scratch.calls[which[i]].prepare(
        x, B, p.in, p.packed, p.out, p.w_scale, nullptr, p.adapters, p.mix.data(),
        p.base_w.empty() ? nullptr : p.base_w.data(), p.mix_rows, outs[i], level,
        p.base_factor.empty() ? nullptr : p.base_factor.data(),
        i == 0 ? nullptr : &scratch.calls[which[0]], /*rows_later=*/true);
  }
}

bool quantize_rows(const int* which, std::size_t count, DecodeScratch& scratch,
                   std::size_t r0, std::size_t r1) {
  bool finite = true;
  for (std::size_t i = 0; i < count; ++i)
    finite &= scratch.calls[which[i]].quantize_rows(r0, r1);
  return finite;
}

void run_projections(const int* which, std::size_t count, DecodeScratch& scratch,
                     SimdLevel level) {
  GemmArgs args[kNumProjections];
  for (std::size_t i = 0; i < count; ++i) args[i] = scratch.calls[which[i]].args;
  ternary_gemm_multi(args, count, level);
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
  s.rope.resize(B * D);
  s.lengths.resize(B);

  // The work between products that goes row by row (norms, RoPE, quantising the next
  // product's input) runs with the batch's rows split evenly over the pool's threads
  // (parallel_per_thread): on one thread it was a tenth of a decode step of 8 rows, with the
  // other threads waiting (2B-4T shape, 2 threads). One row runs inline.

  // What the projections' prepare calls read of their adapters, asked for all at once:
  // read one cold line after another (a layer's adapters are touched once a step), they
  // kept the other threads waiting (DoraCall::prepare at 8 rows with 8 int8 experts, 2B-4T
  // shape, 2 threads: 3.5 -> 1.5 ms a step).
  for (const DecodeProjection& p : spec.proj) {
    for (const DoraAdapter* a : p.adapters)
      for (std::size_t off = 0; off < sizeof(DoraAdapter); off += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(a) + off);
    if (!p.mix.empty()) __builtin_prefetch(p.mix.data());
  }
  // ---- attention
  std::atomic<bool> finite{true};
  const int qkv[3] = {kQ, kK, kV};
  float* qkv_out[3] = {s.q.data(), s.k.data(), s.v.data()};
  prepare_projections(spec, qkv, 3, s.x.data(), B, qkv_out, s, level);
  parallel_per_thread(B, [&](std::size_t r0, std::size_t r1) {
    rms_norm(h + r0 * H, spec.input_norm, r1 - r0, H, spec.eps, s.x.data() + r0 * H);
    if (!quantize_rows(qkv, 3, s, r0, r1)) finite = false;
  });
  if (!finite) return false;
  run_projections(qkv, 3, s, level);
  parallel_per_thread(B, [&](std::size_t r0, std::size_t r1) {
    const std::size_t rows = r1 - r0;
    float* tmp = s.rope.data() + r0 * D;
    apply_rope(s.q.data() + r0 * qn, rows, spec.heads, D, cos + r0 * D, sin + r0 * D, tmp);
    apply_rope(s.k.data() + r0 * kvn, rows, spec.kv_heads, D, cos + r0 * D, sin + r0 * D, tmp);
    for (std::size_t b = r0; b < r1; ++b) {
      const std::size_t p = static_cast<std::size_t>(pos[b]);
      s.lengths[b] = pos[b] + 1;
      for (std::size_t g = 0; g < spec.kv_heads; ++g) {
        const std::size_t dst = kv.offset(b, spec.kv_heads, g, p, D);
        const std::size_t src = (b * spec.kv_heads + g) * D;
        store_kv(kv, dst, s.k.data() + src, s.v.data() + src, D);
      }
    }
  });
  decode_attention(s.q.data(), kv, start, s.lengths.data(), B, spec.heads, spec.kv_heads, D,
                   spec.attn_scaling, s.o.data());
  const int o_proj[1] = {kO};
  float* o_out[1] = {s.y.data()};
  const bool attn_norm = spec.attn_sub_norm != nullptr;
  prepare_projections(spec, o_proj, 1, attn_norm ? s.q.data() : s.o.data(), B, o_out, s, level);
  parallel_per_thread(B, [&](std::size_t r0, std::size_t r1) {
    if (attn_norm)
      rms_norm(s.o.data() + r0 * qn, spec.attn_sub_norm, r1 - r0, qn, spec.eps,
               s.q.data() + r0 * qn);
    if (!quantize_rows(o_proj, 1, s, r0, r1)) finite = false;
  });
  if (!finite) return false;
  run_projections(o_proj, 1, s, level);

  // ---- MLP
  const int gate_up[2] = {kGate, kUp};
  float* gate_up_out[2] = {s.gate.data(), s.up.data()};
  prepare_projections(spec, gate_up, 2, s.x.data(), B, gate_up_out, s, level);
  parallel_per_thread(B, [&](std::size_t r0, std::size_t r1) {
    add_into(h + r0 * H, s.y.data() + r0 * H, (r1 - r0) * H);
    rms_norm(h + r0 * H, spec.post_norm, r1 - r0, H, spec.eps, s.x.data() + r0 * H);
    if (!quantize_rows(gate_up, 2, s, r0, r1)) finite = false;
  });
  if (!finite) return false;
  run_projections(gate_up, 2, s, level);
  const int down[1] = {kDown};
  float* down_out[1] = {s.y.data()};
  const bool ffn_norm = spec.ffn_sub_norm != nullptr;
  prepare_projections(spec, down, 1, ffn_norm ? s.up.data() : s.gate.data(), B, down_out, s,
                      level);
  parallel_per_thread(B, [&](std::size_t r0, std::size_t r1) {
    float* a = s.gate.data() + r0 * I;
    gated_activation(spec.activation, a, s.up.data() + r0 * I, (r1 - r0) * I);
    if (ffn_norm) rms_norm(a, spec.ffn_sub_norm, r1 - r0, I, spec.eps, s.up.data() + r0 * I);
    if (!quantize_rows(down, 1, s, r0, r1)) finite = false;
  });
  if (!finite) return false;
  run_projections(down, 1, s, level);
  parallel_per_thread(B, [&](std::size_t r0, std::size_t r1) {
    add_into(h + r0 * H, s.y.data() + r0 * H, (r1 - r0) * H);
  });
  return true;
}

}  // namespace r3mes
