// AVX2 DoRA kernels: the fused epilogue over full 16-row tiles (two ymm of
// outputs; fp16 adapters converted with F16C), and the A-pass dot products.
// F16C is enabled per function: every CPU with AVX2 has it, but the build's
// AVX2 flags do not name it. Partial tiles go through the scalar spec.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "dora/dora.h"

#define R3MES_F16C __attribute__((target("avx2,fma,f16c")))

namespace r3mes {
namespace isa_avx2 {
namespace {

R3MES_F16C inline __m256 load_h8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

R3MES_F16C inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int8 storage: sum_j B8[16 t + l, j] z16[j] exactly (int32) for the two 8-row halves of
// one tile, b pointing at it: one vpmaddwd per two ranks and 8 rows (layout in dora.h).
inline void low_rank_i8(const int8_t* b, const int16_t* z16, std::size_t pairs, __m256* lo,
                        __m256* hi) {
  __m256i u0 = _mm256_setzero_si256(), u1 = _mm256_setzero_si256();
  for (std::size_t i = 0; i < pairs; ++i) {
    int32_t zp;
    std::memcpy(&zp, z16 + 2 * i, 4);
    const __m256i z = _mm256_set1_epi32(zp);
    const int8_t* run = b + i * 2 * kDoraTile;
    u0 = _mm256_add_epi32(u0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(run))), z));
    u1 = _mm256_add_epi32(u1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(run + 16))), z));
  }
  *lo = _mm256_cvtepi32_ps(u0);
  *hi = _mm256_cvtepi32_ps(u1);
}

// Eight floats of a row stored as float32 or fp16 (converted on load).
R3MES_F16C inline __m256 load8(const float* a) { return _mm256_loadu_ps(a); }
R3MES_F16C inline __m256 load8(const uint16_t* a) { return load_h8(a); }

// u for the two 8-row halves of one tile, b pointing at it (fp32 / fp16 storage).
template <class T>
R3MES_F16C inline void low_rank(const T* b, const float* z, std::size_t rank, __m256* lo,
                                __m256* hi) {
  __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
  for (std::size_t j = 0; j < rank; ++j) {
    const __m256 zj = _mm256_set1_ps(z[j]);
    u0 = _mm256_fmadd_ps(zj, load8(b + j * kDoraTile), u0);
    u1 = _mm256_fmadd_ps(zj, load8(b + j * kDoraTile + 8), u1);
  }
  *lo = u0;
  *hi = u1;
}

// Rows [v0, v1) (whole tiles) of every token, each entry's constants from DoraMix::entries.
R3MES_F16C void tiles(const DoraMix& p, std::size_t v0, std::size_t v1) {
  for (std::size_t m = 0; m < p.M; ++m) {
    float* y = p.out + m * p.N;
    const uint32_t a0 = p.act_start[m], a1 = p.act_start[m + 1];
    if (a0 == a1 && p.bias == nullptr) continue;
    const float* factor = p.factor_row(m);
    for (std::size_t nb = v0; nb < v1; nb += kDoraTile) {
      __m256 acc0 = _mm256_loadu_ps(y + nb), acc1 = _mm256_loadu_ps(y + nb + 8);
      if (a0 != a1) {
        __m256 c0, c1;
        if (factor != nullptr) {
          c0 = _mm256_loadu_ps(factor + nb);
          c1 = _mm256_loadu_ps(factor + nb + 8);
        } else {
          c0 = c1 = _mm256_set1_ps(p.base_w[m]);
          for (uint32_t a = a0; a < a1; ++a) {
            const float* g = p.adapters[p.act_e[a]]->g.data() + nb;
            const __m256 w = _mm256_set1_ps(p.act_w[a]);
            c0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(g), c0);
            c1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(g + 8), c1);
          }
        }
        acc0 = _mm256_mul_ps(c0, acc0);
        acc1 = _mm256_mul_ps(c1, acc1);
      }
      for (uint32_t a = a0; a < a1; ++a) {
        const DoraMix::Entry& e = p.entries[a];
        const uint8_t* b = e.bt + nb / kDoraTile * e.tile_bytes;
        __m256 u0, u1;
        if (e.storage == DoraStorage::I8)
          low_rank_i8(reinterpret_cast<const int8_t*>(b), static_cast<const int16_t*>(e.z),
                      e.rank / 2, &u0, &u1);
        else if (e.storage == DoraStorage::F16)
          low_rank(reinterpret_cast<const uint16_t*>(b), static_cast<const float*>(e.z), e.rank,
                   &u0, &u1);
        else
          low_rank(reinterpret_cast<const float*>(b), static_cast<const float*>(e.z), e.rank,
                   &u0, &u1);
        const __m256 c = _mm256_set1_ps(e.scale);
        acc0 = _mm256_fmadd_ps(u0, c, acc0);
        acc1 = _mm256_fmadd_ps(u1, c, acc1);
      }
      if (p.bias != nullptr) {
        acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(p.bias + nb));
        acc1 = _mm256_add_ps(acc1, _mm256_loadu_ps(p.bias + nb + 8));
      }
      _mm256_storeu_ps(y + nb, acc0);
      _mm256_storeu_ps(y + nb + 8, acc1);
    }
  }
}

}  // namespace

void dora_epilogue_rows_avx2(const DoraMix& p, std::size_t n0, std::size_t n1) {
  dora_epilogue_by_tiles(p, n0, n1, [&](std::size_t v0, std::size_t v1) { tiles(p, v0, v1); });
}

namespace {

// The scalar tail of a row of A as float32 or as fp16 (load8 above for the vectors).
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return half_to_float(v); }

template <class T>
R3MES_F16C float dot(const float* x, const T* a, std::size_t k) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
         s3 = _mm256_setzero_ps();
  std::size_t i = 0;
  for (; i + 32 <= k; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(a + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(a + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), load8(a + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), load8(a + i + 24), s3);
  }
  for (; i + 8 <= k; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(a + i), s0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < k; ++i) s += x[i] * scalar(a[i]);
  return s;
}

}  // namespace

R3MES_F16C float dora_dot_f32_avx2(const float* x, const float* a, std::size_t k) {
  return dot(x, a, k);
}

R3MES_F16C float dora_dot_f16_avx2(const float* x, const uint16_t* a, std::size_t k) {
  return dot(x, a, k);
}

static int64_t dot_i8x16(const int8_t* a, const int16_t* x16, std::size_t k) {
  // Each int32 lane takes at most 2 * 2048 / 16 products of |127 * 32767| per block (< 2^31).
  constexpr std::size_t kBlock = 2048;
  int64_t total = 0;
  std::size_t i = 0;
  while (i + 16 <= k) {
    const std::size_t end = std::min(k, i + kBlock) / 16 * 16;
    __m256i acc = _mm256_setzero_si256();
    for (; i < end; i += 16)
      acc = _mm256_add_epi32(
          acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                                     reinterpret_cast<const __m128i*>(a + i))),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i))));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    for (int l = 0; l < 8; ++l) total += lanes[l];
  }
  for (; i < k; ++i) total += int32_t{a[i]} * x16[i];
  return total;
}

void dora_dot_i8x16_rows_avx2(const int8_t* a, std::size_t lda, std::size_t rows,
                              const int16_t* x16, std::size_t k, int64_t* out) {
  for (std::size_t r = 0; r < rows; ++r) out[r] = dot_i8x16(a + r * lda, x16, k);
}

void dora_quantize_x16_avx2(const float* x, std::size_t k, float inv, int16_t* x16) {
  const __m256 s = _mm256_set1_ps(inv);
  std::size_t i = 0;
  // vcvtps2dq rounds half to even (the default MXCSR mode), vpackssdw saturates.
  for (; i + 8 <= k; i += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x16 + i),
                     _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  dora_quantize_x16_scalar(x + i, k - i, inv, x16 + i);
}

}  // namespace isa_avx2
}  // namespace r3mes
