// AVX-512 VNNI DoRA kernels: dora_avx512_impl.h's epilogue and int8 A pass with the int16
// pair product as one vpdpwssd (pairs multiplied and accumulated in int32 at once).
#include <immintrin.h>

#include <cstring>

#include "dora/dora.h"
#include "dora/dora_avx512_impl.h"

namespace r3mes {
namespace isa_avx512vnni {
namespace {

struct DpwssdPair {
  static inline __m512i dot(__m512i acc, __m512i b16, __m512i z_pair) {
    return _mm512_dpwssd_epi32(acc, b16, z_pair);
  }
};

}  // namespace

void dora_epilogue_rows_avx512vnni(const DoraMix& p, std::size_t n0, std::size_t n1) {
  epilogue_rows<DpwssdPair>(p, n0, n1);
}

void dora_dot_i8x16_rows_avx512vnni(const int8_t* a, std::size_t lda, std::size_t rows,
                              const int16_t* x16, std::size_t k, int64_t* out) {
  dot_i8x16_rows<DpwssdPair>(a, lda, rows, x16, k, out);
}

}  // namespace isa_avx512vnni
}  // namespace r3mes
