// Experiment behind a design decision (issue #2: "consider a 1.6-bit packing; measure
// before you keep it"): the decode GEMV at 2560x6912 with the 2-bit layout r3mes uses
// (64 bytes = 256 weights, slices masked in place, vpdpbusd) against a 1.6-bit layout
// (64 bytes = 320 weights, 5 trits a byte, b = sum c_i 3^i; each digit decoded with two
// vpermi2b lookups into a 256-entry table), weights on 2 MiB pages rotating over 640 MB,
// 1 and 2 threads (a spinning helper thread, no pool). Not part of the package.
//
//   g++ -O3 -march=native -pthread benchmarks/experiments/tq1_gemv.cpp -o /tmp/tq1 && /tmp/tq1
//
// Result on the development VM (BENCHMARKS.md): the 1.6-bit kernel moves 20% fewer bytes
// but its decode alone (weights cached) takes longer than the 2-bit kernel streaming from
// memory, so it is slower; not kept.
#include <immintrin.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#include <algorithm>

static const int N = 6912, K = 2560;
static void* huge(size_t n) { void* p = aligned_alloc(1 << 21, (n + (1 << 21) - 1) / (1 << 21) * (1 << 21)); madvise(p, n, MADV_HUGEPAGE); memset(p, 1, n); return p; }

// ---- 2-bit: 64 bytes = 256 weights, slices masked in place (as the r3mes VNNI kernel)
static void gemv2(const uint8_t* w, const int8_t* x, int32_t* out, int n0, int n1) {
  const int rb = K / 4;
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xC0);
  for (int n = n0; n < n1; n += 4) {
    __m512i acc[4][4];
    for (int r = 0; r < 4; ++r) for (int p = 0; p < 4; ++p) acc[r][p] = _mm512_setzero_si512();
    for (int g = 0; g < K / 256; ++g) {
      __m512i x0 = _mm512_loadu_si512(x + g * 256), x1 = _mm512_loadu_si512(x + g * 256 + 64), x2 = _mm512_loadu_si512(x + g * 256 + 128), x3 = _mm512_loadu_si512(x + g * 256 + 192);
      for (int r = 0; r < 4; ++r) {
        const uint8_t* row = w + (size_t)(n + r) * rb;
        __m512i v = _mm512_loadu_si512(row + g * 64);
        _mm_prefetch((const char*)(row + 16 * rb + g * 64), _MM_HINT_T1);
        _mm_prefetch((const char*)(row + 4 * rb + g * 64), _MM_HINT_T0);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(v, m0), x0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(v, m1), x1);
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(v, m2), x2);
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(v, m3), x3);
      }
    }
    for (int r = 0; r < 4; ++r)
      out[n + r] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)), _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6))));
  }
}

// ---- 1.6-bit: 64 bytes = 320 weights; digit i of byte b via a 256-entry LUT (two vpermi2b)
alignas(64) static uint8_t lut[5][256];
static void gemv16(const uint8_t* w, const int8_t* x, int32_t* out, int n0, int n1) {
  const int kg = (K + 319) / 320, rb = kg * 64;
  __m512i t[5][4];
  for (int i = 0; i < 5; ++i) for (int q = 0; q < 4; ++q) t[i][q] = _mm512_load_si512(lut[i] + 64 * q);
  for (int n = n0; n < n1; n += 4) {
    __m512i acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_si512();
    for (int g = 0; g < kg; ++g) {
      for (int r = 0; r < 4; ++r) {
        const uint8_t* row = w + (size_t)(n + r) * rb;
        __m512i v = _mm512_loadu_si512(row + g * 64);
        _mm_prefetch((const char*)(row + 16 * rb + g * 64), _MM_HINT_T1);
        _mm_prefetch((const char*)(row + 4 * rb + g * 64), _MM_HINT_T0);
        __mmask64 hi = _mm512_movepi8_mask(v);
        for (int i = 0; i < 5; ++i) {
          __m512i c;
          c = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(t[i][0], v, t[i][1]), _mm512_permutex2var_epi8(t[i][2], v, t[i][3]));
          acc[r] = _mm512_dpbusd_epi32(acc[r], c, _mm512_loadu_si512(x + g * 320 + 64 * i));
        }
      }
    }
    for (int r = 0; r < 4; ++r) out[n + r] = _mm512_reduce_add_epi32(acc[r]);
  }
}

#include <atomic>
template <class F>
double run(F f, const std::vector<uint8_t*>& ws, const int8_t* x, int threads) {
  std::vector<int32_t> out(N);
  std::vector<double> ts;
  size_t it = 0;
  std::atomic<int> go{0}, done{0};
  std::atomic<const uint8_t*> cur{nullptr};
  std::atomic<bool> stop{false};
  std::thread helper;
  if (threads == 2)
    helper = std::thread([&] { int seen = 0; while (!stop) { int g = go.load(); if (g != seen) { seen = g; f(cur.load(), x, out.data(), N / 2, N); done.fetch_add(1); } else _mm_pause(); } });
  for (int rep = 0; rep < 600; ++rep) {
    const uint8_t* w = ws[it++ % ws.size()];
    auto t0 = std::chrono::steady_clock::now();
    if (threads == 1) f(w, x, out.data(), 0, N);
    else { int d = done.load(); cur = w; go.fetch_add(1); f(w, x, out.data(), 0, N / 2); while (done.load() == d) _mm_pause(); }
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  stop = true;
  if (helper.joinable()) helper.join();
  std::sort(ts.begin() + 100, ts.end());
  return ts[100 + (ts.size() - 100) / 2];
}

int main() {
  for (int b = 0; b < 256; ++b) { int v = b; for (int i = 0; i < 5; ++i) { lut[i][b] = b < 243 ? v % 3 : 1; v /= 3; } }
  std::mt19937 rng(1);
  std::vector<int8_t> x(3200 + 64);
  for (auto& v : x) v = (int8_t)(rng() % 255 - 127);
  const size_t b2 = (size_t)N * K / 4, b16 = (size_t)N * ((K + 319) / 320) * 64;
  std::vector<uint8_t*> w2, w16;
  for (size_t tot = 0; tot < (640u << 20); tot += b2) { auto* p = (uint8_t*)huge(b2); for (size_t i = 0; i < b2; ++i) p[i] = rng(); w2.push_back(p); }
  for (size_t tot = 0; tot < (640u << 20); tot += b16) { auto* p = (uint8_t*)huge(b16); for (size_t i = 0; i < b16; ++i) p[i] = rng() % 243; w16.push_back(p); }
  // correctness of the 1.6-bit decode on one row against a scalar decode
  { std::vector<int32_t> o(N); gemv16(w16[0], x.data(), o.data(), 0, 4); int32_t s = 0; const int kg = (K + 319) / 320; for (int g = 0; g < kg; ++g) for (int j = 0; j < 64; ++j) { int v = w16[0][g * 64 + j]; for (int i = 0; i < 5; ++i) { s += (v % 3) * x[g * 320 + 64 * i + j]; v /= 3; } } printf("1.6-bit check: %s\n", s == o[0] ? "ok" : "MISMATCH"); }
  // cached (one matrix) and streamed
  for (int th : {1, 2}) {
    std::vector<uint8_t*> one2{w2[0]}, one16{w16[0]};
    printf("threads %d: 2-bit cached %.1f us, streamed %.1f us (%zu B) | 1.6-bit cached %.1f us, streamed %.1f us (%zu B)\n", th,
           run(gemv2, one2, x.data(), th) * 1e6, run(gemv2, w2, x.data(), th) * 1e6, b2,
           run(gemv16, one16, x.data(), th) * 1e6, run(gemv16, w16, x.data(), th) * 1e6, b16);
  }
}
