// AVX-512 VNNI int8 GEMM. vpdpbusd wants unsigned x signed bytes, so the
// activations are offset by +128 once per call (u = q + 128) and the offset is
// removed with the weight row sums: sum(q*w) = sum(u*w) - 128*sum(w).
// Four rows share each activation load; tokens are walked one at a time.
#include <immintrin.h>

#include <vector>

#include "ternary/int8_gemm.h"

namespace r3mes {

void int8_gemm_rows_avx512vnni(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int8_padded_k(a.K);
  std::vector<uint8_t> u(a.M * kp);
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  for (std::size_t i = 0; i < a.M * kp; i += 64)
    _mm512_storeu_si512(u.data() + i, _mm512_xor_si512(_mm512_loadu_si512(a.q + i), offset));
  for (std::size_t m = 0; m < a.M; ++m) {
    const uint8_t* x = u.data() + m * kp;
    std::size_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const int8_t* w = a.w + n * kp;
      __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512(),
              acc2 = _mm512_setzero_si512(), acc3 = _mm512_setzero_si512();
      for (std::size_t k = 0; k < kp; k += 64) {
        __m512i xv = _mm512_loadu_si512(x + k);
        acc0 = _mm512_dpbusd_epi32(acc0, xv, _mm512_loadu_si512(w + k));
        acc1 = _mm512_dpbusd_epi32(acc1, xv, _mm512_loadu_si512(w + kp + k));
        acc2 = _mm512_dpbusd_epi32(acc2, xv, _mm512_loadu_si512(w + 2 * kp + k));
        acc3 = _mm512_dpbusd_epi32(acc3, xv, _mm512_loadu_si512(w + 3 * kp + k));
      }
      store_int8_output(a, m, n, _mm512_reduce_add_epi32(acc0) - 128 * a.w_rowsum[n]);
      store_int8_output(a, m, n + 1, _mm512_reduce_add_epi32(acc1) - 128 * a.w_rowsum[n + 1]);
      store_int8_output(a, m, n + 2, _mm512_reduce_add_epi32(acc2) - 128 * a.w_rowsum[n + 2]);
      store_int8_output(a, m, n + 3, _mm512_reduce_add_epi32(acc3) - 128 * a.w_rowsum[n + 3]);
    }
    for (; n < n1; ++n) {
      const int8_t* w = a.w + n * kp;
      __m512i acc = _mm512_setzero_si512();
      for (std::size_t k = 0; k < kp; k += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(x + k), _mm512_loadu_si512(w + k));
      store_int8_output(a, m, n, _mm512_reduce_add_epi32(acc) - 128 * a.w_rowsum[n]);
    }
  }
}

}  // namespace r3mes
