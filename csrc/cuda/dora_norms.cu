// Factored DoRA row norms on the GPU (DESIGN.md, "DoRA contract"):
//
//   ||W0_n + s B_n A||^2 = nnz_n / s_w^2 + 2 s B_n . (W0 A^T)_n + s^2 B_n (A A^T) B_n^T
//
// without forming the N x K matrix. Two launches: the Gram matrix A A^T
// (rank x rank, one block per entry), then one block per output row that
// decodes the row's ternary values, forms (T_n . A_j) for every j, counts the
// nonzeros, and combines. All sums are float64 (a load-time computation:
// accuracy first); each block reduces in a fixed order, so results are
// reproducible run to run.
#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/layout.h"

namespace r3mes::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    gram_kernel(const float* __restrict__ a, std::int64_t rank, std::int64_t K, double* gram) {
  __shared__ double scratch[32];
  const std::int64_t i = blockIdx.y, j = blockIdx.x;
  if (j > i) return;  // symmetric: the (i, j <= i) block writes both entries
  const float* ai = a + i * K;
  const float* aj = a + j * K;
  double s = 0.0;
  for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x)
    s += static_cast<double>(__ldg(ai + k)) * static_cast<double>(__ldg(aj + k));
  s = block_reduce(s, [](double v) { return warp_sum(v); }, scratch);
  if (threadIdx.x == 0) {
    gram[i * rank + j] = s;
    gram[j * rank + i] = s;
  }
}

// Ternary value of weight k of a packed row (layout.h).
__device__ __forceinline__ int ternary_at(const uint8_t* row, std::int64_t k) {
  const std::int64_t byte = 16 * (k / 64) + 4 * ((k % 64) / 16) + (k % 4);
  const int shift = static_cast<int>(2 * ((k % 16) / 4));
  return static_cast<int>((__ldg(row + byte) >> shift) & 3u) - 1;
}

__global__ void __launch_bounds__(kThreads)
    row_norms_kernel(const uint8_t* __restrict__ packed, std::int64_t N, std::int64_t K,
                     std::int64_t row_bytes, double inv_sw, const float* __restrict__ a,
                     const float* __restrict__ b, std::int64_t rank, double s,
                     const double* __restrict__ gram, double* __restrict__ norms) {
  __shared__ double scratch[32];
  __shared__ int iscratch[32];
  const std::int64_t n = blockIdx.x;
  const uint8_t* row = packed + n * row_bytes;
  const float* bn = b + n * rank;

  int count = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) count += ternary_at(row, k) != 0;
  count = block_reduce(count, [](int v) { return warp_sum(v); }, iscratch);

  // cross = sum_j B_nj (T_n . A_j) / s_w
  double cross = 0.0;
  for (std::int64_t j = 0; j < rank; ++j) {
    const float* aj = a + j * K;
    double d = 0.0;
    for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int t = ternary_at(row, k);
      if (t != 0) d += t > 0 ? static_cast<double>(__ldg(aj + k)) : -static_cast<double>(__ldg(aj + k));
    }
    d = block_reduce(d, [](double v) { return warp_sum(v); }, scratch);
    cross += static_cast<double>(__ldg(bn + j)) * d * inv_sw;
  }

  // quad = sum_j B_nj sum_i G_ji B_ni, threads over j.
  double quad = 0.0;
  for (std::int64_t j = threadIdx.x; j < rank; j += blockDim.x) {
    double acc = 0.0;
    for (std::int64_t i = 0; i < rank; ++i) acc += gram[j * rank + i] * static_cast<double>(__ldg(bn + i));
    quad += static_cast<double>(__ldg(bn + j)) * acc;
  }
  quad = block_reduce(quad, [](double v) { return warp_sum(v); }, scratch);

  if (threadIdx.x == 0) {
    const double sq = static_cast<double>(count) * inv_sw * inv_sw + 2.0 * s * cross + s * s * quad;
    norms[n] = sqrt(fmax(sq, 0.0));
  }
}

}  // namespace

void dora_row_norms(const uint8_t* packed, std::int64_t N, std::int64_t K, float w_scale,
                    const float* lora_a, const float* lora_b, std::int64_t rank, float scaling,
                    double* gram, double* norms, void* stream) {
  if (N <= 0) return;
  if (K <= 0 || K > kMaxInFeatures) throw std::invalid_argument("K out of range");
  if (rank <= 0 || rank > 65535) throw std::invalid_argument("rank out of range");
  if (N > 0x7fffffffLL) throw std::invalid_argument("N out of range");
  const cudaStream_t st = as_stream(stream);
  gram_kernel<<<dim3(static_cast<unsigned>(rank), static_cast<unsigned>(rank)), kThreads, 0, st>>>(
      lora_a, rank, K, gram);
  check_launch("gram_kernel (DoRA row norms)");
  const std::int64_t row_bytes = static_cast<std::int64_t>(packed_row_bytes(static_cast<std::size_t>(K)));
  row_norms_kernel<<<static_cast<unsigned>(N), kThreads, 0, st>>>(
      packed, N, K, row_bytes, 1.0 / static_cast<double>(w_scale), lora_a, lora_b, rank,
      static_cast<double>(scaling), gram, norms);
  check_launch("row_norms_kernel (DoRA row norms)");
}

}  // namespace r3mes::cuda
