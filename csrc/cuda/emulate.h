#pragma once
// Host emulation of the ternary GEMM kernels (see emulate.cpp), for tests on
// machines without a GPU. q [M, padded_k(K)] int8, qsum [M], packed in the GPU
// layout [N, packed_row_bytes(K)]; out [M, N] = the exact q . T^T.
#include <cstddef>
#include <cstdint>

namespace r3mes::cuda {

void emulate_gemv(const int8_t* q, const int32_t* qsum, std::size_t M, const uint8_t* packed,
                  std::size_t N, std::size_t K, int32_t* out);
void emulate_mma(const int8_t* q, const int32_t* qsum, std::size_t M, const uint8_t* packed,
                 std::size_t N, std::size_t K, int32_t* out);

// d += A B for one warp's mma.m16n8k32 .s8 fragments (a [lane][4], b [lane][2],
// d [lane][4]), as the PTX ISA defines them.
void mma_m16n8k32_s8_model(const uint32_t a[32][4], const uint32_t b[32][2], int32_t d[32][4]);

}  // namespace r3mes::cuda
