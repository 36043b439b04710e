// Ternary x int8 GEMM: the scalar reference kernel (the spec every SIMD
// variant must match exactly) and the dispatcher.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/thread_pool.h"
#include "ternary/amx.h"
#include "ternary/ternary.h"

namespace r3mes {

// Work below this (packed weight bytes x tokens) runs on the calling thread.
constexpr std::size_t kInlineBytes = 64 * 1024;

void ternary_gemm_rows_scalar(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = padded_k(a.K);
  const std::size_t row_bytes = packed_row_bytes(a.K);
  std::vector<int8_t> t(a.K);
  for (std::size_t n = n0; n < n1; ++n) {
    unpack_ternary(a.packed + n * row_bytes, 1, a.K, t.data());
    for (std::size_t m = 0; m < a.M; ++m) {
      const int8_t* q = a.q + m * kp;
      int32_t acc = 0;
      for (std::size_t k = 0; k < a.K; ++k) acc += static_cast<int32_t>(t[k]) * q[k];
      store_output(a, m, n, acc);
    }
  }
}

namespace {

GemmRowsFn rows_fn_for(SimdLevel level) {
  if (level == SimdLevel::Avx512Vnni) return ternary_gemm_rows_avx512vnni;
  if (level == SimdLevel::Avx512) return ternary_gemm_rows_avx512;
  if (level == SimdLevel::Avx2) return ternary_gemm_rows_avx2;
  return ternary_gemm_rows_scalar;
}

// One task of a ternary_gemm_multi call: a prologue task of a product, or a chunk of
// its output rows.
struct Task {
  std::size_t product, n0, n1;
  bool prologue;
};

inline void relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

}  // namespace

void ternary_gemm(const GemmArgs& args, SimdLevel level) { ternary_gemm_multi(&args, 1, level); }

void ternary_gemm_multi(const GemmArgs* products, std::size_t count, SimdLevel level) {
  const GemmRowsFn rows_fn = rows_fn_for(level);
  std::vector<GemmArgs> a(products, products + count);
  // AVX-512 decodes a whole 256-group per register; reorder the (small) activations
  // once instead of shuffling every weight register. Products that share their
  // activations (q, k and v of one token) share the reordered copy.
  std::vector<std::vector<int8_t>> permuted;
  if (level >= SimdLevel::Avx512) {
    std::vector<const int8_t*> originals;
    permuted.reserve(count);
    for (auto& g : a) {
      if (g.M == 0 || g.N == 0) continue;
      const std::size_t kp = padded_k(g.K);
      std::size_t found = originals.size();
      for (std::size_t i = 0; i < originals.size(); ++i)
        if (originals[i] == g.q && permuted[i].size() == g.M * kp) found = i;
      if (found == originals.size()) {
        originals.push_back(g.q);
        permuted.emplace_back(g.M * kp);
        for (std::size_t m = 0; m < g.M; ++m)
          permute_activations_g256(g.q + m * kp, permuted.back().data() + m * kp, kp);
      }
      g.q = permuted[found].data();
    }
  }
#if defined(R3MES_HAVE_AMX)
  // Prefill: products with enough tokens go to the tile unit (ternary/amx.h).
  std::vector<std::vector<int32_t>> quads;
  if (level == SimdLevel::Avx512Vnni && amx_usable()) {
    quads.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      GemmArgs& g = a[i];
      if (g.M < kAmxMinTokens || g.N == 0) continue;
      const std::size_t kp = padded_k(g.K);
      g.m_pad = (g.M + kAmxTokenBlock - 1) / kAmxTokenBlock * kAmxTokenBlock;
      quads.emplace_back(kp / 4 * g.m_pad);
      amx_pack_activations(g.q, g.M, kp, quads.back().data(), g.m_pad);
      g.q_quads = quads.back().data();  // which also routes this product to the AMX rows
    }
  }
#endif
  // Prologue tasks first (claimed in order, so before any row chunk), then chunks of
  // every product, each a multiple of the 4-row tile and small enough to balance the
  // threads: one pool hand-off for all of them.
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  std::vector<Task> tasks;
  // pending: a product's prologue tasks not yet finished, plus one for its prologue_finish
  // (0 from the start without a prologue); its epilogue may run once it reaches 0.
  std::unique_ptr<std::atomic<std::size_t>[]> pending(new std::atomic<std::size_t>[count]);
  std::size_t total_bytes = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const GemmArgs& g = a[i];
    const bool active = g.M != 0 && g.N != 0;
    const std::size_t pro = active && g.prologue != nullptr ? g.prologue_tasks : 0;
    pending[i].store(pro == 0 ? 0 : pro + 1, std::memory_order_relaxed);
    for (std::size_t t = 0; t < pro; ++t) tasks.push_back({i, t, t + 1, true});
  }
  for (std::size_t i = 0; i < count; ++i) {
    const GemmArgs& g = a[i];
    if (g.M == 0 || g.N == 0) continue;
    total_bytes += g.N * packed_row_bytes(g.K) * g.M;
    // Two chunks a thread: enough to balance a worker that started late, few enough that a
    // fused DoRA epilogue (run at each chunk's end, between two weight streams) rarely
    // breaks the stream. Measured at 2560x6912, 2 threads, 3 int8 experts (ratio to the
    // bare GEMV): 8 chunks a thread 1.34, 4 chunks 1.28, 2 chunks 1.23, 1 chunk 1.25;
    // the bare GEMV itself is 2-3% faster with 2 than with 4.
    std::size_t grain = (g.N + threads * 2 - 1) / (threads * 2);
    grain = std::max<std::size_t>(16, (grain + 15) / 16 * 16);
    for (std::size_t n0 = 0; n0 < g.N; n0 += grain)
      tasks.push_back({i, n0, std::min(g.N, n0 + grain), false});
  }
  auto run_task = [&](std::size_t c) {
    const Task& t = tasks[c];
    const GemmArgs& g = a[t.product];
    if (t.prologue) {
      g.prologue(g.prologue_ctx, t.n0);
      if (pending[t.product].fetch_sub(1, std::memory_order_acq_rel) == 2) {  // the last
        if (g.prologue_finish != nullptr) g.prologue_finish(g.prologue_ctx);
        pending[t.product].store(0, std::memory_order_release);
      }
      return;
    }
#if defined(R3MES_HAVE_AMX)
    if (g.q_quads != nullptr)
      ternary_gemm_rows_amx(g, t.n0, t.n1);
    else
#endif
      rows_fn(g, t.n0, t.n1);
    // The epilogue runs once per chunk, after it. Running it every few dozen rows inside
    // the chunk instead (its reads joining the weight stream) measured slower: 1.24 -> 1.32
    // to 1.42 of the bare GEMV at 2560x6912 with 3 int8 experts, for blocks of 864 to 16.
    if (g.epilogue != nullptr) {
      while (pending[t.product].load(std::memory_order_acquire) != 0) relax();
      g.epilogue(g.epilogue_ctx, t.n0, t.n1);
    }
  };
  // Small products finish before a second thread could start: run them inline.
  if (total_bytes < kInlineBytes || tasks.size() == 1) {
    for (std::size_t c = 0; c < tasks.size(); ++c) run_task(c);
    return;
  }
  parallel_for(tasks.size(), 1, [&](std::size_t c0, std::size_t c1) {
    for (std::size_t c = c0; c < c1; ++c) run_task(c);
  });
}

}  // namespace r3mes
