#pragma once
// Internal: the two ternary GEMM kernels' launchers (ternary_gemv.cu,
// ternary_gemm.cu), dispatched by ternary_gemm().
#include "cuda/epilogue.cuh"
#include "cuda/kernels.h"

namespace r3mes::cuda {

inline EpilogueArgs make_epilogue_args(const GemmArgs& a) {
  return EpilogueArgs{a.qsum, a.x_scale, a.w_scale, a.bias, a.M, a.N, a.out_f32, a.out_i32,
                      a.dora};
}

void launch_gemv(const GemmArgs& a, void* stream);
void launch_mma(const GemmArgs& a, void* stream);

}  // namespace r3mes::cuda
