// Per-token int8 activation quantisation (DESIGN.md), and the DoRA "A pass"
// (z = A_e x) in the same launch, so a fused DoRA layer costs as many kernel
// launches as a bare one: this prologue, then the ternary GEMV/GEMM.
//
// Grid: blocks [0, M) quantise one token each; blocks [M, M + M * z_cols)
// compute one z element each (token m, adapter row i). One block per item keeps
// the reductions in a fixed order: results are reproducible run to run.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/layout.h"

namespace r3mes::cuda {
namespace {

constexpr int kThreads = 256;

struct PrologueParams {
  const float* x;  // [M, K] fp32
  std::int64_t M, K, kp;
  int8_t* q;       // [M, kp]
  float* x_scale;  // [M]
  int32_t* qsum;   // [M]
  DoraEpilogue dora;
};

// scale = 127 / max(max|x|, 1e-5) computed as the reference does (torch:
// clamp(min=1e-5).reciprocal() * 127), each step correctly rounded, so it is
// bit-identical to the CPU; q = clamp(round_half_even(x * scale), -128, 127).
__device__ void quantize_row(const PrologueParams& p, std::int64_t m) {
  __shared__ float fscratch[32];
  __shared__ int iscratch[32];
  const float* xr = p.x + m * p.K;
  float amax = 0.0f;
  int finite = 1;
  for (std::int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
    const float v = xr[k];
    finite &= isfinite(v) ? 1 : 0;  // fmaxf drops NaN: track non-finite values apart
    amax = fmaxf(amax, fabsf(v));
  }
  finite = __syncthreads_and(finite);
  amax = block_reduce(amax, [](float v) { return warp_max(v); }, fscratch);
  const float scale =
      finite ? __fmul_rn(__frcp_rn(fmaxf(amax, 1e-5f)), 127.0f) : __int_as_float(0x7fc00000);

  // Four consecutive k a thread: one 4-byte store (kp is a multiple of 64, q is
  // 16-byte aligned), zero past K and for a non-finite token.
  int8_t* qr = p.q + m * p.kp;
  int sum = 0;
  for (std::int64_t k4 = 4 * static_cast<std::int64_t>(threadIdx.x); k4 < p.kp;
       k4 += 4 * static_cast<std::int64_t>(blockDim.x)) {
    char4 out;
    int v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = 0;
      if (finite && k4 + i < p.K) {
        const int r = __float2int_rn(__fmul_rn(xr[k4 + i], scale));
        v[i] = min(127, max(-128, r));
      }
      sum += v[i];
    }
    out.x = static_cast<signed char>(v[0]);
    out.y = static_cast<signed char>(v[1]);
    out.z = static_cast<signed char>(v[2]);
    out.w = static_cast<signed char>(v[3]);
    *reinterpret_cast<char4*>(qr + k4) = out;
  }
  sum = block_reduce(sum, [](int v) { return warp_sum(v); }, iscratch);
  if (threadIdx.x == 0) {
    p.x_scale[m] = scale;
    p.qsum[m] = sum;
  }
}

// z[m, i] = A_e[j] . x_m (fp32 accumulation) for z column i = z_off[e] + j.
__device__ void a_pass_element(const PrologueParams& p, std::int64_t item) {
  __shared__ float scratch[32];
  const DoraEpilogue& d = p.dora;
  const std::int64_t m = item / d.z_cols;
  const int i = static_cast<int>(item % d.z_cols);
  int e = 0;
  while (e + 1 < d.E && i >= d.ad[e + 1].z_off) ++e;
  const DoraAdapterDev& ad = d.ad[e];
  const int j = i - ad.z_off;
  float* dst = d.z + m * d.z_cols + i;
  const float w = d.mix[(d.mix_rows == 1 ? 0 : m) * d.E + e];
  if (w == 0.0f) {  // the epilogue skips this pair: write a defined value anyway
    if (threadIdx.x == 0) *dst = 0.0f;
    return;  // uniform across the block
  }
  const float* xr = p.x + m * p.K;
  float acc = 0.0f;
  if (ad.half) {
    const __half* a = static_cast<const __half*>(ad.a) + static_cast<std::int64_t>(j) * p.K;
#pragma unroll 4
    for (std::int64_t k = threadIdx.x; k < p.K; k += blockDim.x)
      acc = fmaf(__ldg(xr + k), __half2float(a[k]), acc);
  } else {
    const float* a = static_cast<const float*>(ad.a) + static_cast<std::int64_t>(j) * p.K;
#pragma unroll 4
    for (std::int64_t k = threadIdx.x; k < p.K; k += blockDim.x)
      acc = fmaf(__ldg(xr + k), __ldg(a + k), acc);
  }
  acc = block_reduce(acc, [](float v) { return warp_sum(v); }, scratch);
  if (threadIdx.x == 0) *dst = acc;
}

__global__ void __launch_bounds__(kThreads) prologue_kernel(const PrologueParams p) {
  const std::int64_t b = blockIdx.x;
  if (b < p.M) {
    quantize_row(p, b);
  } else {
    a_pass_element(p, b - p.M);
  }
}

}  // namespace

void quantize_activations(const float* x, std::int64_t M, std::int64_t K, int8_t* q,
                          float* x_scale, int32_t* qsum, const DoraEpilogue& dora,
                          void* stream) {
  if (M <= 0) return;
  if (K <= 0 || K > kMaxInFeatures) throw std::invalid_argument("K out of range");
  PrologueParams p{x, M, K, static_cast<std::int64_t>(padded_k(static_cast<std::size_t>(K))),
                   q, x_scale, qsum, dora};
  const std::int64_t blocks = M + (dora.E > 0 ? M * dora.z_cols : 0);
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("too many tokens x adapter rows");
  prologue_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(p);
  check_launch("prologue_kernel (activation quantisation)");
}

}  // namespace r3mes::cuda
