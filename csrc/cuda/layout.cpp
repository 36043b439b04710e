// Host-side repacking into the GPU layout (see layout.h). Plain C++: the
// layout is tested on machines without a GPU.
#include "cuda/layout.h"

#include <cstring>

namespace r3mes::cuda {

std::ptrdiff_t repack_ternary(const int8_t* t, std::size_t n, std::size_t k, uint8_t* packed) {
  const std::size_t row_bytes = packed_row_bytes(k);
  for (std::size_t r = 0; r < n; ++r) {
    uint8_t* row = packed + r * row_bytes;
    // Code 1 (weight 0) in every slot: 0b01010101. Padding keeps it.
    std::memset(row, 0x55, row_bytes);
    const int8_t* src = t + r * k;
    for (std::size_t j = 0; j < k; ++j) {
      const int v = src[j];
      if (v < -1 || v > 1) return static_cast<std::ptrdiff_t>(r * k + j);
      const unsigned shift = weight_shift(j);
      uint8_t& byte = row[weight_byte(j)];
      byte = static_cast<uint8_t>((byte & ~(3u << shift)) |
                                  (static_cast<unsigned>(v + 1) << shift));
    }
  }
  return -1;
}

void unpack_ternary(const uint8_t* packed, std::size_t n, std::size_t k, int8_t* t) {
  const std::size_t row_bytes = packed_row_bytes(k);
  for (std::size_t r = 0; r < n; ++r) {
    const uint8_t* row = packed + r * row_bytes;
    for (std::size_t j = 0; j < k; ++j)
      t[r * k + j] =
          static_cast<int8_t>(static_cast<int>((row[weight_byte(j)] >> weight_shift(j)) & 3u) - 1);
  }
}

}  // namespace r3mes::cuda
