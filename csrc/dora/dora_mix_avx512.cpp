// AVX-512 DoRA kernels (without VNNI): dora_avx512_impl.h's epilogue and int8 A pass with
// the int16 pair product as vpmaddwd + vpaddd; the float A-pass dot products and the int16
// grid of x.
#include <immintrin.h>

#include <cstring>

#include "dora/dora.h"
#include "dora/dora_avx512_impl.h"

namespace r3mes {
namespace isa_avx512 {
namespace {

struct MaddPair {
  static inline __m512i dot(__m512i acc, __m512i b16, __m512i z_pair) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(b16, z_pair));
  }
};

}  // namespace

void dora_epilogue_rows_avx512(const DoraMix& p, std::size_t n0, std::size_t n1) {
  epilogue_rows<MaddPair>(p, n0, n1);
}

void dora_dot_i8x16_rows_avx512(const int8_t* a, std::size_t lda, std::size_t rows,
                              const int16_t* x16, std::size_t k, int64_t* out) {
  dot_i8x16_rows<MaddPair>(a, lda, rows, x16, k, out);
}

namespace {

// A row of A as float32 or as fp16 (converted on load); masked loads for the tail.
inline __m512 load16(const float* a) { return _mm512_loadu_ps(a); }
inline __m512 load16(const uint16_t* a) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}
inline __m512 load16_masked(__mmask16 m, const float* a) { return _mm512_maskz_loadu_ps(m, a); }
inline __m512 load16_masked(__mmask16 m, const uint16_t* a) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, a));
}

// The A pass streams A from memory in short runs (a few rows a task), too short for the
// hardware prefetcher to ramp up: fetch ahead in software.
constexpr int kDotPrefetchBytes = 1024;

template <class T>
float dot(const float* x, const T* a, std::size_t k) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
         s3 = _mm512_setzero_ps();
  std::size_t i = 0;
  for (; i + 64 <= k; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(a + i) + kDotPrefetchBytes, _MM_HINT_T0);
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load16(a + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), load16(a + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), load16(a + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), load16(a + i + 48), s3);
  }
  for (; i + 16 <= k; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load16(a + i), s0);
  if (i < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i), load16_masked(mask, a + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

}  // namespace

float dora_dot_f32_avx512(const float* x, const float* a, std::size_t k) { return dot(x, a, k); }

float dora_dot_f16_avx512(const float* x, const uint16_t* a, std::size_t k) {
  return dot(x, a, k);
}

void dora_quantize_x16_avx512(const float* x, std::size_t k, float inv, int16_t* x16) {
  const __m512 s = _mm512_set1_ps(inv);
  std::size_t i = 0;
  // vcvtps2dq rounds half to even (the default MXCSR mode), vpmovsdw saturates.
  for (; i + 16 <= k; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + i),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), s))));
  if (i < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - i)) - 1);
    _mm256_mask_storeu_epi16(x16 + i, m,
                             _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(
                                 _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), s))));
  }
}

}  // namespace isa_avx512
}  // namespace r3mes
