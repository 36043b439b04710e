#pragma once
// The output epilogue shared by the GEMV and the GEMM: one output element
// (token m, row n) from its exact integer dot product.
//
// Plain:   y = float(acc) / (x_scale[m] * w_scale) (+ bias[n]), each operation
//          correctly rounded in the CPU's order, so y equals the CPU and the
//          torch reference bit for bit.
// Integer: out_i32[m, n] = acc (the exact q . T^T, for tests).
// DoRA (csrc/dora/dora.h, the same order of operations as its scalar spec):
//   base = the plain y without bias
//   y    = bw[m] base + sum_{e: w[m,e] != 0} (w[m,e] g_e[n]) (base + coef_e u_e)
//   u_e  = sum_j z[m, off_e + j] B_e[n, j]                       (fp32)
//   a token whose mix weights are all 0 gets y = base; then + bias[n].
//
// Adapter storage on the device: A_e [rank, K] and B_e [N, rank], row-major,
// both fp16 or both fp32. fp16 values are pre-scaled by a power of two as the
// CPU kernel does (A = a_scale A16, B = b_scale B16) and coef = s a_scale
// b_scale, so the fp16 path applies exactly the CPU's fp16-rounded adapter.
#include <cuda_fp16.h>

#include "cuda/kernels.h"

namespace r3mes::cuda {

struct EpilogueArgs {
  const int32_t* qsum;
  const float* x_scale;
  float w_scale;
  const float* bias;
  std::int64_t M, N;
  float* out_f32;
  int32_t* out_i32;
  DoraEpilogue dora;
};

__device__ __forceinline__ float load_adapter(const void* p, std::int64_t i, int half) {
  return half ? __half2float(__ldg(static_cast<const __half*>(p) + i))
              : __ldg(static_cast<const float*>(p) + i);
}

__device__ __forceinline__ float dora_mix(const DoraEpilogue& d, std::int64_t m, std::int64_t n,
                                          float base) {
  const std::int64_t mrow = d.mix_rows == 1 ? 0 : m;
  const float* w = d.mix + mrow * d.E;
  float acc = (d.base_w != nullptr ? __ldg(d.base_w + mrow) : 0.0f) * base;
  bool any = false;
  const float* zm = d.z + m * d.z_cols;
  for (int e = 0; e < d.E; ++e) {
    const float we = __ldg(w + e);
    if (we == 0.0f) continue;
    any = true;
    const DoraAdapterDev& ad = d.ad[e];
    const float* z = zm + ad.z_off;
    const std::int64_t row = n * ad.rank;
    float u = 0.0f;
#pragma unroll 4
    for (int j = 0; j < ad.rank; ++j) u = fmaf(__ldg(z + j), load_adapter(ad.b, row + j, ad.half), u);
    acc += (we * __ldg(ad.g + n)) * (base + ad.coef * u);
  }
  return any ? acc : base;
}

// Stores output (m, n) from acc = sum_k c_k q_k (codes, see layout.h).
__device__ __forceinline__ void store_output(const EpilogueArgs& a, std::int64_t m,
                                             std::int64_t n, int acc_codes) {
  const int acc = acc_codes - __ldg(a.qsum + m);
  const std::int64_t o = m * a.N + n;
  if (a.out_i32 != nullptr) {
    a.out_i32[o] = acc;
    return;
  }
  float y = __fdiv_rn(__int2float_rn(acc), __fmul_rn(__ldg(a.x_scale + m), a.w_scale));
  if (a.dora.E > 0) y = dora_mix(a.dora, m, n, y);
  if (a.bias != nullptr) y = __fadd_rn(y, __ldg(a.bias + n));
  a.out_f32[o] = y;
}

}  // namespace r3mes::cuda
