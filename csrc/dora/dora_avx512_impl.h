#pragma once
// AVX-512 DoRA kernels shared by the avx512 and avx512vnni translation units: the fused
// epilogue over full 16-row tiles (one zmm of outputs; fp16 adapters converted with
// vcvtph2ps, int8 adapters multiplied in int16 x int8 pairs; partial tiles at range edges
// go through the scalar spec) and the int8 A pass. Pair is how each unit compiles the
// int16 pair product (vpmaddwd + vpaddd, or vpdpwssd). Internal linkage: the two copies
// never mix.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "dora/dora.h"

namespace r3mes {
namespace {

// u[l] = sum_j z[j] * B[16 t + l, j] for the 16 rows of one tile, b pointing at the tile
// (fp32 / fp16 storage: rank runs of 16 values).
template <class T>
inline __m512 low_rank(const T* b, const float* z, std::size_t rank) {
  auto load = [b](std::size_t j) {
    if constexpr (std::is_same_v<T, uint16_t>) {
      return _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * kDoraTile)));
    } else {
      return _mm512_loadu_ps(b + j * kDoraTile);
    }
  };
  __m512 u0 = _mm512_setzero_ps(), u1 = _mm512_setzero_ps();
  std::size_t j = 0;
  // Two chains hide the FMA latency.
  for (; j + 2 <= rank; j += 2) {
    u0 = _mm512_fmadd_ps(_mm512_set1_ps(z[j]), load(j), u0);
    u1 = _mm512_fmadd_ps(_mm512_set1_ps(z[j + 1]), load(j + 1), u1);
  }
  if (j < rank) u0 = _mm512_fmadd_ps(_mm512_set1_ps(z[j]), load(j), u0);
  return _mm512_add_ps(u0, u1);
}

// int8 storage: sum_j B8[16 t + l, j] z16[j] exactly, as int32, for the 16 rows of one
// tile, b pointing at the tile (kPairs = rank2 / 2 runs of 32 bytes, each two ranks of the
// 16 rows interleaved: see dora.h). Four chains; fully unrolled for a rank known at compile
// time (kPairs > 0), a loop otherwise (kPairs == 0, pairs given).
template <class Pair, std::size_t kPairs = 0>
inline __m512i low_rank_i8(const int8_t* b, const int16_t* z16, std::size_t pairs = kPairs) {
  __m512i u[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                  _mm512_setzero_si512()};
  auto step = [&](std::size_t i) {
    int32_t zp;
    std::memcpy(&zp, z16 + 2 * i, 4);
    u[i % 4] = Pair::dot(u[i % 4], _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                       reinterpret_cast<const __m256i*>(b + i * 2 * kDoraTile))),
                         _mm512_set1_epi32(zp));
  };
  if constexpr (kPairs > 0) {
    for (std::size_t i = 0; i < kPairs; ++i) step(i);
  } else {
    for (std::size_t i = 0; i < pairs; ++i) step(i);
  }
  return _mm512_add_epi32(_mm512_add_epi32(u[0], u[1]), _mm512_add_epi32(u[2], u[3]));
}

// The epilogue reads each adapter's B (and gain) tiles in order, one short run per tile:
// fetching them this many tiles ahead keeps its reads in flight while it multiplies
// (measured at 2560x6912, 3 int8 experts: 1.5 points of the fused layer's cost).
constexpr std::size_t kEpiloguePrefetchTiles = 8;

// Rows [v0, v1) (whole tiles) of every token: c * base + each entry's update (+ bias). Each
// entry's constants come from DoraMix::entries, made once per call.
template <class Pair>
void tiles(const DoraMix& p, std::size_t v0, std::size_t v1) {
  for (std::size_t m = 0; m < p.M; ++m) {
    float* y = p.out + m * p.N;
    const uint32_t a0 = p.act_start[m], a1 = p.act_start[m + 1];
    if (a0 == a1 && p.bias == nullptr) continue;
    const DoraMix::Entry* entries = p.entries.data();
    const float* factor = p.factor_row(m);
    for (std::size_t nb = v0; nb < v1; nb += kDoraTile) {
      const std::size_t t = nb / kDoraTile, ahead = t + kEpiloguePrefetchTiles;
      for (uint32_t a = a0; a < a1; ++a) {
        const DoraMix::Entry& e = entries[a];
        const uint8_t* next = e.bt + ahead * e.tile_bytes;
        if (next >= e.bt_end) continue;
        for (std::size_t o = 0; o < e.tile_bytes; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next + o), _MM_HINT_T0);
        if (factor == nullptr)
          _mm_prefetch(reinterpret_cast<const char*>(p.adapters[p.act_e[a]]->g.data() +
                                                     ahead * kDoraTile),
                       _MM_HINT_T0);
      }
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
      for (uint32_t a = a0; a < a1; ++a) {
        const DoraMix::Entry& e = entries[a];
        const uint8_t* b = e.bt + t * e.tile_bytes;
        __m512 u;
        if (e.storage == DoraStorage::I8) {
          const auto* b8 = reinterpret_cast<const int8_t*>(b);
          const auto* z16 = static_cast<const int16_t*>(e.z);
          u = _mm512_cvtepi32_ps(e.rank == 16 ? low_rank_i8<Pair, 8>(b8, z16)
                                              : low_rank_i8<Pair>(b8, z16, e.rank / 2));
        } else if (e.storage == DoraStorage::F16) {
          u = low_rank(reinterpret_cast<const uint16_t*>(b), static_cast<const float*>(e.z),
                       e.rank);
        } else {
          u = low_rank(reinterpret_cast<const float*>(b), static_cast<const float*>(e.z),
                       e.rank);
        }
        acc = _mm512_fmadd_ps(u, _mm512_set1_ps(e.scale), acc);
      }
      if (p.bias != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p.bias + nb));
      _mm512_storeu_ps(y + nb, acc);
    }
  }
}

template <class Pair>
void epilogue_rows(const DoraMix& p, std::size_t n0, std::size_t n1) {
  dora_epilogue_by_tiles(p, n0, n1,
                         [&](std::size_t v0, std::size_t v1) { tiles<Pair>(p, v0, v1); });
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
