#pragma once
// Float math on GCC vector-extension vectors (8 or 16 floats) for kernels compiled once per
// ISA: the functions are always inlined and have internal linkage, so each ISA-flagged
// translation unit or target clone gets its own copy at its own register width; copies
// compiled for different ISAs never mix at link time.
#include <cstddef>

namespace r3mes {
namespace {

// The int vector of the same width as V (an attribute on a dependent size would be dropped).
template <std::size_t Bytes>
struct IntVectorOf;
template <>
struct IntVectorOf<32> {
  typedef int type __attribute__((vector_size(32)));
};
template <>
struct IntVectorOf<64> {
  typedef int type __attribute__((vector_size(64)));
};
template <class V>
using IntVector = typename IntVectorOf<sizeof(V)>::type;

template <class V>
inline __attribute__((always_inline)) V splat(float x) {
  return V{} + x;
}
template <class V>
inline __attribute__((always_inline)) V vmin(V a, V b) {
  return a < b ? a : b;
}
template <class V>
inline __attribute__((always_inline)) V vmax(V a, V b) {
  return a > b ? a : b;
}

// exp(x) for x <= 0 (softmax's shifted scores; below -87.3 it flushes to 0): Cephes' expf,
// x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6 polynomial of r times 2^n; within 2 ulp
// of expf.
template <class V>
inline __attribute__((always_inline)) V exp_nonpositive(V x) {
  using I = IntVector<V>;
  const V zero{};
  const auto underflow = x < -87.33654f;
  x = vmax(x, splat<V>(-87.33654f));
  const V shifter = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  const V r = x - n * 0.693359375f - n * -2.12194440e-4f;
  // A plain array, not a braced list: std::initializer_list's members would be weak
  // symbols compiled for this ISA (scripts/check_isa_symbols.py).
  constexpr float kCoefficients[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                     1.6666665459e-1f, 5.0000001201e-1f};
  V p = splat<V>(1.9875691500e-4f);
  for (const float c : kCoefficients) p = p * r + c;
  const V y = p * r * r + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  const V e = y * (V)bits;  // a cast between vectors of one size keeps the bits
  return underflow ? zero : e;
}

}  // namespace
}  // namespace r3mes
