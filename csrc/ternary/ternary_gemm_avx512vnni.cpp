// AVX-512 VNNI ternary GEMM: vpdpbusd multiplies the unsigned 2-bit codes by
// the signed activations and accumulates in int32 in one instruction.
//
// Decode (one token) has its own loop: instead of shifting each slice p of a
// packed register down (shift + mask), it only masks it in place, so the codes
// are c * 4^p, and keeps one accumulator per slice; the slices are rescaled
// exactly at the end (acc_p is a multiple of 4^p). That is 4 ALU ops fewer per
// 64 packed bytes, which matters because decode is close to compute-bound on
// narrow cores. Bounds: c * 4^3 <= 128 fits u8; |sum| <= 128 * 128 * K < 2^31
// for K < 131072.
#include "ternary/gemm_avx512_impl.h"

namespace r3mes {
namespace isa_avx512vnni {
namespace {

struct VnniDot {
  struct Partial {};
  static inline void step(Partial&, __m512i& acc, __m512i codes, __m512i x, int) {
    acc = _mm512_dpbusd_epi32(acc, codes, x);
  }
  static inline void finish_group(Partial&, __m512i&) {}
};

template <int R>
inline void gemv_tile(const GemmArgs& a, std::size_t n) {
  const std::size_t kp = padded_k(a.K);
  const std::size_t row_bytes = packed_row_bytes(a.K);
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C),
                m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < 4; ++p) acc[r][p] = _mm512_setzero_si512();
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = a.packed + (n + r) * row_bytes;
  const int8_t* q = a.q;
  const bool prefetch_ahead = n + (kPrefetchTiles + 1) * R <= a.N;
  for (std::size_t g = 0; g < kp / kGroupWeights; ++g) {
    const __m512i x0 = _mm512_loadu_si512(q + g * kGroupWeights);
    const __m512i x1 = _mm512_loadu_si512(q + g * kGroupWeights + 64);
    const __m512i x2 = _mm512_loadu_si512(q + g * kGroupWeights + 128);
    const __m512i x3 = _mm512_loadu_si512(q + g * kGroupWeights + 192);
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_loadu_si512(rows[r] + g * kGroupBytes);
      if (prefetch_ahead) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kPrefetchTiles * R * row_bytes +
                                                         g * kGroupBytes),
                     R3MES_WEIGHT_PREFETCH_HINT);
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + R * row_bytes + g * kGroupBytes),
                     _MM_HINT_T0);  // the next tile, from L2 into L1 (see ternary.h)
      }
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(v, m0), x0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(v, m1), x1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(v, m2), x2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(v, m3), x3);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512i sum = _mm512_add_epi32(
        _mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)),
        _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
    store_output(a, 0, n + r, _mm512_reduce_add_epi32(sum) - a.qsum[0]);
  }
}

}  // namespace

void ternary_gemm_rows_avx512vnni(const GemmArgs& a, std::size_t n0, std::size_t n1) {
  if (a.M != 1) {
    gemm_rows<VnniDot>(a, n0, n1);
    return;
  }
  std::size_t n = n0;
  for (; n + 4 <= n1; n += 4) gemv_tile<4>(a, n);
  for (; n < n1; ++n) gemv_tile<1>(a, n);
}

}  // namespace isa_avx512vnni
}  // namespace r3mes
