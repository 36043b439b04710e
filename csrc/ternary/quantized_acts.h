#pragma once
// Per-token int8 activations in a kernel's padded row layout, for the bindings (baseline
// code only: ISA-flagged files must not include this header's std containers).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/aligned_vector.h"

namespace r3mes {

struct QuantizedActs {
  AlignedVector<int8_t> q;      // [m, row_stride], zero padded
  std::vector<float> scale;     // [m]
  std::vector<int32_t> qsum;    // [m]
};

// Quantises x [m, k] at the active SIMD level into rows of `row_stride` >= k.
// Throws std::invalid_argument naming x when it holds NaN or Inf.
QuantizedActs quantize_rows(const float* x, std::size_t m, std::size_t k, std::size_t row_stride);

// u = q + 128 as unsigned bytes (q XOR 0x80), for kernels that multiply unsigned by signed
// bytes (vpdpbusd, vpmaddubsw) and undo the offset with their weights' row sums.
AlignedVector<uint8_t> unsigned_activations(const int8_t* q, std::size_t n);

}  // namespace r3mes
