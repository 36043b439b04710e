// Decode attention: scores, a numerically stable softmax and the weighted value sum for
// one query token per row, straight from the KV cache (no repeated K/V, no mask tensor).
// One task is a row's kv head with the `rep` query heads that share it (GQA): each key and
// value vector is loaded once for all of them, and their dot products run side by side.
// The two inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (GCC target_clones); the dot product keeps 16 partial sums, summed as a tree,
// so it vectorises without reassociating floats differently from one call to the next.
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

// The cache is read once per step, from memory: a row's positions lie in blocks of a few
// KiB anywhere in the pool, too short a run for the hardware prefetcher to ramp up. Asking
// for the vector a few positions ahead keeps the loads in flight.
constexpr std::size_t kPrefetchPositions = 4;

inline void prefetch_row(const float* row, std::size_t n) {
  for (std::size_t d = 0; d < n; d += 16) __builtin_prefetch(row + d);
}

inline float dot(const float* a, const float* b, std::size_t n) {
  float acc[16] = {};
  std::size_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  float sum = acc[0];
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// scores[j * stride + s] = (q_j . k_s) * scaling for the group's query heads j < rep and
// positions s in [first, end); returns nothing, the maxima are taken by the caller.
R3MES_CLONES void group_scores(const float* q, std::size_t rep, const KvBlocks& kv,
                               std::size_t b, std::size_t kv_heads, std::size_t g,
                               std::size_t first, std::size_t end, std::size_t head_dim,
                               float scaling, float* scores, std::size_t stride) {
  for (std::size_t s = first; s < end; ++s) {
    const float* k = kv.k + kv.offset(b, kv_heads, g, s, head_dim);
    if (s + kPrefetchPositions < end)
      prefetch_row(kv.k + kv.offset(b, kv_heads, g, s + kPrefetchPositions, head_dim), head_dim);
    for (std::size_t j = 0; j < rep; ++j)
      scores[j * stride + s] = dot(q + j * head_dim, k, head_dim) * scaling;
  }
}

// out_j += weights[j * stride + s] * v_s for the weights at or above min_weight.
R3MES_CLONES void group_values(const float* weights, std::size_t rep, const KvBlocks& kv,
                               std::size_t b, std::size_t kv_heads, std::size_t g,
                               std::size_t first, std::size_t end, std::size_t head_dim,
                               float min_weight, float* out, std::size_t stride) {
  for (std::size_t s = first; s < end; ++s) {
    const float* v = kv.v + kv.offset(b, kv_heads, g, s, head_dim);
    if (s + kPrefetchPositions < end)
      prefetch_row(kv.v + kv.offset(b, kv_heads, g, s + kPrefetchPositions, head_dim), head_dim);
    for (std::size_t j = 0; j < rep; ++j) {
      const float w = weights[j * stride + s];
      if (w < min_weight) continue;
      float* o = out + j * head_dim;
      for (std::size_t d = 0; d < head_dim; ++d) o[d] += w * v[d];
    }
  }
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
  const std::size_t tasks = batch * kv_heads;
  std::size_t longest = 0, total = 0;
  for (std::size_t b = 0; b < batch; ++b) {
    const std::size_t n = static_cast<std::size_t>(std::max<int64_t>(0, length[b]));
    longest = std::max(longest, n);
    total += n;
  }
  // Enough work per task to be worth a hand-off only for long contexts.
  const std::size_t grain = total * heads * head_dim < (1u << 16) ? tasks : 1;
  parallel_for(tasks, grain, [&](std::size_t t0, std::size_t t1) {
    std::vector<float> scores(rep * longest);
    for (std::size_t t = t0; t < t1; ++t) {
      const std::size_t b = t / kv_heads, g = t % kv_heads;
      const float* qg = q + (b * heads + g * rep) * head_dim;
      float* o = out + (b * heads + g * rep) * head_dim;
      const std::size_t first = static_cast<std::size_t>(std::max<int64_t>(0, start[b]));
      const std::size_t end = static_cast<std::size_t>(std::max<int64_t>(0, length[b]));
      std::fill(o, o + rep * head_dim, 0.0f);
      if (first >= end) continue;  // a fully padded row: zeros, as a masked softmax row
      group_scores(qg, rep, kv, b, kv_heads, g, first, end, head_dim, scaling, scores.data(),
                   longest);
      // A weight below exp(kExpFloor) would be a subnormal float, and subnormal operands
      // take a microcode assist on x86 (~100x slower per operation): a peaked softmax over a
      // long context made every later multiply-add of the value sum one. Such weights are 0
      // here; they differ from exp's result by less than the smallest normal float.
      for (std::size_t j = 0; j < rep; ++j) {
        float* sc = scores.data() + j * longest;
        float best = -INFINITY;
        for (std::size_t s = first; s < end; ++s) best = std::max(best, sc[s]);
        float sum = 0.0f;
        for (std::size_t s = first; s < end; ++s) {
          const float e = sc[s] - best;
          sc[s] = e < kExpFloor ? 0.0f : std::exp(e);
          sum += sc[s];
        }
        const float inv = 1.0f / sum;
        for (std::size_t s = first; s < end; ++s) sc[s] *= inv;
      }
      group_values(scores.data(), rep, kv, b, kv_heads, g, first, end, head_dim, kMinWeight, o,
                   longest);
    }
  });
}

}  // namespace r3mes
