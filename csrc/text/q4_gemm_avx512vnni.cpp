// AVX-512 VNNI Q4_0 x Q8_0 GEMM: q4_gemm_avx512_impl.h with each group of 4 products as one
// vpdpbusd (unsigned weights x signed activations, summed into int32 lanes without
// saturation).
#include <immintrin.h>

#include "text/q4_gemm.h"
#include "text/q4_gemm_avx512_impl.h"

namespace r3mes {
namespace isa_avx512vnni {
namespace {

struct DpbusdDot {
  static inline __m512i block(__m512i acc, const __m512i* wv, const int8_t* qb) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc = _mm512_dpbusd_epi32(acc, wv[j], broadcast4(qb + 4 * j));
    return acc;
  }
};

}  // namespace

void q4_gemm_tile(const Q4Matrix& w, const Q8Acts& a, const float* bias, float* y,
                  std::size_t g0, std::size_t g1, std::size_t t0, std::size_t t1) {
  gemm_tile<DpbusdDot>(w, a, bias, y, g0, g1, t0, t1);
}

}  // namespace isa_avx512vnni
}  // namespace r3mes
