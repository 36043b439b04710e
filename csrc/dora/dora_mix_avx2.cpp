// AVX2 DoRA kernels: the fused epilogue over full 16-row tiles (two ymm of
// outputs; fp16 adapters converted with F16C), and the A-pass dot products.
// F16C is enabled per function: every CPU with AVX2 has it, but the build's
// AVX2 flags do not name it. Partial tiles go through the scalar spec.
#include <immintrin.h>

#include "dora/dora.h"

#define R3MES_F16C __attribute__((target("avx2,fma,f16c")))

namespace r3mes {
namespace {

R3MES_F16C inline __m256 load_h8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load_i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

R3MES_F16C inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// u for the two 8-row halves of tile t.
R3MES_F16C inline void low_rank(const DoraAdapter& ad, const float* z, std::size_t t,
                                __m256* lo, __m256* hi) {
  const std::size_t off = t * ad.rank * kDoraTile;
  __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
  for (std::size_t j = 0; j < ad.rank; ++j) {
    const __m256 zj = _mm256_set1_ps(z[j]);
    const std::size_t o = off + j * kDoraTile;
    if (ad.storage == DoraStorage::F16) {
      u0 = _mm256_fmadd_ps(zj, load_h8(ad.bt16.data() + o), u0);
      u1 = _mm256_fmadd_ps(zj, load_h8(ad.bt16.data() + o + 8), u1);
    } else if (ad.storage == DoraStorage::I8) {
      u0 = _mm256_fmadd_ps(zj, load_i8x8(ad.bt8.data() + o), u0);
      u1 = _mm256_fmadd_ps(zj, load_i8x8(ad.bt8.data() + o + 8), u1);
    } else {
      u0 = _mm256_fmadd_ps(zj, _mm256_loadu_ps(ad.bt32.data() + o), u0);
      u1 = _mm256_fmadd_ps(zj, _mm256_loadu_ps(ad.bt32.data() + o + 8), u1);
    }
  }
  *lo = u0;
  *hi = u1;
}

R3MES_F16C void tiles(const DoraMix& p, std::size_t v0, std::size_t v1) {
  for (std::size_t m = 0; m < p.M; ++m) {
    float* y = p.out + m * p.N;
    const uint32_t a0 = p.act_start[m], a1 = p.act_start[m + 1];
    if (a0 == a1 && p.bias == nullptr) continue;
    const float* zm = p.z.data() + m * p.z_cols;
    for (std::size_t nb = v0; nb < v1; nb += kDoraTile) {
      const __m256 b0 = _mm256_loadu_ps(y + nb), b1 = _mm256_loadu_ps(y + nb + 8);
      __m256 acc0 = b0, acc1 = b1;
      if (a0 != a1) {
        const __m256 bw = _mm256_set1_ps(p.base_w[m]);
        acc0 = _mm256_mul_ps(bw, b0);
        acc1 = _mm256_mul_ps(bw, b1);
      }
      for (uint32_t a = a0; a < a1; ++a) {
        const DoraAdapter& ad = *p.adapters[p.act_e[a]];
        __m256 u0, u1;
        low_rank(ad, zm + p.z_off[p.act_e[a]], nb / kDoraTile, &u0, &u1);
        const __m256 c = _mm256_set1_ps(ad.coef), w = _mm256_set1_ps(p.act_w[a]);
        acc0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(ad.g.data() + nb), w),
                               _mm256_fmadd_ps(u0, c, b0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(ad.g.data() + nb + 8), w),
                               _mm256_fmadd_ps(u1, c, b1), acc1);
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
  const std::size_t v0 = (n0 + kDoraTile - 1) / kDoraTile * kDoraTile;
  const std::size_t v1 = n1 / kDoraTile * kDoraTile;
  if (v0 >= v1) {
    dora_epilogue_rows_scalar(p, n0, n1);
    return;
  }
  if (n0 < v0) dora_epilogue_rows_scalar(p, n0, v0);
  tiles(p, v0, v1);
  if (v1 < n1) dora_epilogue_rows_scalar(p, v1, n1);
}

namespace {

// A row of A as float32 or as fp16 (converted on load); the scalar tail likewise.
R3MES_F16C inline __m256 load8(const float* a) { return _mm256_loadu_ps(a); }
R3MES_F16C inline __m256 load8(const uint16_t* a) { return load_h8(a); }
R3MES_F16C inline __m256 load8(const int8_t* a) { return load_i8x8(a); }
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return half_to_float(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }

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

R3MES_F16C float dora_dot_i8_avx2(const float* x, const int8_t* a, std::size_t k) {
  return dot(x, a, k);
}

}  // namespace r3mes
