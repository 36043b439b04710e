#include <cuda_runtime.h>

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

}  // namespace r3mes::cuda
