// AVX-512 DoRA kernels: the fused epilogue over full 16-row tiles (one zmm of
// outputs; fp16 adapters converted with vcvtph2ps), and the A-pass dot
// products. Partial tiles at range edges go through the scalar spec.
#include <immintrin.h>

#include "dora/dora.h"

namespace r3mes {
namespace {

template <DoraStorage S>
inline __m512 load_bt(const DoraAdapter& ad, std::size_t off) {
  if constexpr (S == DoraStorage::F16) {
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ad.bt16.data() + off)));
  } else if constexpr (S == DoraStorage::I8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(ad.bt8.data() + off))));
  } else {
    return _mm512_loadu_ps(ad.bt32.data() + off);
  }
}

// u[l] = sum_j z[j] * B[16 t + l, j] for the 16 rows of tile t.
template <DoraStorage S>
inline __m512 low_rank(const DoraAdapter& ad, const float* z, std::size_t t) {
  const std::size_t off = t * ad.rank * kDoraTile;
  __m512 u0 = _mm512_setzero_ps(), u1 = _mm512_setzero_ps();
  std::size_t j = 0;
  // Two chains hide the FMA latency.
  for (; j + 2 <= ad.rank; j += 2) {
    u0 = _mm512_fmadd_ps(_mm512_set1_ps(z[j]), load_bt<S>(ad, off + j * kDoraTile), u0);
    u1 = _mm512_fmadd_ps(_mm512_set1_ps(z[j + 1]), load_bt<S>(ad, off + (j + 1) * kDoraTile),
                         u1);
  }
  if (j < ad.rank)
    u0 = _mm512_fmadd_ps(_mm512_set1_ps(z[j]), load_bt<S>(ad, off + j * kDoraTile), u0);
  return _mm512_add_ps(u0, u1);
}

void tiles(const DoraMix& p, std::size_t v0, std::size_t v1) {
  for (std::size_t m = 0; m < p.M; ++m) {
    float* y = p.out + m * p.N;
    const uint32_t a0 = p.act_start[m], a1 = p.act_start[m + 1];
    if (a0 == a1 && p.bias == nullptr) continue;
    const float* zm = p.z.data() + m * p.z_cols;
    for (std::size_t nb = v0; nb < v1; nb += kDoraTile) {
      const __m512 base = _mm512_loadu_ps(y + nb);
      __m512 acc = a0 == a1 ? base : _mm512_mul_ps(_mm512_set1_ps(p.base_w[m]), base);
      for (uint32_t a = a0; a < a1; ++a) {
        const DoraAdapter& ad = *p.adapters[p.act_e[a]];
        const float* z = zm + p.z_off[p.act_e[a]];
        const std::size_t t = nb / kDoraTile;
        const __m512 u = ad.storage == DoraStorage::F16  ? low_rank<DoraStorage::F16>(ad, z, t)
                         : ad.storage == DoraStorage::I8 ? low_rank<DoraStorage::I8>(ad, z, t)
                                                         : low_rank<DoraStorage::F32>(ad, z, t);
        const __m512 v = _mm512_fmadd_ps(u, _mm512_set1_ps(ad.coef), base);
        const __m512 gw = _mm512_mul_ps(_mm512_loadu_ps(ad.g.data() + nb), _mm512_set1_ps(p.act_w[a]));
        acc = _mm512_fmadd_ps(gw, v, acc);
      }
      if (p.bias != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p.bias + nb));
      _mm512_storeu_ps(y + nb, acc);
    }
  }
}

}  // namespace

void dora_epilogue_rows_avx512(const DoraMix& p, std::size_t n0, std::size_t n1) {
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

// A row of A as float32 or as fp16 (converted on load); masked loads for the tail.
inline __m512 load16(const float* a) { return _mm512_loadu_ps(a); }
inline __m512 load16(const uint16_t* a) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}
inline __m512 load16_masked(__mmask16 m, const float* a) { return _mm512_maskz_loadu_ps(m, a); }
inline __m512 load16_masked(__mmask16 m, const uint16_t* a) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, a));
}
inline __m512 load16(const int8_t* a) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))));
}
inline __m512 load16_masked(__mmask16 m, const int8_t* a) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, a)));
}

template <class T>
float dot(const float* x, const T* a, std::size_t k) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
         s3 = _mm512_setzero_ps();
  std::size_t i = 0;
  for (; i + 64 <= k; i += 64) {
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

float dora_dot_i8_avx512(const float* x, const int8_t* a, std::size_t k) { return dot(x, a, k); }

}  // namespace r3mes
