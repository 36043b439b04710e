// Ternary x int8 GEMV for decode (M = 1..8 tokens a launch tile), dp4a on
// decoded 2-bit codes.
//
// Work split
// ----------
// A block is 4 warps; a warp owns R consecutive output rows (R = 1, 2 or 4,
// picked from N so the grid fills the GPU) and a tile of MT tokens (1, 2, 4,
// 8; gridDim.y tiles cover M). The lanes split K: lane l handles chunks
// l, l + 32, l + 64, ... of each of its rows (a chunk = 64 weights = one
// aligned 16-byte load, layout.h), so a warp reads 512 contiguous bytes of a
// row per load instruction. Each lane issues the loads of U = 2 chunks of all R
// rows before it uses any (2 R loads of 16 bytes in flight a lane), decodes each
// chunk once (shift + mask, fragments.h) and reuses the codes for all MT
// tokens. Activations (int8, padded rows) are read as 16-byte loads through the
// read-only cache: every warp of an SM reads the same few KB of them.
//
// Reduction and epilogue: the R x MT lane sums are reduced by xor-butterflies
// (every lane gets every total); lane r * MT + m then writes output (m, row0 + r)
// through store_output (epilogue.cuh), so the epilogue (scale, bias, fused DoRA)
// runs on up to 16 lanes in parallel.
//
// Invariants: rows past N are clamped to row N - 1 for loading (always in
// bounds) and never stored; chunks past the row end are skipped; token rows
// past M are not read. The int32 accumulator is exact for K <= kMaxInFeatures.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/device_info.h"
#include "cuda/epilogue.cuh"
#include "cuda/fragments.h"
#include "cuda/gemm_launch.h"
#include "cuda/layout.h"

namespace r3mes::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kUnroll = 2;

struct GemvParams {
  const uint4* w;        // [N, cpr] chunks
  std::int64_t cpr;      // chunks per row
  const int8_t* q;       // [M, kp]
  std::int64_t kp;
  EpilogueArgs ep;
};

template <int MT, int R>
__global__ void __launch_bounds__(kThreads) ternary_gemv_kernel(const GemvParams p) {
  static_assert(R * MT <= 32, "one lane per (row, token) output in the epilogue");
  const int lane = threadIdx.x & 31;
  const std::int64_t row0 =
      (static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= p.ep.N) return;  // warp-uniform: no lane of this warp reaches a shuffle
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.y) * MT;
  const int mcount = static_cast<int>(min(static_cast<std::int64_t>(MT), p.ep.M - m0));

  const uint4* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = p.w + min(row0 + r, p.ep.N - 1) * p.cpr;

  int acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0;

  for (std::int64_t c0 = lane; c0 < p.cpr; c0 += 32 * kUnroll) {
    // All loads of this step first: 2R independent 16-byte loads in flight.
    uint4 wv[kUnroll][R];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r) wv[u][r] = c < p.cpr ? __ldg(wrow[r] + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t c = c0 + 32 * u;
      if (c >= p.cpr) break;
      uint32_t codes[R][16];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t words[4] = {wv[u][r].x, wv[u][r].y, wv[u][r].z, wv[u][r].w};
        decode_chunk(words, codes[r]);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= mcount) break;
        const int4* qa = reinterpret_cast<const int4*>(p.q + (m0 + m) * p.kp) + 4 * c;
        uint32_t act[16];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int4 v = __ldg(qa + i);
          act[4 * i + 0] = static_cast<uint32_t>(v.x);
          act[4 * i + 1] = static_cast<uint32_t>(v.y);
          act[4 * i + 2] = static_cast<uint32_t>(v.z);
          act[4 * i + 3] = static_cast<uint32_t>(v.w);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = codes_dot(codes[r], act, acc[r][m]);
      }
    }
  }

  // Butterfly-reduce every (row, token) sum; lane r * MT + m keeps its own.
  int mine = 0;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int s = warp_sum(acc[r][m]);
      if (lane == r * MT + m) mine = s;  // compile-time indices: acc stays in registers
    }
  const int r = lane / MT, m = lane % MT;
  if (r < R && m < mcount && row0 + r < p.ep.N) store_output(p.ep, m0 + m, row0 + r, mine);
}

using GemvFn = void (*)(const GemvParams);

template <int MT>
GemvFn pick_rows(int rows) {
  // Only R * MT <= 16 is instantiated: more accumulators would spill.
  if constexpr (4 * MT <= 16) {
    if (rows == 4) return ternary_gemv_kernel<MT, 4>;
  }
  if (rows == 2) return ternary_gemv_kernel<MT, 2>;
  return ternary_gemv_kernel<MT, 1>;
}

}  // namespace

void launch_gemv(const GemmArgs& a, void* stream) {
  const std::int64_t cpr = static_cast<std::int64_t>(chunks_per_row(static_cast<std::size_t>(a.K)));
  GemvParams p{reinterpret_cast<const uint4*>(a.packed), cpr, a.q, 64 * cpr,
               make_epilogue_args(a)};
  const int mt = a.M <= 1 ? 1 : a.M <= 2 ? 2 : a.M <= 4 ? 4 : 8;
  // Rows per warp: as many as keep >= ~24 warps per SM busy (latency hiding),
  // at most 4, and R * MT <= 16 (accumulators in registers).
  const std::int64_t target_warps = static_cast<std::int64_t>(multiprocessor_count()) * 24;
  int rows = 1;
  for (int cand : {4, 2}) {
    if (cand * mt <= 16 && a.N / cand >= target_warps) {
      rows = cand;
      break;
    }
  }
  GemvFn fn;
  switch (mt) {
    case 1: fn = pick_rows<1>(rows); break;
    case 2: fn = pick_rows<2>(rows); break;
    case 4: fn = pick_rows<4>(rows); break;
    default: fn = pick_rows<8>(rows); break;
  }
  const std::int64_t rows_per_block = static_cast<std::int64_t>(kWarps) * rows;
  const std::int64_t gx = (a.N + rows_per_block - 1) / rows_per_block;
  const std::int64_t gy = (a.M + mt - 1) / mt;
  if (gx > 0x7fffffffLL || gy > 65535) throw std::invalid_argument("GEMV grid too large");
  fn<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0,
       as_stream(stream)>>>(p);
  check_launch("ternary_gemv_kernel");
}

}  // namespace r3mes::cuda
