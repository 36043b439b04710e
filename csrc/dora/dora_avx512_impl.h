#pragma once
// AVX-512 DoRA kernels shared by the avx512 and avx512vnni translation units: the fused
// epilogue over full 16-row tiles (one zmm of outputs; fp16 adapters converted with
// vcvtph2ps, int8 adapters multiplied in int16 x int8 pairs; partial tiles at range edges
// go through the scalar spec) and the int8 A pass. Pair is how each unit compiles the
// int16 pair product (vpmaddwd + vpaddd, or vpdpwssd). Internal linkage: the two copies
// never mix.
#include <immintrin.h>

#include <algorithm>

#include "dora/dora.h"

namespace r3mes {
namespace {

template <DoraStorage S>
inline __m512 load_bt(const DoraAdapter& ad, std::size_t off) {
  if constexpr (S == DoraStorage::F16) {
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ad.bt16.data() + off)));
  } else {
    return _mm512_loadu_ps(ad.bt32.data() + off);
  }
}

// u[l] = sum_j z[j] * B[16 t + l, j] for the 16 rows of tile t (fp32 / fp16 storage).
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

// int8 storage: sum_j B8[16 t + l, j] z16[j] exactly, as int32, for the 16 rows of one
// tile, b pointing at the tile (rank2 / 2 = pairs runs of 32 bytes, each two ranks of the 16
// rows interleaved: see dora.h).
template <class Pair>
inline __m512i low_rank_i8(const int8_t* b, const int16_t* z16, std::size_t pairs) {
  __m512i u0 = _mm512_setzero_si512(), u1 = _mm512_setzero_si512();
  std::size_t i = 0;
  for (; i + 2 <= pairs; i += 2) {
    int32_t z0, z1;
    std::memcpy(&z0, z16 + 2 * i, 4);
    std::memcpy(&z1, z16 + 2 * i + 2, 4);
    u0 = Pair::dot(u0, _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                           reinterpret_cast<const __m256i*>(b + i * 2 * kDoraTile))),
                   _mm512_set1_epi32(z0));
    u1 = Pair::dot(u1, _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                           reinterpret_cast<const __m256i*>(b + (i + 1) * 2 * kDoraTile))),
                   _mm512_set1_epi32(z1));
  }
  if (i < pairs) {
    int32_t z0;
    std::memcpy(&z0, z16 + 2 * i, 4);
    u0 = Pair::dot(u0, _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                           reinterpret_cast<const __m256i*>(b + i * 2 * kDoraTile))),
                   _mm512_set1_epi32(z0));
  }
  return _mm512_add_epi32(u0, u1);
}

// The same for a rank known at compile time (16: 8 pairs), fully unrolled.
template <class Pair, std::size_t kPairs>
inline __m512i low_rank_i8_fixed(const int8_t* b, const int16_t* z16) {
  __m512i u[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                  _mm512_setzero_si512()};
  for (std::size_t i = 0; i < kPairs; ++i) {
    int32_t zp;
    std::memcpy(&zp, z16 + 2 * i, 4);
    u[i % 4] = Pair::dot(u[i % 4], _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                       reinterpret_cast<const __m256i*>(b + i * 2 * kDoraTile))),
                         _mm512_set1_epi32(zp));
  }
  return _mm512_add_epi32(_mm512_add_epi32(u[0], u[1]), _mm512_add_epi32(u[2], u[3]));
}

template <class Pair>
inline __m512i low_rank_i8(const DoraAdapter& ad, const int16_t* z16, std::size_t t) {
  return low_rank_i8<Pair>(ad.bt8.data() + t * ad.rank2 * kDoraTile, z16, ad.rank2 / 2);
}

// The epilogue reads each adapter's B (and gain) tiles in order, one short run per tile:
// fetching them this many tiles ahead keeps its reads in flight while it multiplies
// (measured at 2560x6912, 3 int8 experts: 1.5 points of the fused layer's cost).
constexpr std::size_t kEpiloguePrefetchTiles = 8;

inline void prefetch_tile(const DoraMix& p, uint32_t a0, uint32_t a1, std::size_t t,
                          bool gains) {
  for (uint32_t a = a0; a < a1; ++a) {
    const DoraAdapter& ad = *p.adapters[p.act_e[a]];
    if ((t + 1) * kDoraTile > ad.out_padded) return;
    const char* b;
    std::size_t bytes;
    if (ad.storage == DoraStorage::I8) {
      b = reinterpret_cast<const char*>(ad.bt8.data() + t * ad.rank2 * kDoraTile);
      bytes = ad.rank2 * kDoraTile;
    } else if (ad.storage == DoraStorage::F16) {
      b = reinterpret_cast<const char*>(ad.bt16.data() + t * ad.rank * kDoraTile);
      bytes = ad.rank * kDoraTile * 2;
    } else {
      b = reinterpret_cast<const char*>(ad.bt32.data() + t * ad.rank * kDoraTile);
      bytes = ad.rank * kDoraTile * 4;
    }
    for (std::size_t o = 0; o < bytes; o += 64) _mm_prefetch(b + o, _MM_HINT_T0);
    if (gains) _mm_prefetch(reinterpret_cast<const char*>(ad.g.data() + t * kDoraTile), _MM_HINT_T0);
  }
}

// Decode's common case, a prepared mix of int8 adapters: the same sums as tiles() below,
// with every per-adapter constant (tile pointer, stride, the update's scale) taken out of
// the loop over tiles.
template <class Pair>
void tiles_int8(const DoraMix& p, std::size_t m, const float* factor, std::size_t v0,
                std::size_t v1) {
  constexpr uint32_t kMax = 8;
  const uint32_t a0 = p.act_start[m], n = p.act_start[m + 1] - a0;
  const int8_t* b[kMax];
  const int16_t* z[kMax];
  std::size_t stride[kMax], pairs[kMax], tiles_of[kMax];
  float scale[kMax];
  for (uint32_t i = 0; i < n; ++i) {
    const DoraAdapter& ad = *p.adapters[p.act_e[a0 + i]];
    stride[i] = ad.rank2 * kDoraTile;
    pairs[i] = ad.rank2 / 2;
    tiles_of[i] = ad.out_padded / kDoraTile;
    b[i] = ad.bt8.data();
    z[i] = p.z16.data() + p.z16_off[a0 + i];
    scale[i] = p.act_w[a0 + i] * ad.coef * p.z16_scale[a0 + i];
  }
  float* y = p.out + m * p.N;
  for (std::size_t nb = v0; nb < v1; nb += kDoraTile) {
    const std::size_t t = nb / kDoraTile, ahead = t + kEpiloguePrefetchTiles;
    for (uint32_t i = 0; i < n; ++i)
      if (ahead < tiles_of[i])
        for (std::size_t o = 0; o < stride[i]; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(b[i] + ahead * stride[i] + o), _MM_HINT_T0);
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(factor + nb), _mm512_loadu_ps(y + nb));
    for (uint32_t i = 0; i < n; ++i)
      acc = _mm512_fmadd_ps(
          _mm512_cvtepi32_ps(pairs[i] == 8
                                 ? low_rank_i8_fixed<Pair, 8>(b[i] + t * stride[i], z[i])
                                 : low_rank_i8<Pair>(b[i] + t * stride[i], z[i], pairs[i])),
          _mm512_set1_ps(scale[i]), acc);
    if (p.bias != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p.bias + nb));
    _mm512_storeu_ps(y + nb, acc);
  }
}

template <class Pair>
void tiles(const DoraMix& p, std::size_t v0, std::size_t v1) {
  for (std::size_t m = 0; m < p.M; ++m) {
    float* y = p.out + m * p.N;
    const uint32_t a0 = p.act_start[m], a1 = p.act_start[m + 1];
    if (a0 == a1 && p.bias == nullptr) continue;
    if (a0 != a1 && a1 - a0 <= 8 && p.factor_row(m) != nullptr &&
        std::all_of(p.act_e.begin() + a0, p.act_e.begin() + a1,
                    [&](uint32_t e) { return p.adapters[e]->storage == DoraStorage::I8; })) {
      tiles_int8<Pair>(p, m, p.factor_row(m), v0, v1);
      continue;
    }
    const float* zm = p.z.data() + m * p.z_cols;
    const float* factor = p.factor_row(m);
    for (std::size_t nb = v0; nb < v1; nb += kDoraTile) {
      prefetch_tile(p, a0, a1, nb / kDoraTile + kEpiloguePrefetchTiles, factor == nullptr);
      __m512 acc = _mm512_loadu_ps(y + nb);
      if (a0 != a1) {
        __m512 c;
        if (factor != nullptr) {
          c = _mm512_loadu_ps(factor + nb);
        } else {
          c = _mm512_set1_ps(p.base_w[m]);
          for (uint32_t a = a0; a < a1; ++a)
            c = _mm512_fmadd_ps(_mm512_set1_ps(p.act_w[a]),
                                _mm512_loadu_ps(p.adapters[p.act_e[a]]->g.data() + nb), c);
        }
        acc = _mm512_mul_ps(c, acc);
      }
      const std::size_t t = nb / kDoraTile;
      for (uint32_t a = a0; a < a1; ++a) {
        const DoraAdapter& ad = *p.adapters[p.act_e[a]];
        if (ad.storage == DoraStorage::I8) {
          const __m512 u =
              _mm512_cvtepi32_ps(low_rank_i8<Pair>(ad, p.z16.data() + p.z16_off[a], t));
          acc = _mm512_fmadd_ps(u, _mm512_set1_ps(p.act_w[a] * ad.coef * p.z16_scale[a]), acc);
        } else {
          const float* z = zm + p.z_off[p.act_e[a]];
          const __m512 u = ad.storage == DoraStorage::F16 ? low_rank<DoraStorage::F16>(ad, z, t)
                                                          : low_rank<DoraStorage::F32>(ad, z, t);
          acc = _mm512_fmadd_ps(u, _mm512_set1_ps(p.act_w[a] * ad.coef), acc);
        }
      }
      if (p.bias != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p.bias + nb));
      _mm512_storeu_ps(y + nb, acc);
    }
  }
}

template <class Pair>
void epilogue_rows(const DoraMix& p, std::size_t n0, std::size_t n1) {
  const std::size_t v0 = (n0 + kDoraTile - 1) / kDoraTile * kDoraTile;
  const std::size_t v1 = n1 / kDoraTile * kDoraTile;
  if (v0 >= v1) {
    dora_epilogue_rows_scalar(p, n0, n1);
    return;
  }
  if (n0 < v0) dora_epilogue_rows_scalar(p, n0, v0);
  tiles<Pair>(p, v0, v1);
  if (v1 < n1) dora_epilogue_rows_scalar(p, v1, n1);
}

// Exact sum_k a[k] x16[k]. Each int32 lane takes at most 2 * 4096 / 32 products of
// |127 * 32767| per block (< 2^31) before the block is widened into int64.
template <class Pair>
inline int64_t dot_i8x16(const int8_t* a, const int16_t* x16, std::size_t k) {
  constexpr std::size_t kBlock = 4096;
  constexpr int kPrefetchBytes = 1024;  // A streams from memory in short runs (see dot)
  __m512i total = _mm512_setzero_si512();
  std::size_t i = 0;
  while (i < k) {
    const std::size_t end = std::min(k, i + kBlock);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    for (; i + 64 <= end; i += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(a + i) + kPrefetchBytes, _MM_HINT_T0);
      acc0 = Pair::dot(acc0,
                       _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i))),
                       _mm512_loadu_si512(x16 + i));
      acc1 = Pair::dot(acc1,
                       _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i + 32))),
                       _mm512_loadu_si512(x16 + i + 32));
    }
    for (; i < end; i += 32) {
      const __mmask32 m = end - i >= 32 ? ~__mmask32{0} : (__mmask32{1} << (end - i)) - 1;
      acc0 = Pair::dot(acc0, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, a + i)),
                       _mm512_maskz_loadu_epi16(m, x16 + i));
    }
    const __m512i s = _mm512_add_epi32(acc0, acc1);
    total = _mm512_add_epi64(total, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(s)));
    total = _mm512_add_epi64(total, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s, 1)));
  }
  return _mm512_reduce_add_epi64(total);
}

// out[r] = exact sum_k a[r * lda + k] x16[k] for r < rows. Four rows at a time share each
// load of x16 and stream as four runs at once. Each int32 lane takes 2 * 4096 / 32 products
// of |127 * 32767| per block (< 2^31) before the block is widened into int64.
template <class Pair>
inline void dot_i8x16_rows(const int8_t* a, std::size_t lda, std::size_t rows,
                           const int16_t* x16, std::size_t k, int64_t* out) {
  constexpr std::size_t kBlock = 4096;
  std::size_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const int8_t* ar[4] = {a + r * lda, a + (r + 1) * lda, a + (r + 2) * lda, a + (r + 3) * lda};
    __m512i total[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
    std::size_t i = 0;
    while (i < k) {
      const std::size_t end = std::min(k, i + kBlock);
      __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
      for (; i + 32 <= end; i += 32) {
        const __m512i x = _mm512_loadu_si512(x16 + i);
        for (int j = 0; j < 4; ++j)
          acc[j] = Pair::dot(acc[j], _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                         reinterpret_cast<const __m256i*>(ar[j] + i))), x);
      }
      if (i < end) {
        const __mmask32 m = (__mmask32{1} << (end - i)) - 1;
        const __m512i x = _mm512_maskz_loadu_epi16(m, x16 + i);
        for (int j = 0; j < 4; ++j)
          acc[j] = Pair::dot(acc[j], _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, ar[j] + i)),
                             x);
        i = end;
      }
      for (int j = 0; j < 4; ++j) {
        const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[j]));
        const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[j], 1));
        total[j] = _mm512_add_epi64(total[j], _mm512_add_epi64(lo, hi));
      }
    }
    for (int j = 0; j < 4; ++j) out[r + j] = _mm512_reduce_add_epi64(total[j]);
  }
  for (; r < rows; ++r) out[r] = dot_i8x16<Pair>(a + r * lda, x16, k);
}

}  // namespace
}  // namespace r3mes
