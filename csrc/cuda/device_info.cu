#include <cuda_runtime.h>

#include <mutex>

#include "cuda/common.cuh"
#include "cuda/device_info.h"

namespace r3mes::cuda {

int device_count() {
  int n = 0;
  // No driver or no GPU is not an error here: the module reports zero devices.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int compiled_architectures(int* out, int capacity) {
  // nvcc defines __CUDA_ARCH_LIST__ as the virtual architectures it generated
  // code for (e.g. 800,900), whatever CMAKE_CUDA_ARCHITECTURES was spelled as.
#if defined(__CUDA_ARCH_LIST__)
  constexpr int kArchs[] = {__CUDA_ARCH_LIST__};
  const int n = static_cast<int>(sizeof(kArchs) / sizeof(kArchs[0]));
  for (int i = 0; i < n && i < capacity; ++i) out[i] = kArchs[i] / 10;
  return n;
#else
  (void)out;
  (void)capacity;
  return 0;
#endif
}

int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  static std::mutex mutex;
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  if (dev < 0 || dev >= kMaxDevices) return 108;
  if (cached[dev] == 0)
    check_cuda(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev),
               "cudaDeviceGetAttribute(multiProcessorCount)");
  return cached[dev];
}

}  // namespace r3mes::cuda
