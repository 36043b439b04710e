// Decode attention: scores, a numerically stable softmax and the weighted value sum for
// one query token per row, straight from the KV cache (no repeated K/V, no mask tensor).
// The two inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (GCC target_clones); the dot product keeps 16 partial sums so it vectorises
// without reassociating floats.
#include "attention/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/thread_pool.h"

namespace r3mes {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define R3MES_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define R3MES_CLONES
#endif

R3MES_CLONES float dot(const float* a, const float* b, std::size_t n) {
  float acc[16] = {};
  std::size_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

R3MES_CLONES void axpy(float alpha, const float* x, float* y, std::size_t n) {
  for (std::size_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// exp(-87) = 1.6e-38 is the last power of e above FLT_MIN (1.2e-38).
constexpr float kExpFloor = -87.0f;
// A normalised weight this small times any value the cache holds stays below the float
// resolution of a sum whose largest weight is at least 1 / length; skipping it also keeps
// its products out of the subnormal range.
constexpr float kMinWeight = 1e-30f;

}  // namespace

void decode_attention(const float* q, const KvBlocks& kv, const int64_t* start,
                      const int64_t* length, std::size_t batch, std::size_t heads,
                      std::size_t kv_heads, std::size_t head_dim, float scaling, float* out) {
  const std::size_t rep = heads / kv_heads;
  const std::size_t tasks = batch * heads;
  std::size_t longest = 0, total = 0;
  for (std::size_t b = 0; b < batch; ++b) {
    const std::size_t n = static_cast<std::size_t>(std::max<int64_t>(0, length[b]));
    longest = std::max(longest, n);
    total += n;
  }
  // Enough work per task to be worth a hand-off only for long contexts.
  const std::size_t grain = total * heads * head_dim < (1u << 16) ? tasks : 1;
  parallel_for(tasks, grain, [&](std::size_t t0, std::size_t t1) {
    std::vector<float> scores(longest);
    for (std::size_t t = t0; t < t1; ++t) {
      const std::size_t b = t / heads, h = t % heads, g = h / rep;
      const float* qh = q + (b * heads + h) * head_dim;
      float* o = out + (b * heads + h) * head_dim;
      const std::size_t first = static_cast<std::size_t>(std::max<int64_t>(0, start[b]));
      const std::size_t end = static_cast<std::size_t>(std::max<int64_t>(0, length[b]));
      std::fill(o, o + head_dim, 0.0f);
      if (first >= end) continue;  // a fully padded row: zeros, as a masked softmax row
      float best = -INFINITY;
      for (std::size_t s = first; s < end; ++s) {
        scores[s] = dot(qh, kv.k + kv.offset(b, kv_heads, g, s, head_dim), head_dim) * scaling;
        best = std::max(best, scores[s]);
      }
      // A weight below exp(kExpFloor) would be a subnormal float, and subnormal operands
      // take a microcode assist on x86 (~100x slower per operation): a peaked softmax over a
      // long context made every later multiply-add of the value sum one. Such weights are 0
      // here; they differ from exp's result by less than the smallest normal float.
      float sum = 0.0f;
      for (std::size_t s = first; s < end; ++s) {
        const float e = scores[s] - best;
        scores[s] = e < kExpFloor ? 0.0f : std::exp(e);
        sum += scores[s];
      }
      const float inv = 1.0f / sum;
      for (std::size_t s = first; s < end; ++s) {
        const float w = scores[s] * inv;
        if (w >= kMinWeight) axpy(w, kv.v + kv.offset(b, kv_heads, g, s, head_dim), o, head_dim);
      }
    }
  });
}

}  // namespace r3mes
