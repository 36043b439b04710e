// Ternary weight quantisation and the 2-bit "g256" packing (layout in ternary.h).
#include <cmath>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"
#include "ternary/ternary.h"

namespace r3mes {

// Position of weight k inside its row's packed bytes: (byte index, bit shift).
static inline void locate(std::size_t k, std::size_t* byte, int* shift) {
  std::size_t group = k / kGroupWeights;
  std::size_t within = k % kGroupWeights;
  std::size_t half = within / 128;
  std::size_t p = (within % 128) / 32;
  std::size_t j = within % 32;
  *byte = group * kGroupBytes + half * 32 + j;
  *shift = static_cast<int>(2 * p);
}

static void pack_row(const int8_t* t, std::size_t k, uint8_t* row) {
  const std::size_t bytes = packed_row_bytes(k);
  std::memset(row, 0x55, bytes);  // code 1 (w = 0) in all four slots
  for (std::size_t i = 0; i < k; ++i) {
    std::size_t byte;
    int shift;
    locate(i, &byte, &shift);
    uint8_t code = static_cast<uint8_t>(t[i] + 1);
    row[byte] = static_cast<uint8_t>((row[byte] & ~(3u << shift)) | (code << shift));
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
  for (std::size_t i = 0; i < n * k; ++i)
    if (!std::isfinite(w[i])) return false;
  const std::size_t bytes = packed_row_bytes(k);
  parallel_for(n, 64, [&](std::size_t r0, std::size_t r1) {
    std::vector<int8_t> t(k);
    for (std::size_t r = r0; r < r1; ++r) {
      for (std::size_t i = 0; i < k; ++i) {
        float v = std::nearbyint(w[r * k + i] * scale);  // half to even, as torch.round
        t[i] = static_cast<int8_t>(v > 1.0f ? 1 : (v < -1.0f ? -1 : v));
      }
      pack_row(t.data(), k, packed + r * bytes);
    }
  });
  return true;
}

void unpack_ternary(const uint8_t* packed, std::size_t n, std::size_t k, int8_t* t) {
  const std::size_t bytes = packed_row_bytes(k);
  parallel_for(n, 64, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) {
      const uint8_t* row = packed + r * bytes;
      for (std::size_t i = 0; i < k; ++i) {
        std::size_t byte;
        int shift;
        locate(i, &byte, &shift);
        t[r * k + i] = static_cast<int8_t>(((row[byte] >> shift) & 3) - 1);
      }
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
