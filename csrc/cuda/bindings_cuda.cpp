// r3mes._native_cuda: the CUDA kernels (added by the CUDA issue). For now it
// reports the devices it sees, so the build and the import path are proven.
#include <pybind11/pybind11.h>

#include "cuda/device_info.h"

namespace py = pybind11;

#ifndef R3MES_VERSION
#define R3MES_VERSION "dev"
#endif

PYBIND11_MODULE(_native_cuda, mod) {
  mod.doc() = "r3mes native CUDA kernels";
  mod.def("device_count", &r3mes::cuda::device_count,
          "Number of CUDA devices visible (0 when no driver or GPU).");
  mod.attr("version") = R3MES_VERSION;
}
