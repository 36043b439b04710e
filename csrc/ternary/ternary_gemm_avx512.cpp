// AVX-512BW ternary GEMM (no VNNI): vpmaddubsw products summed in int16 over
// the four slices of a group, widened to int32 once per group.
#include "ternary/gemm_avx512_impl.h"

namespace r3mes {
namespace isa_avx512 {
namespace {

struct MaddubsDot {
  using Partial = __m512i;
  static inline void step(Partial& part, __m512i&, __m512i codes, __m512i x, int p) {
    // |code * q| <= 256 per byte, 512 per pair, 2048 over four slices: fits int16.
    __m512i prod = _mm512_maddubs_epi16(codes, x);
    part = p == 0 ? prod : _mm512_add_epi16(part, prod);
  }
  static inline void finish_group(Partial& part, __m512i& acc) {
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(part, _mm512_set1_epi16(1)));
  }
};

}  // namespace

void ternary_gemm_rows_avx512(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  gemm_rows<MaddubsDot>(a, n0, n1);
}

}  // namespace isa_avx512
}  // namespace r3mes
