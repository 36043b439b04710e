// Ternary x int8 GEMM: the scalar reference kernel (the spec every SIMD
// variant must match exactly) and the dispatcher.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/aligned_vector.h"
#include "common/thread_pool.h"
#include "ternary/amx.h"
#include "ternary/ternary.h"

namespace r3mes {

// Work below this (packed weight bytes x tokens) runs on the calling thread.
constexpr std::size_t kInlineBytes = 64 * 1024;
// Row chunks a thread for products of several tokens (see ternary_gemm_multi).
constexpr std::size_t kBatchChunksPerThread = 4;

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
  if (level == SimdLevel::Avx512Vnni) return isa_avx512vnni::ternary_gemm_rows_avx512vnni;
  if (level == SimdLevel::Avx512) return isa_avx512::ternary_gemm_rows_avx512;
  if (level == SimdLevel::Avx2) return isa_avx2::ternary_gemm_rows_avx2;
  return ternary_gemm_rows_scalar;
}

// One task of a ternary_gemm_multi call: a chunk of a product's output rows.
struct Task {
  std::size_t product, n0, n1;
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
  std::vector<AlignedVector<int8_t>> permuted;
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
  // Products of several tokens go to the tile unit (ternary/amx.h); m_pad picks the kernel.
  // Products that share their (permuted) activations share one packed copy too.
  std::vector<std::unique_ptr<int32_t[]>> quads;  // not cleared: the packing writes it all
  if (level == SimdLevel::Avx512Vnni && amx_usable()) {
    quads.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      GemmArgs& g = a[i];
      if (g.M < kAmxMinTokens || g.N == 0) continue;
      const std::size_t kp = padded_k(g.K);
      g.m_pad = amx_token_pad(g.M);
      for (std::size_t j = 0; j < i && g.q_quads == nullptr; ++j)
        if (a[j].q_quads != nullptr && a[j].q == g.q && a[j].K == g.K && a[j].M == g.M)
          g.q_quads = a[j].q_quads;
      if (g.q_quads != nullptr) continue;
      quads.emplace_back(new int32_t[kp / 4 * g.m_pad]);
      isa_amx::amx_pack_activations(g.q, g.M, kp, quads.back().get(), g.m_pad);
      g.q_quads = quads.back().get();  // which also routes this product to the AMX rows
    }
  }
#endif
  // Row chunks of every product, each a multiple of the 4-row tile: one pool hand-off for
  // all of them. A product's prologue tasks are claimed by the workers from inside its
  // chunks (see run_task), not handed out as tasks of their own.
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  std::vector<Task> tasks;
  // next: a product's next unclaimed prologue task. pending: its prologue tasks not yet
  // finished, plus one for its prologue_finish (0 from the start without a prologue); its
  // epilogue may run once it reaches 0.
  std::unique_ptr<std::atomic<std::size_t>[]> next(new std::atomic<std::size_t>[count]);
  std::unique_ptr<std::atomic<std::size_t>[]> pending(new std::atomic<std::size_t>[count]);
  std::size_t total_bytes = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const GemmArgs& g = a[i];
    const bool active = g.M != 0 && g.N != 0;
    const std::size_t pro = active && g.prologue != nullptr ? g.prologue_tasks : 0;
    next[i].store(0, std::memory_order_relaxed);
    pending[i].store(pro == 0 ? 0 : pro + 1, std::memory_order_relaxed);
  }
  for (std::size_t i = 0; i < count; ++i) {
    const GemmArgs& g = a[i];
    if (g.M == 0 || g.N == 0) continue;
    total_bytes += g.N * packed_row_bytes(g.K) * g.M;
    // One chunk a worker for one token: every chunk start costs a stream start-up (and,
    // fused, an epilogue call and an A-pass hand-over). Measured at 2560x6912, 2 threads,
    // against two chunks a worker: the bare GEMV 3-4% faster, the fused 3-expert int8 layer
    // 3% faster. A decode batch is compute-bound and long enough per row that a worker
    // slowed by a neighbour on a shared machine would hold the other one waiting: several
    // chunks a worker, claimed dynamically, balance it.
    const std::size_t chunks = threads * (g.M > 1 ? kBatchChunksPerThread : 1);
    std::size_t grain = (g.N + chunks - 1) / chunks;
    grain = std::max<std::size_t>(16, (grain + 15) / 16 * 16);
    for (std::size_t n0 = 0; n0 < g.N; n0 += grain)
      tasks.push_back({i, n0, std::min(g.N, n0 + grain)});
  }
  constexpr std::size_t kNone = ~std::size_t{0};
  auto claim_prologue = [&](std::size_t i) {
    const GemmArgs& g = a[i];
    if (g.prologue == nullptr || next[i].load(std::memory_order_relaxed) >= g.prologue_tasks)
      return kNone;
    const std::size_t k = next[i].fetch_add(1, std::memory_order_relaxed);
    return k < g.prologue_tasks ? k : kNone;
  };
  auto run_prologue = [&](std::size_t i, std::size_t k) {
    const GemmArgs& g = a[i];
    g.prologue(g.prologue_ctx, k);
    if (pending[i].fetch_sub(1, std::memory_order_acq_rel) == 2) {  // the last
      if (g.prologue_finish != nullptr) g.prologue_finish(g.prologue_ctx);
      pending[i].store(0, std::memory_order_release);
    }
  };
  auto run_task = [&](std::size_t c) {
    const Task& t = tasks[c];
    const GemmArgs& g = a[t.product];
    // A chunk first runs one prologue task of its product, if one is left: with one task a
    // worker (the fused DoRA A pass), each worker's first chunk runs its own, with no pool
    // hand-off of its own. Measured against prologue tasks handed out ahead of the chunks,
    // 6 rows of A each: 1.5-2 points of the fused layer's cost at 2560x6912, 3 int8 experts.
    if (const std::size_t k = claim_prologue(t.product); k != kNone) run_prologue(t.product, k);
#if defined(R3MES_HAVE_AMX)
    if (g.q_quads != nullptr)
      isa_amx::ternary_gemm_rows_amx(g, t.n0, t.n1);
    else
#endif
      rows_fn(g, t.n0, t.n1);
    // Prologue tasks nobody has claimed yet run here: waiting on them could wait on this
    // very thread.
    for (std::size_t k; (k = claim_prologue(t.product)) != kNone;) run_prologue(t.product, k);
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
