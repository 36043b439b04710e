// Ternary x int8 GEMM for prefill and batches on the int8 tensor cores
// (mma.sync.m16n8k32.s32.s8.s8.s32: sm_80 and sm_90), and the dispatcher
// between it and the dp4a GEMV.
//
// Work split
// ----------
// A block is 4 warps = 64 output rows x 32 tokens; a warp computes 16 rows x
// 32 tokens (4 mma tiles of 16 x 8) with int32 accumulators in registers
// (exact). K is walked one 64-weight chunk at a time, two mma k-steps a chunk.
// The k permutation of fragments.h lets each lane read, per chunk, one aligned
// 32-bit weight word for each of its 2 rows (a quad of lanes reads one whole
// 16-byte chunk) and one aligned 16-byte activation vector per token tile,
// straight from global memory through the read-only cache; the codes are
// decoded into A fragments with a shift and a mask. Accumulators hold
// sum_k c_k q_k; the epilogue subtracts qsum (layout.h).
//
// This is the straightforward tensor-core kernel (no shared-memory staging, no
// cp.async pipeline, no wgmma); see the report of the CUDA issue for what is
// left to tune on a GPU.
//
// Invariants: rows past N and tokens past M are clamped for loading (in
// bounds) and never stored.
#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/epilogue.cuh"
#include "cuda/fragments.h"
#include "cuda/gemm_launch.h"
#include "cuda/layout.h"

namespace r3mes::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTokenTiles = 4;                  // 8 tokens each
constexpr int kBlockRows = 16 * kWarps;         // 64
constexpr int kBlockTokens = 8 * kTokenTiles;   // 32

struct MmaParams {
  const uint32_t* w;  // [N, 4 * cpr] words
  std::int64_t cpr;
  const int8_t* q;    // [M, kp]
  std::int64_t kp;
  EpilogueArgs ep;
};

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // built only for sm_80 and newer (CMAKE_CUDA_ARCHITECTURES)
#endif
}

__global__ void __launch_bounds__(kThreads, 1) ternary_gemm_mma_kernel(const MmaParams p) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const std::int64_t nb = static_cast<std::int64_t>(blockIdx.x) * kBlockRows + 16 * (threadIdx.x >> 5);
  if (nb >= p.ep.N) return;  // warp-uniform
  const std::int64_t mb = static_cast<std::int64_t>(blockIdx.y) * kBlockTokens;
  const std::int64_t last_row = p.ep.N - 1, last_tok = p.ep.M - 1;
  const std::int64_t words_per_row = 4 * p.cpr;
  const uint32_t* wg = p.w + min(nb + g, last_row) * words_per_row;
  const uint32_t* wh = p.w + min(nb + g + 8, last_row) * words_per_row;
  const int4* qt[kTokenTiles];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t)
    qt[t] = reinterpret_cast<const int4*>(p.q + min(mb + 8 * t + g, last_tok) * p.kp);

  int acc[kTokenTiles][4];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0;

#pragma unroll 2
  for (std::int64_t c = 0; c < p.cpr; ++c) {
    const uint32_t w_g = __ldg(wg + mma_weight_word(c, t4));
    const uint32_t w_h = __ldg(wh + mma_weight_word(c, t4));
    uint32_t act[kTokenTiles][4];
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t) {
      const int4 v = __ldg(qt[t] + mma_act_vector(c, t4));
      act[t][0] = static_cast<uint32_t>(v.x);
      act[t][1] = static_cast<uint32_t>(v.y);
      act[t][2] = static_cast<uint32_t>(v.z);
      act[t][3] = static_cast<uint32_t>(v.w);
    }
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t a[4];
      mma_a_fragment(w_g, w_h, ks, a);
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t) {
        uint32_t b[2];
        mma_b_fragment(act[t], ks, b);
        mma_s8(acc[t], a, b);
      }
    }
  }

  // C fragment: acc[t][0..1] = row g, tokens 2 t4 + 0..1 of tile t; [2..3] = row g + 8.
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const std::int64_t n = nb + g + (i >= 2 ? 8 : 0);
      const std::int64_t m = mb + 8 * t + 2 * t4 + (i & 1);
      if (n < p.ep.N && m < p.ep.M) store_output(p.ep, m, n, acc[t][i]);
    }
}

}  // namespace

void launch_mma(const GemmArgs& a, void* stream) {
  const std::int64_t cpr = static_cast<std::int64_t>(chunks_per_row(static_cast<std::size_t>(a.K)));
  MmaParams p{reinterpret_cast<const uint32_t*>(a.packed), cpr, a.q, 64 * cpr,
              make_epilogue_args(a)};
  const std::int64_t gx = (a.N + kBlockRows - 1) / kBlockRows;
  const std::int64_t gy = (a.M + kBlockTokens - 1) / kBlockTokens;
  if (gx > 0x7fffffffLL || gy > 65535) throw std::invalid_argument("GEMM grid too large");
  ternary_gemm_mma_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads,
                            0, as_stream(stream)>>>(p);
  check_launch("ternary_gemm_mma_kernel");
}

// Decode batches up to this many tokens use the dp4a GEMV (weights decoded
// once per 8-token tile); larger batches the tensor cores.
constexpr std::int64_t kGemvMaxTokens = 8;

GemmKernel ternary_gemm(const GemmArgs& args, GemmKernel kernel, void* stream) {
  if (args.M <= 0 || args.N <= 0) return kernel == GemmKernel::Auto ? GemmKernel::Gemv : kernel;
  if (args.K <= 0 || args.K > kMaxInFeatures) throw std::invalid_argument("K out of range");
  if (args.M > kMaxTokens) throw std::invalid_argument("M out of range");
  if (kernel == GemmKernel::Auto)
    kernel = args.M <= kGemvMaxTokens ? GemmKernel::Gemv : GemmKernel::Mma;
  if (kernel == GemmKernel::Gemv) {
    launch_gemv(args, stream);
  } else {
    launch_mma(args, stream);
  }
  return kernel;
}

}  // namespace r3mes::cuda
