#include "common/half.h"

#include <cmath>
#include <cstring>

namespace r3mes {

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);  // inf/nan
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504: inf
  if (ax < 0x38800000u) {                        // below 2^-14: fp16 subnormal (or zero)
    float af;
    std::memcpy(&af, &ax, 4);
    // af * 2^24 is exact; nearbyint rounds half to even. 0x400 is the smallest normal.
    return sign | static_cast<uint16_t>(std::nearbyint(af * 16777216.0f));
  }
  const uint32_t r = ax - 0x38000000u;  // rebias the exponent (127 -> 15)
  return sign | static_cast<uint16_t>((r + 0x0fffu + ((r >> 13) & 1u)) >> 13);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    float f = static_cast<float>(mant) * (1.0f / 16777216.0f);  // mant * 2^-24, exact
    return sign ? -f : f;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace r3mes
