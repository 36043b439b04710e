// Decode attention: scores, a numerically stable softmax and the weighted value sum for
// one query token per row, straight from the KV cache (no repeated K/V, no mask tensor).
//
// Work is split into tasks of one row's kv head (with the `rep` query heads that share it,
// GQA) over one chunk of kChunk positions: each key and value vector is loaded once for all
// of the group's query heads, and a long context is spread over every thread even for one
// row. A chunk keeps its own softmax maximum and sum; the chunks of a head are merged in
// chunk order by whichever task finishes last. Chunk boundaries are fixed positions of the
// row, so the result depends neither on the thread count, nor on the other rows of the call,
// nor on how the positions lie in blocks.
//
// The cache is read once a step and is memory-bound: the loops keep the loads in flight
// (keys and values prefetched kPrefetch positions ahead, the values while the scores run),
// and the arithmetic stays off the critical path: per position, one independent dot product
// a query head; per 16 positions, one transposed tree reduction of their 16 partial-sum
// vectors (the same pairwise tree as summing each vector alone); the value sum accumulates
// in registers, 64 dimensions a pass. The loops are written with GCC vector extensions and
// compiled for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and the baseline, picked at load time
// (target_clones).
#include "attention/decode_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include <immintrin.h>

#include "common/half.h"
#include "common/target_clones.h"
#include "common/thread_pool.h"
// 64-byte vectors are returned from inline helpers only (always inlined into the clones),
// so the ABI note GCC gives for them when AVX-512 is off does not apply (here and in
// vector_math.h's helpers, hence before it).
#pragma GCC diagnostic ignored "-Wpsabi"
#include "common/vector_math.h"

namespace r3mes {
namespace {

// Positions a task. Fixed (not derived from the thread count) so that results are too.
constexpr std::size_t kChunk = 128;
// The block table of a widened chunk (one block).
constexpr int32_t kZeroBlock = 0;
// A row's positions lie in blocks of a few KiB anywhere in the pool: too short a run for
// the hardware prefetcher to ramp up. 8 positions (4 KiB of keys and values) keep enough
// loads in flight to stream at the memory's rate.
constexpr std::size_t kPrefetch = 8;
// A weight below e^-69 (1e-30) of its chunk's largest is dropped (made 0): its products with
// any value the cache holds are below the float resolution of the sum, and near or inside
// the subnormal range, where every multiply-add takes a microcode assist on x86 (~100x
// slower): a peaked softmax over a long context made every later value sum one.
constexpr float kWeightFloor = -69.0f;

#define R3MES_INLINE inline __attribute__((always_inline))
using v16 = float __attribute__((vector_size(64)));
using v16i = int __attribute__((vector_size(64)));

R3MES_INLINE v16 load16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

R3MES_INLINE void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// Whether the clone that runs has 32 vector registers of 16 floats (AVX-512) or 16 of 8
// (AVX2, and the baseline's 16 of 4): a 16-float vector takes two registers there, and the
// loops block fewer heads and dimensions at once so that their accumulators stay in
// registers (blocked 4 x 4 as for AVX-512, half of the AVX2 clone's instructions were
// spills). The blocking changes no result: each lane sums the same terms in the same order.
R3MES_INLINE bool wide_registers() {
  static const bool wide = __builtin_cpu_supports("avx512f");
  return wide;
}

// The horizontal sum of one vector as the tree (j, j+8), (j, j+4), (j, j+2), (j, j+1).
R3MES_INLINE float tree_sum(v16 a) {
  float part[16];
  std::memcpy(part, &a, sizeof part);
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

// out[i] = tree_sum(vector i of acc) for 16 vectors at once (acc: [16][16]): each level adds
// the halves of two vectors' partial sums side by side, so the sums are the same pairs as
// tree_sum's.
R3MES_INLINE v16 tree_sum16(const float* acc_rows) {
  v16 acc[16], t[8], u[4], x[2];
  for (int i = 0; i < 16; ++i) acc[i] = load16(acc_rows + 16 * i);
  for (int i = 0; i < 8; ++i)
    t[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1],
                             v16i{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(acc[2 * i], acc[2 * i + 1],
                             v16i{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int i = 0; i < 4; ++i)
    u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1],
                             v16i{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(t[2 * i], t[2 * i + 1],
                             v16i{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int i = 0; i < 2; ++i)
    x[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1],
                             v16i{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(u[2 * i], u[2 * i + 1],
                             v16i{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(x[0], x[1],
                           v16i{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(x[0], x[1],
                           v16i{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

// Walks one row's kv head through its positions, block by block, without a division a step.
struct HeadCursor {
  const KvBlocks& kv;
  std::size_t b, kv_heads, g, head_dim;
  std::size_t block = 0, in = 0;
  std::size_t base = 0;  // offset of the current block's first position of head g

  HeadCursor(const KvBlocks& kv, std::size_t b, std::size_t kv_heads, std::size_t g,
             std::size_t head_dim, std::size_t s)
      : kv(kv), b(b), kv_heads(kv_heads), g(g), head_dim(head_dim),
        block(s / kv.block_size), in(s % kv.block_size) {
    locate();
  }
  void locate() { base = kv.offset(b, kv_heads, g, block * kv.block_size, head_dim); }
  std::size_t offset() const { return base + in * head_dim; }
  // Moves to the next position; `more`: it exists (the table is read only for those).
  void next(bool more) {
    if (++in == kv.block_size) {
      in = 0;
      ++block;
      if (more) locate();
    }
  }
};

// The n elements of a cache row (64 bytes a prefetch).
R3MES_INLINE void prefetch_row(const float* row, std::size_t n, int locality) {
  for (std::size_t d = 0; d < n; d += 16) {
    if (locality == 3)
      __builtin_prefetch(row + d, 0, 3);
    else
      __builtin_prefetch(row + d, 0, 2);
  }
}

// Partial-sum vectors of q_j . k for R query heads and two keys (a and b): 2R independent
// chains of multiply-adds, enough to keep both FMA pipes busy. acc: [R][16][16] rows of
// 16 lanes, position i of the block at row i.
template <int R>
R3MES_INLINE void dot_pair(const float* q, std::size_t head_dim, const float* ka,
                           const float* kb, float* acc, std::size_t i, bool two) {
  const std::size_t nv = head_dim / 16;
  v16 a[R] = {}, b[R] = {};
  for (std::size_t v = 0; v < nv; ++v) {
    const v16 xa = load16(ka + 16 * v), xb = load16(kb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const v16 qv = load16(q + r * head_dim + 16 * v);
      a[r] += qv * xa;
      b[r] += qv * xb;
    }
  }
  for (int r = 0; r < R; ++r) {
    store16(acc + (r * 16 + i) * 16, a[r]);
    if (two) store16(acc + (r * 16 + i + 1) * 16, b[r]);
  }
}

// scores[j * kChunk + i] = (q_j . k_{s0+i}) * scaling for the group's query heads j < rep
// and positions [s0, s1). Prefetches keys (to L1) and values (to L2) kPrefetch ahead.
template <bool Wide>
R3MES_INLINE void chunk_scores_of(const float* q, std::size_t rep, const KvBlocks& kv,
                                  std::size_t b, std::size_t kv_heads, std::size_t g,
                                  std::size_t s0, std::size_t s1, std::size_t head_dim,
                                  float scaling, float* scores, float* acc) {
  const std::size_t tail = head_dim / 16 * 16;
  const float* const k_base = static_cast<const float*>(kv.k);
  HeadCursor at(kv, b, kv_heads, g, head_dim, s0);
  HeadCursor ahead(kv, b, kv_heads, g, head_dim, s0);
  auto prefetch_ahead = [&](std::size_t p) {  // p: the position `ahead` is at
    prefetch_row(k_base + ahead.offset(), head_dim, 3);
    prefetch_row(static_cast<const float*>(kv.v) + ahead.offset(), head_dim, 2);
    ahead.next(p + 1 < s1);
  };
  for (std::size_t p = s0; p < std::min(s1, s0 + kPrefetch); ++p) prefetch_ahead(p);
  for (std::size_t s = s0; s < s1; s += 16) {
    const std::size_t n = std::min<std::size_t>(16, s1 - s);
    for (std::size_t i = 0; i < n; i += 2) {
      const bool two = i + 1 < n;
      const float* ka = k_base + at.offset();
      at.next(s + i + 1 < s1);
      const float* kb = ka;  // an odd last position is computed twice, stored once
      if (two) {
        kb = k_base + at.offset();
        at.next(s + i + 2 < s1);
      }
      for (std::size_t p = s + i + kPrefetch; p < std::min(s1, s + i + 2 + kPrefetch); ++p)
        prefetch_ahead(p);
      std::size_t j = 0;
      for (; Wide && j + 4 <= rep; j += 4)
        dot_pair<4>(q + j * head_dim, head_dim, ka, kb, acc + j * 256, i, two);
      for (; !Wide && j + 2 <= rep; j += 2)
        dot_pair<2>(q + j * head_dim, head_dim, ka, kb, acc + j * 256, i, two);
      for (; j < rep; ++j) dot_pair<1>(q + j * head_dim, head_dim, ka, kb, acc + j * 256, i, two);
      for (j = 0; tail < head_dim && j < rep; ++j) {
        const float* qj = q + j * head_dim;
        for (std::size_t t = 0; t < (two ? 2u : 1u); ++t) {
          const float* k = t == 0 ? ka : kb;
          float rest = 0.0f;
          for (std::size_t d = tail; d < head_dim; ++d) rest += qj[d] * k[d];
          scores[j * kChunk + (s - s0) + i + t] = rest;
        }
      }
    }
    for (std::size_t j = 0; j < rep; ++j) {
      float* sc = scores + j * kChunk + (s - s0);
      if (tail == head_dim) std::fill(sc, sc + n, 0.0f);
      if (n == 16) {
        store16(sc, (tree_sum16(acc + j * 256) + load16(sc)) * scaling);
      } else {
        for (std::size_t i = 0; i < n; ++i)
          sc[i] = (tree_sum(load16(acc + (j * 16 + i) * 16)) + sc[i]) * scaling;
      }
    }
  }
}

R3MES_CLONES void chunk_scores(const float* q, std::size_t rep, const KvBlocks& kv,
                               std::size_t b, std::size_t kv_heads, std::size_t g,
                               std::size_t s0, std::size_t s1, std::size_t head_dim,
                               float scaling, float* scores, float* acc /* [rep][16][16] */) {
  if (wide_registers())
    chunk_scores_of<true>(q, rep, kv, b, kv_heads, g, s0, s1, head_dim, scaling, scores, acc);
  else
    chunk_scores_of<false>(q, rep, kv, b, kv_heads, g, s0, s1, head_dim, scaling, scores, acc);
}

// The chunk's scores of each query head become weights exp(s - max), 0 below kWeightFloor,
// normalised to sum 1 when `normalise`; best[j] and sum[j] get the head's max and sum.
R3MES_CLONES void chunk_softmax(float* scores, std::size_t rep, std::size_t n, bool normalise,
                                float* best, float* sum) {
  const std::size_t padded = (n + 15) / 16 * 16;  // kChunk is a multiple of 16
  const v16 floor = splat<v16>(kWeightFloor), zero{};
  for (std::size_t j = 0; j < rep; ++j) {
    float* sc = scores + j * kChunk;
    std::fill(sc + n, sc + padded, -INFINITY);  // weight 0
    v16 top = splat<v16>(-INFINITY);
    for (std::size_t i = 0; i < padded; i += 16) top = vmax(top, load16(sc + i));
    float m = top[0];
    for (int l = 1; l < 16; ++l) m = std::max(m, top[l]);
    v16 total{};
    for (std::size_t i = 0; i < padded; i += 16) {
      const v16 e = load16(sc + i) - m;
      const v16 w = e < floor ? zero : exp_nonpositive(e);
      store16(sc + i, w);
      total += w;
    }
    const float t = tree_sum(total);
    if (normalise) {
      const float inv = 1.0f / t;
      for (std::size_t i = 0; i < padded; i += 16) store16(sc + i, load16(sc + i) * inv);
    }
    best[j] = m;
    sum[j] = t;
  }
}

// o[r * head_dim + d] = sum_i weights[r * kChunk + i] * v_{s0+i}[d] for R query heads,
// C vectors (16 C dimensions) a pass over the positions.
template <int R, int C>
R3MES_INLINE void chunk_values_heads(const float* weights, const KvBlocks& kv, std::size_t b,
                                     std::size_t kv_heads, std::size_t g, std::size_t s0,
                                     std::size_t s1, std::size_t head_dim, float* o) {
  const std::size_t nv = head_dim / 16;
  for (std::size_t v0 = 0; v0 < nv; v0 += C) {
    const std::size_t nb = std::min<std::size_t>(C, nv - v0);
    v16 acc[R][C] = {};
    HeadCursor at(kv, b, kv_heads, g, head_dim, s0);
    for (std::size_t s = s0; s < s1; ++s) {
      const float* v = static_cast<const float*>(kv.v) + at.offset() + 16 * v0;
      at.next(s + 1 < s1);
      v16 x[C] = {};
      for (std::size_t c = 0; c < C; ++c)
        if (c < nb) x[c] = load16(v + 16 * c);
      for (int r = 0; r < R; ++r) {
        const float w = weights[r * kChunk + (s - s0)];
        for (std::size_t c = 0; c < C; ++c)
          if (c < nb) acc[r][c] += w * x[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (std::size_t c = 0; c < nb; ++c) store16(o + r * head_dim + 16 * (v0 + c), acc[r][c]);
  }
  if (nv * 16 < head_dim) {
    for (int r = 0; r < R; ++r) std::fill(o + r * head_dim + nv * 16, o + (r + 1) * head_dim, 0.f);
    HeadCursor at(kv, b, kv_heads, g, head_dim, s0);
    for (std::size_t s = s0; s < s1; ++s) {
      const float* v = static_cast<const float*>(kv.v) + at.offset();
      at.next(s + 1 < s1);
      for (int r = 0; r < R; ++r) {
        const float w = weights[r * kChunk + (s - s0)];
        for (std::size_t d = nv * 16; d < head_dim; ++d) o[r * head_dim + d] += w * v[d];
      }
    }
  }
}

template <int C>
R3MES_INLINE void chunk_values_of(const float* weights, std::size_t rep, const KvBlocks& kv,
                                  std::size_t b, std::size_t kv_heads, std::size_t g,
                                  std::size_t s0, std::size_t s1, std::size_t head_dim,
                                  float* o) {
  std::size_t j = 0;
  for (; j + 4 <= rep; j += 4)
    chunk_values_heads<4, C>(weights + j * kChunk, kv, b, kv_heads, g, s0, s1, head_dim,
                             o + j * head_dim);
  if (j + 2 <= rep) {
    chunk_values_heads<2, C>(weights + j * kChunk, kv, b, kv_heads, g, s0, s1, head_dim,
                             o + j * head_dim);
    j += 2;
  }
  if (j < rep)
    chunk_values_heads<1, C>(weights + j * kChunk, kv, b, kv_heads, g, s0, s1, head_dim,
                             o + j * head_dim);
}

R3MES_CLONES void chunk_values(const float* weights, std::size_t rep, const KvBlocks& kv,
                               std::size_t b, std::size_t kv_heads, std::size_t g,
                               std::size_t s0, std::size_t s1, std::size_t head_dim, float* o) {
  if (wide_registers())
    chunk_values_of<4>(weights, rep, kv, b, kv_heads, g, s0, s1, head_dim, o);
  else
    chunk_values_of<1>(weights, rep, kv, b, kv_heads, g, s0, s1, head_dim, o);
}

// A half cache's keys and values are widened (exactly) a task at a time into float rows
// that stay in L2, and the float kernels run on those: a conversion instruction per 8 or
// 16 halves (F16C, AVX-512) where widening inside the loops in integer ops had made the
// AVX2 clone compute-bound at ~1 GB/s of cache.
void widen_scalar(const uint16_t* h, std::size_t n, float* f) {
  for (std::size_t i = 0; i < n; ++i) f[i] = half_to_float(h[i]);
}

__attribute__((target("avx512f"))) void widen_avx512(const uint16_t* h, std::size_t n,
                                                     float* f) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                reinterpret_cast<const __m256i*>(h + i))));
  widen_scalar(h + i, n - i, f + i);
}

__attribute__((target("avx,f16c"))) void widen_f16c(const uint16_t* h, std::size_t n,
                                                    float* f) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  widen_scalar(h + i, n - i, f + i);
}

using WidenFn = void (*)(const uint16_t*, std::size_t, float*);

WidenFn widen_fn() {
  static const WidenFn fn = __builtin_cpu_supports("avx512f") ? widen_avx512
                            : __builtin_cpu_supports("f16c")  ? widen_f16c
                                                              : widen_scalar;
  return fn;
}

// Positions [s0, s1) of row b's kv head g of a half cache, widened into k and v
// [s1 - s0, head_dim], and the one-block float cache that holds them (its table: *zero).
KvBlocks widen_chunk(const KvBlocks& kv, std::size_t b, std::size_t kv_heads, std::size_t g,
                     std::size_t s0, std::size_t s1, std::size_t head_dim, float* k, float* v,
                     const int32_t* zero) {
  const WidenFn widen = widen_fn();
  const auto* hk = static_cast<const uint16_t*>(kv.k);
  const auto* hv = static_cast<const uint16_t*>(kv.v);
  for (std::size_t s = s0; s < s1;) {  // a run of positions inside one block at a time
    const std::size_t run = std::min(kv.block_size - s % kv.block_size, s1 - s);
    const std::size_t from = kv.offset(b, kv_heads, g, s, head_dim);
    const std::size_t to = (s - s0) * head_dim;
    widen(hk + from, run * head_dim, k + to);
    widen(hv + from, run * head_dim, v + to);
    s += run;
  }
  KvBlocks local;
  local.k = k;
  local.v = v;
  local.block_size = kChunk;
  local.max_blocks = 1;
  local.table = zero;
  return local;
}

// One task: positions [s0, s1) of row b's kv head g.
struct Task {
  std::size_t b, g, s0, s1;
  std::size_t head;  // b * kv_heads + g
  std::size_t chunk;  // index of this chunk within its head
};

}  // namespace

void decode_attention(const float* q, const KvBlocks& kv, const int64_t* start,
                      const int64_t* length, std::size_t batch, std::size_t heads,
                      std::size_t kv_heads, std::size_t head_dim, float scaling, float* out) {
  const std::size_t rep = heads / kv_heads;
  std::vector<Task> tasks;
  std::vector<std::size_t> chunks(batch * kv_heads, 0), first_task(batch * kv_heads, 0);
  std::size_t total = 0;
  for (std::size_t b = 0; b < batch; ++b) {
    const std::size_t first = static_cast<std::size_t>(std::max<int64_t>(0, start[b]));
    const std::size_t end = static_cast<std::size_t>(std::max<int64_t>(0, length[b]));
    for (std::size_t g = 0; g < kv_heads; ++g) {
      const std::size_t head = b * kv_heads + g;
      // A fully padded row: zeros, as a masked softmax row.
      std::fill(out + (b * heads + g * rep) * head_dim,
                out + (b * heads + (g + 1) * rep) * head_dim, 0.0f);
      first_task[head] = tasks.size();
      for (std::size_t s0 = first, c = 0; s0 < end; s0 += kChunk, ++c) {
        tasks.push_back({b, g, s0, std::min(end, s0 + kChunk), head, c});
        ++chunks[head];
      }
      if (first < end) total += end - first;
    }
  }
  if (tasks.empty()) return;
  // Per task: its chunk's maxima, sums and unnormalised value sums ([rep][2 + head_dim]), for
  // heads of more than one chunk; the last of a head's chunks to finish merges them.
  const std::size_t part_size = rep * (2 + head_dim);
  thread_local std::vector<float> partials;
  if (partials.size() < tasks.size() * part_size) partials.resize(tasks.size() * part_size);
  std::unique_ptr<std::atomic<std::size_t>[]> left(new std::atomic<std::size_t>[chunks.size()]);
  for (std::size_t h = 0; h < chunks.size(); ++h)
    left[h].store(chunks[h], std::memory_order_relaxed);
  float* const part_base = partials.data();

  auto merge = [&](std::size_t head) {
    const std::size_t b = head / kv_heads, g = head % kv_heads;
    float* o = out + (b * heads + g * rep) * head_dim;
    const std::size_t t0 = first_task[head], n = chunks[head];
    for (std::size_t j = 0; j < rep; ++j) {
      float best = -INFINITY;
      for (std::size_t c = 0; c < n; ++c)
        best = std::max(best, part_base[(t0 + c) * part_size + j * (2 + head_dim)]);
      float sum = 0.0f;
      float* oj = o + j * head_dim;
      for (std::size_t c = 0; c < n; ++c) {
        const float* p = part_base + (t0 + c) * part_size + j * (2 + head_dim);
        const float e = p[0] - best;
        if (e < kWeightFloor) continue;
        const float f = std::exp(e);
        sum += f * p[1];
        for (std::size_t d = 0; d < head_dim; ++d) oj[d] += f * p[2 + d];
      }
      const float inv = 1.0f / sum;
      for (std::size_t d = 0; d < head_dim; ++d) oj[d] *= inv;
    }
  };

  auto run = [&](std::size_t t0, std::size_t t1) {
    thread_local std::vector<float> scores;
    thread_local std::vector<float> acc;
    thread_local std::vector<float> values;
    thread_local std::vector<float> stats;  // [2][rep]: each head's max and sum
    thread_local std::vector<float> widened_k, widened_v;  // a half cache's chunk
    if (kv.type == KvType::F16) {
      widened_k.resize(kChunk * head_dim);
      widened_v.resize(kChunk * head_dim);
    }
    scores.resize(rep * kChunk);
    acc.resize(rep * 256);
    values.resize(rep * head_dim);
    stats.resize(2 * rep);
    for (std::size_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const std::size_t n = task.s1 - task.s0;
      const float* qg = q + (task.b * heads + task.g * rep) * head_dim;
      // A half cache's chunk: row 0, head 0, positions [0, n) of its widened copy.
      KvBlocks src = kv;
      std::size_t b = task.b, kv_heads_of = kv_heads, g = task.g, s0 = task.s0, s1 = task.s1;
      if (kv.type == KvType::F16) {
        src = widen_chunk(kv, b, kv_heads, g, s0, s1, head_dim, widened_k.data(),
                          widened_v.data(), &kZeroBlock);
        b = g = s0 = 0;
        kv_heads_of = 1;
        s1 = n;
      }
      chunk_scores(qg, rep, src, b, kv_heads_of, g, s0, s1, head_dim, scaling, scores.data(),
                   acc.data());
      const bool alone = chunks[task.head] == 1;
      float* part = part_base + t * part_size;
      chunk_softmax(scores.data(), rep, n, alone, stats.data(), stats.data() + rep);
      for (std::size_t j = 0; !alone && j < rep; ++j) {
        part[j * (2 + head_dim)] = stats[j];
        part[j * (2 + head_dim) + 1] = stats[rep + j];
      }
      float* o = out + (task.b * heads + task.g * rep) * head_dim;
      chunk_values(scores.data(), rep, src, b, kv_heads_of, g, s0, s1, head_dim,
                   alone ? o : values.data());
      if (alone) continue;
      for (std::size_t j = 0; j < rep; ++j)
        std::copy(values.data() + j * head_dim, values.data() + (j + 1) * head_dim,
                  part + j * (2 + head_dim) + 2);
      if (left[task.head].fetch_sub(1, std::memory_order_acq_rel) == 1) merge(task.head);
    }
  };
  // Enough work per task to be worth a hand-off only for long contexts.
  const std::size_t grain = total * heads * head_dim < (1u << 16) ? tasks.size() : 1;
  parallel_for(tasks.size(), grain, run);
}

}  // namespace r3mes
