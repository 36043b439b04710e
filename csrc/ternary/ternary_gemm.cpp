// Ternary x int8 GEMM: the scalar reference kernel (the spec every SIMD
// variant must match exactly) and the dispatcher.
#include <algorithm>
#include <vector>

#include "common/thread_pool.h"
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

void ternary_gemm(const GemmArgs& args, SimdLevel level) {
  if (args.M == 0 || args.N == 0) return;
  GemmRowsFn rows_fn = ternary_gemm_rows_scalar;
  GemmArgs a = args;
  std::vector<int8_t> permuted;
  const std::size_t kp = padded_k(a.K);
  if (level >= SimdLevel::Avx512) {
    // AVX-512 decodes a whole 256-group per register; reorder the (small)
    // activations once instead of shuffling every weight register.
    permuted.resize(a.M * kp);
    for (std::size_t m = 0; m < a.M; ++m)
      permute_activations_g256(a.q + m * kp, permuted.data() + m * kp, kp);
    a.q = permuted.data();
    rows_fn = level == SimdLevel::Avx512Vnni ? ternary_gemm_rows_avx512vnni
                                             : ternary_gemm_rows_avx512;
  } else if (level == SimdLevel::Avx2) {
    rows_fn = ternary_gemm_rows_avx2;
  }
  // Enough chunks to balance the threads, each a multiple of the 4-row tile.
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  std::size_t grain = (a.N + threads * 4 - 1) / (threads * 4);
  grain = std::max<std::size_t>(16, (grain + 15) / 16 * 16);
  // Small products finish before a second thread could start: run them inline.
  if (a.N * packed_row_bytes(a.K) * a.M < kInlineBytes) grain = a.N;
  parallel_for(a.N, grain, [&](std::size_t n0, std::size_t n1) {
    rows_fn(a, n0, n1);
    if (a.epilogue != nullptr) a.epilogue(a.epilogue_ctx, n0, n1);
  });
}

}  // namespace r3mes
