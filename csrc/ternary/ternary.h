#pragma once
// Ternary (BitNet b1.58) kernels: int8 activation quantisation, 2-bit weight
// packing, and ternary x int8 GEMV/GEMM with the float scale epilogue.
//
// Packed weight layout ("r3mes-2bit-g256", row-major, one row after another)
// ---------------------------------------------------------------------------
// Each weight w in {-1, 0, +1} is stored as the 2-bit code c = w + 1 in {0,1,2}.
// A row of K weights is padded with zeros (code 1) to Kp = ceil(K/256)*256 and
// cut into groups of 256 weights = 64 bytes. Inside a group, the 64 bytes are
// two 32-byte blocks (half h = 0, 1) of 128 weights each:
//
//   byte (32h + j), bits [2p, 2p+1]  <-  c[k = 256g + 128h + 32p + j]
//        j = 0..31, p = 0..3
//
//   byte j of a block:  | c[96+j] | c[64+j] | c[32+j] | c[j] |   (msb .. lsb)
//
// so shifting a 32-byte block right by 2p and masking with 3 yields the codes
// of 32 *consecutive* weights: an AVX2 register decodes against a plain load
// of the activations. An AVX-512 register holds both blocks of a group; its
// activations are reordered once per token (see permute_activations_g256).
//
// The dot product uses the codes directly, as unsigned bytes:
//   sum_k w_k q_k = sum_k c_k q_k - sum_k q_k
// which is what u8 x s8 instructions (vpmaddubsw, vpdpbusd) compute; sum q is
// computed once per token. Padding weights multiply padded activations = 0.
#include <cstddef>
#include <cstdint>

#include "common/cpu_features.h"

namespace r3mes {

constexpr int kGroupWeights = 256;
constexpr int kGroupBytes = 64;
// Decode streams weights: the kernels prefetch (into L2) the row tile this many tiles
// ahead of the one being computed. Rows are only K/4 bytes, too short for the hardware
// prefetcher to ramp up. Measured at 2560x6912 on 2 threads from DRAM, as a fraction of
// a read-only sum measured alongside: no prefetch 55%, 1 tile ahead into L1 79%, 2 tiles
// into L2 89-90%, 3 tiles 92%, 4 tiles 91-92% (and the Python code around the call
// 30-40 us faster: fewer of its lines are evicted), 8 tiles 84%. prefetchnta (L1 only,
// sparing L2/L3) made the kernel 45% slower. The AVX-512 kernels also pull the next tile
// from L2 into L1 (T0): 210-226 us -> 192-206 us in A/B runs alternated on the same
// machine (1, 2 or 3 tiles ahead: equal).
constexpr std::size_t kPrefetchTiles = 4;
// Products of up to this many tokens (a decode step of a batch of rows) stream their
// weights too: the first token tile of each row tile prefetches ahead, and the other token
// tiles of that row tile read the weights back from L1/L2. Without it a decode batch of 2
// ran slower in aggregate than one row alone (2B-4T shape, 2 threads: 27.6 vs 32.9 tok/s).
constexpr std::size_t kStreamTokens = 16;
#define R3MES_WEIGHT_PREFETCH_HINT _MM_HINT_T1

static inline std::size_t padded_k(std::size_t k) {
  return (k + kGroupWeights - 1) / kGroupWeights * kGroupWeights;
}
static inline std::size_t packed_row_bytes(std::size_t k) { return padded_k(k) / 4; }

// ---- activation quantisation (per token absmax -> int8) -------------------
// scale = 127 / max(max|x|, 1e-5); q = clamp(round_half_even(x*scale), -128, 127).
// Writes q [rows, q_stride] (columns >= k zero-filled up to q_stride), scale
// [rows] and the int32 sum of q per row. Returns false if x holds NaN or Inf.
bool quantize_activations(const float* x, std::size_t rows, std::size_t k, int8_t* q,
                          std::size_t q_stride, float* scale, int32_t* qsum, SimdLevel level);

// ---- weight packing -------------------------------------------------------
// Packs int8 ternary values t [n, k] (each in {-1,0,1}); returns false if a
// value is outside that set.
bool pack_ternary(const int8_t* t, std::size_t n, std::size_t k, uint8_t* packed);
// Quantises float weights with the given absmean scale (t = clamp(round(w*scale),
// -1, 1)) and packs them. Returns false on NaN/Inf weights.
bool quantize_pack_ternary(const float* w, std::size_t n, std::size_t k, float scale,
                           uint8_t* packed);
void unpack_ternary(const uint8_t* packed, std::size_t n, std::size_t k, int8_t* t);

// ---- ternary GEMM ---------------------------------------------------------
// acc[m, n] = sum_k t[n, k] * q[m, k] for m < M, n < N, with q rows of stride
// padded_k(K) (zero-padded). If out_f32 is given, writes
// out_f32[m, n] = float(acc) / (x_scale[m] * w_scale) (+ bias[n]) instead of
// acc. Multi-threaded over output rows.
struct GemmArgs {
  const uint8_t* packed;
  const int8_t* q;
  const int32_t* qsum;
  std::size_t M, N, K;
  int32_t* out_i32;        // [M, N] or nullptr
  float* out_f32;          // [M, N] or nullptr
  const float* x_scale;    // [M], with out_f32
  float w_scale;           // with out_f32
  const float* bias;       // [N] or nullptr
  // Optional epilogue hook: each worker calls epilogue(epilogue_ctx, n0, n1)
  // on the row range [n0, n1) it has just finished (all M tokens), while those
  // outputs are still in its cache. Used by the fused DoRA mix. It must not
  // call parallel_for (the pool is not re-entrant). Null: no hook.
  void (*epilogue)(void* ctx, std::size_t n0, std::size_t n1) = nullptr;
  void* epilogue_ctx = nullptr;
  // Optional prologue, run in the same pool hand-off: prologue(prologue_ctx, i) for
  // i < prologue_tasks, all finished before this product's first epilogue call (the
  // fused DoRA mix computes its A pass here). A worker runs one unclaimed task at the
  // start of each of the product's row chunks, and any still unclaimed at the chunk's end
  // before it waits for the rest, so it never waits on itself. Best with one task a
  // worker (the first chunk of each runs one).
  std::size_t prologue_tasks = 0;
  void (*prologue)(void* ctx, std::size_t task) = nullptr;
  void* prologue_ctx = nullptr;
  // Optional: run once, by the worker that finishes the last prologue task, before any
  // epilogue call.
  void (*prologue_finish)(void* ctx) = nullptr;
  // The AMX kernel's activations (set by ternary_gemm_multi; see ternary/amx.h).
  const int32_t* q_quads = nullptr;
  std::size_t m_pad = 0;
};
void ternary_gemm(const GemmArgs& args, SimdLevel level);
// Several independent products in one pool hand-off (a decode layer's q, k and v, or
// gate and up): the same results as calling ternary_gemm on each, bit for bit.
void ternary_gemm_multi(const GemmArgs* products, std::size_t count, SimdLevel level);

// Per-ISA row-range kernels: rows [n0, n1) for all M tokens. q is in the
// layout the ISA expects (natural for scalar/avx2, g256-permuted for avx512*).
using GemmRowsFn = void (*)(const GemmArgs& args, std::size_t n0, std::size_t n1);
void ternary_gemm_rows_scalar(const GemmArgs& args, std::size_t n0, std::size_t n1);
namespace isa_avx2 {
void ternary_gemm_rows_avx2(const GemmArgs& args, std::size_t n0, std::size_t n1);
}
namespace isa_avx512 {
void ternary_gemm_rows_avx512(const GemmArgs& args, std::size_t n0, std::size_t n1);
}
namespace isa_avx512vnni {
void ternary_gemm_rows_avx512vnni(const GemmArgs& args, std::size_t n0, std::size_t n1);
}

// Per-ISA activation quantisation of one row (returns the absmax, NaN/Inf
// reported through `finite`).
float absmax_scalar(const float* x, std::size_t k, bool* finite);
namespace isa_avx2 {
float absmax_avx2(const float* x, std::size_t k, bool* finite);
}
namespace isa_avx512 {
float absmax_avx512(const float* x, std::size_t k, bool* finite);
}
int32_t quantize_row_scalar(const float* x, std::size_t k, float scale, int8_t* q);
namespace isa_avx2 {
int32_t quantize_row_avx2(const float* x, std::size_t k, float scale, int8_t* q);
}
namespace isa_avx512 {
int32_t quantize_row_avx512(const float* x, std::size_t k, float scale, int8_t* q);
}

// Reorders each 256-group of an int8 row from natural order to the order an
// AVX-512 register of codes has: [h0 p0 | h1 p0 | h0 p1 | h1 p1 | ...] in 32s.
void permute_activations_g256(const int8_t* src, int8_t* dst, std::size_t kp);

// Shared epilogue: one output element.
// Helpers here are static: ISA-flagged files include this header, and an inline (weak)
// copy compiled for AVX-512 could be the one the linker keeps for baseline callers.
static inline void store_output(const GemmArgs& a, std::size_t m, std::size_t n, int32_t acc) {
  if (a.out_f32 != nullptr) {
    float y = static_cast<float>(acc) / (a.x_scale[m] * a.w_scale);
    if (a.bias != nullptr) y += a.bias[n];
    a.out_f32[m * a.N + n] = y;
  } else {
    a.out_i32[m * a.N + n] = acc;
  }
}

}  // namespace r3mes
