#pragma once
// Error checking and block/warp reductions shared by the kernels.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace r3mes::cuda {

// Every CUDA call goes through this: a failure becomes a std::runtime_error
// (a Python RuntimeError) carrying the CUDA error string.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("r3mes CUDA: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// After a launch: configuration errors (bad grid, too many resources, no
// kernel image for this GPU) are reported here, not at the next call.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

#if defined(__CUDACC__)
// Butterfly sum over the 32 lanes of a warp (int, float or double).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions for blocks of a multiple of 32 threads (<= 1024). Every
// thread of the block must call them; every thread gets the result. The fixed
// order (warp butterfly, then warp 0 over the partials) makes float results
// reproducible run to run.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op warp_op, T* scratch /* >= 32 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = warp_op(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  return warp_op(v);  // every warp reduces the partials itself: no third barrier
}
#endif

}  // namespace r3mes::cuda
