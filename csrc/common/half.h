#pragma once
// IEEE binary16 <-> binary32 in scalar code, round to nearest even: the spec the SIMD
// conversions (F16C, AVX-512) are tested against, and the fp16 scales of e5's Q4_0 blocks.
#include <cstdint>

namespace r3mes {

uint16_t float_to_half(float f);
float half_to_float(uint16_t h);

}  // namespace r3mes
