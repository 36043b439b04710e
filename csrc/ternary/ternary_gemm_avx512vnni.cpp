// AVX-512 VNNI ternary GEMM: vpdpbusd multiplies the unsigned 2-bit codes by
// the signed activations and accumulates in int32 in one instruction.
#include "ternary/gemm_avx512_impl.h"

namespace r3mes {
namespace {

struct VnniDot {
  struct Partial {};
  static inline void step(Partial&, __m512i& acc, __m512i codes, __m512i x, int) {
    acc = _mm512_dpbusd_epi32(acc, codes, x);
  }
  static inline void finish_group(Partial&, __m512i&) {}
};

}  // namespace

void ternary_gemm_rows_avx512vnni(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  gemm_rows<VnniDot>(a, n0, n1);
}

}  // namespace r3mes
