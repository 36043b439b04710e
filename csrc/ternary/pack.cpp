// Ternary weight quantisation and the 2-bit "g256" packing (layout in ternary.h).
#include <cmath>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"
#include "ternary/ternary.h"

namespace r3mes {

// Codes c = t + 1 of one row, zero-padded (code 1) to a whole number of groups,
// folded four 32-weight slices a byte: the compiler vectorises both loops.
static void pack_row(const int8_t* t, std::size_t k, uint8_t* row) {
  const std::size_t kp = padded_k(k);
  std::vector<uint8_t> codes(kp, 1);
  for (std::size_t i = 0; i < k; ++i) codes[i] = static_cast<uint8_t>(t[i] + 1);
  for (std::size_t b = 0; b < kp / 128; ++b) {
    const uint8_t* c = codes.data() + 128 * b;
    uint8_t* out = row + 32 * b;
    for (int j = 0; j < 32; ++j)
      out[j] = static_cast<uint8_t>(c[j] | (c[32 + j] << 2) | (c[64 + j] << 4) | (c[96 + j] << 6));
  }
}

bool pack_ternary(const int8_t* t, std::size_t n, std::size_t k, uint8_t* packed) {
  for (std::size_t i = 0; i < n * k; ++i)
    if (t[i] < -1 || t[i] > 1) return false;
  const std::size_t bytes = packed_row_bytes(k);
  parallel_for(n, 64, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) pack_row(t + r * k, k, packed + r * bytes);
  });
  return true;
}

bool quantize_pack_ternary(const float* w, std::size_t n, std::size_t k, float scale,
                           uint8_t* packed) {
  bool finite = true;
  for (std::size_t i = 0; i < n * k; ++i) finite &= std::fabs(w[i]) <= 3.4028235e38f;  // NaN fails too
  if (!finite) return false;
  const std::size_t bytes = packed_row_bytes(k);
  parallel_for(n, 64, [&](std::size_t r0, std::size_t r1) {
    std::vector<int8_t> t(k);
    for (std::size_t r = r0; r < r1; ++r) {
      // clamp(round_half_even(v), -1, 1) is exactly (v > 0.5) - (v < -0.5): +-0.5
      // rounds to 0 and everything beyond rounds to at least +-1.
      for (std::size_t i = 0; i < k; ++i) {
        float v = w[r * k + i] * scale;
        t[i] = static_cast<int8_t>((v > 0.5f) - (v < -0.5f));
      }
      pack_row(t.data(), k, packed + r * bytes);
    }
  });
  return true;
}

void unpack_ternary(const uint8_t* packed, std::size_t n, std::size_t k, int8_t* t) {
  const std::size_t bytes = packed_row_bytes(k);
  const std::size_t kp = padded_k(k);
  parallel_for(n, 64, [&](std::size_t r0, std::size_t r1) {
    std::vector<int8_t> row_t(kp);
    for (std::size_t r = r0; r < r1; ++r) {
      const uint8_t* row = packed + r * bytes;
      for (std::size_t b = 0; b < kp / 128; ++b)
        for (int p = 0; p < 4; ++p)
          for (int j = 0; j < 32; ++j)
            row_t[128 * b + 32 * p + j] =
                static_cast<int8_t>(((row[32 * b + j] >> (2 * p)) & 3) - 1);
      std::memcpy(t + r * k, row_t.data(), k);
    }
  });
}

void permute_activations_g256(const int8_t* src, int8_t* dst, std::size_t kp) {
  for (std::size_t g = 0; g < kp; g += kGroupWeights)
    for (int p = 0; p < 4; ++p)
      for (int h = 0; h < 2; ++h)
        std::memcpy(dst + g + 64 * p + 32 * h, src + g + 128 * h + 32 * p, 32);
}

}  // namespace r3mes
