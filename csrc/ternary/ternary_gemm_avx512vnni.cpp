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
#include "ternary/vnni_asm.h"

namespace r3mes {
namespace isa_avx512vnni {
namespace {

struct VnniDot {
  struct Partial {};
  static inline void step(Partial&, __m512i& acc, __m512i codes, __m512i x, int) {
    dpbusd_in_place(acc, codes, x);
  }
  static inline void finish_group(Partial&, __m512i&) {}
};

// One row's four slice accumulators. Named variables, not an array: GCC 12 kept a
// __m512i acc[4][4] partly on the stack and copied every accumulator between registers
// around each vpdpbusd (32 moves and 4 stores a group of 4 rows).
struct SliceAcc {
  __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512(),
          s2 = _mm512_setzero_si512(), s3 = _mm512_setzero_si512();
  // The slices hold codes * 4^p (masked in place, not shifted): rescaled exactly here.
  int32_t total() const {
    return _mm512_reduce_add_epi32(
        _mm512_add_epi32(_mm512_add_epi32(s0, _mm512_srai_epi32(s1, 2)),
                         _mm512_add_epi32(_mm512_srai_epi32(s2, 4), _mm512_srai_epi32(s3, 6))));
  }
};

// Rows [n, n + R) for one token, R = 1 or 4. The prefetches are a template parameter, not a
// branch in the loop.
template <int R, bool kPrefetch>
inline void gemv_tile_loop(const GemmArgs& a, std::size_t n) {
  static_assert(R == 1 || R == 4);
  const std::size_t kp = padded_k(a.K);
  const std::size_t row_bytes = packed_row_bytes(a.K);
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C),
                m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  SliceAcc r0, r1, r2, r3;
  const uint8_t* row0 = a.packed + n * row_bytes;
  const int8_t* q = a.q;
  const std::size_t groups = kp / kGroupWeights;
  // A tile's R rows are one contiguous run of R * row_bytes: the tiles ahead are fetched as
  // runs too, R lines a group, from one pointer each.
  const char* ahead = reinterpret_cast<const char*>(row0) + kPrefetchTiles * R * row_bytes;
  const char* next = reinterpret_cast<const char*>(row0) + R * row_bytes;
  for (std::size_t g = 0; g < groups; ++g) {
    const int8_t* xg = q + g * kGroupWeights;
    const uint8_t* wg = row0 + g * kGroupBytes;
    if constexpr (kPrefetch) {
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(ahead + (g * R + r) * 64, R3MES_WEIGHT_PREFETCH_HINT);
        _mm_prefetch(next + (g * R + r) * 64, _MM_HINT_T0);  // from L2 into L1 (ternary.h)
      }
    }
    const __m512i x0 = _mm512_loadu_si512(xg), x1 = _mm512_loadu_si512(xg + 64),
                  x2 = _mm512_loadu_si512(xg + 128), x3 = _mm512_loadu_si512(xg + 192);
    auto row = [&](const uint8_t* w, SliceAcc& acc) {
      const __m512i v = _mm512_loadu_si512(w);
      dpbusd_in_place(acc.s0, _mm512_and_si512(v, m0), x0);
      dpbusd_in_place(acc.s1, _mm512_and_si512(v, m1), x1);
      dpbusd_in_place(acc.s2, _mm512_and_si512(v, m2), x2);
      dpbusd_in_place(acc.s3, _mm512_and_si512(v, m3), x3);
    };
    row(wg, r0);
    if constexpr (R == 4) {
      row(wg + row_bytes, r1);
      row(wg + 2 * row_bytes, r2);
      row(wg + 3 * row_bytes, r3);
    }
  }
  store_output(a, 0, n, r0.total() - a.qsum[0]);
  if constexpr (R == 4) {
    store_output(a, 0, n + 1, r1.total() - a.qsum[0]);
    store_output(a, 0, n + 2, r2.total() - a.qsum[0]);
    store_output(a, 0, n + 3, r3.total() - a.qsum[0]);
  }
}

template <int R>
inline void gemv_tile(const GemmArgs& a, std::size_t n) {
  if (n + (kPrefetchTiles + 1) * R <= a.N)
    gemv_tile_loop<R, true>(a, n);
  else
    gemv_tile_loop<R, false>(a, n);
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
