#pragma once
// DoRA on the ternary base (see DESIGN.md, "DoRA contract"): factored row
// norms and the fused multi-expert epilogue.
//
// For adapters e with A_e [r_e, K], B_e [N, r_e], scaling s_e and
// g_e = m_e / ||W0 + s_e B_e A_e||_row, and per-token mix weights w[m, e]
// (normalised to sum 1 by the caller), the fused layer computes
//
//   y[m, n] = sum_e w[m,e] g_e[n] (base[m, n] + s_e B_e[n] . z_e[m]) + bias[n]
//   z_e[m]  = A_e x_m                               (the "A pass", rank r_e)
//   base    = (q . T^T) / (s_x s_w)                 (one ternary GEMM for all e)
//
// which equals (sum_e w g_e) (.) W0 x + sum_e (w g_e s_e) (.) B_e (A_e x). A
// token with no expert (all w = 0) gets base + bias. An optional per-token
// base weight b[m] adds b[m] * base (a mix entry "no adapter", used when an
// expert does not cover this layer).
//
// The kernel computes it in that second form, with each adapter's gain folded into its
// B at load (G_e = g_e (.) B_e, stored in B's place) and the base output's factor
//
//   c[m, n] = b[m] + sum_e w[m,e] g_e[n]          (1 for a token with no expert)
//
// either summed from the g_e as the epilogue goes, or read from a table made once for a
// mix that stays the same over many calls (a query's decode: dora_base_factor), so that
// decode reads one float a row for the base instead of one per adapter:
//
//   y[m, n] = c[m, n] base[m, n] + sum_e (w[m,e] s_e) G_e[n] . z_e[m] + bias[n]
//
// Adapter storage for the kernel ("merge" step, done once at load)
// -----------------------------------------------------------------
// "B" below is G = g (.) B, the gain folded in. A is kept row-major [r, K]. B is kept
// transposed and tiled by 16 output
// rows, so one 16-row block of outputs reads one contiguous run per adapter:
//
//   bt[(t * r + j) * 16 + l] = B[16 t + l, j]      (rows >= N zero-padded)
//
// Storage is fp32 (exact path) or fp16. fp16 halves the adapter bytes, which
// matter at decode: three r=16 experts at 2560x6912 are ~0.9 MB in fp16
// against 4.4 MB of 2-bit weights. fp16 values are pre-scaled by a power of
// two (a_scale = 2^ceil(log2 max|A|), the same for B) so they use the full
// fp16 range; the scales are folded into `coef`:
//   A = a_scale * A16, B = b_scale * B16, coef = s * a_scale * b_scale.
// AVX2 converts with F16C (every AVX2 CPU has it), AVX-512 with vcvtph2ps.
//
// int8 storage halves the bytes again (a quarter of fp32): symmetric absmax int8
// with one scale per row of A and one per column of B,
//   A[j, k] = sa[j] * A8[j, k],  sa[j] = max_k |A[j, k]| / 127
//   B[n, j] = sb[j] * B8[n, j],  sb[j] = max_n |B[n, j]| / 127
// so both scales belong to rank index j and are folded into z once per token:
//   z[j] = (sa[j] sb[j]) * (A8[j] . x),   u[n] = sum_j B8[n, j] z[j]
// (coef = s). Rounding is to nearest even, values clamped to [-127, 127]; an all-zero
// row/column gets scale 1.
//
// The int8 epilogue multiplies in integers: z (a token's rank-r vector for one adapter)
// is put on an int16 grid with one scale, z16[j] = round_half_even(z[j] / sz),
// sz = max_j |z[j]| / Q (see quantize_z16), and
//   u[n] = sz * sum_j B8[n, j] z16[j]       (the sum exact in int32)
// is one vpdpwssd / vpmaddwd per two ranks and 16 rows instead of a convert and an FMA
// per rank and row. The grid step is max|z| / 32767: the update term moves by at most
// 2^-16 of its largest input, far below the int8 rounding of A and B themselves.
// The int8 A pass runs in integers as well: a token's x is put on an int16 grid once per
// call, x16[k] = round_half_even(x[k] * (32767 / max|x|)), sx = max|x| / 32767, and
//   z[j] = float(sum_k A8[j, k] x16[k]) * (sa[j] sb[j] * sx)   (the sum exact, int64)
// which is one vpdpwssd per 32 weights of A instead of two converts and an FMA per 16:
// the A pass of a decode step had been its largest DoRA cost. The same bound holds: x
// moves by at most 2^-16 of max|x|, against A's own int8 step of 2^-8 of its row max.
// int8 B is laid out for those pairwise products (rank padded to even, rank2):
//
//   bt8[((t * rank2 / 2 + i) * 16 + l) * 2 + h] = B8[16 t + l, 2 i + h]
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/aligned_vector.h"
#include "common/cpu_features.h"
#include "common/half.h"  // float_to_half, half_to_float
#include "ternary/ternary.h"

namespace pybind11 {
class module_;
}

namespace r3mes {

constexpr std::size_t kDoraTile = 16;
// The int16 grids of the int8 path (x per token, z per token and adapter) treat a vector
// whose largest magnitude is below this as zero: 32767 / max would overflow float.
constexpr float kX16Floor = 1e-30f;


enum class DoraStorage { F32, F16, I8 };

DoraStorage parse_dora_storage(const std::string& name);  // "fp32" | "fp16" | "int8"
const char* dora_storage_name(DoraStorage s);

// A typed view of part of an adapter's storage buffer.
template <class T>
struct Span {
  T* ptr = nullptr;
  std::size_t n = 0;
  T* data() const { return ptr; }
  std::size_t size() const { return n; }
  T& operator[](std::size_t i) const { return ptr[i]; }
  T* begin() const { return ptr; }
  T* end() const { return ptr + n; }
};

// Everything an adapter's kernel form reads lives in one buffer from the huge-page arena
// (common/huge_pages.h): decode reads it with the weights on every token, and on 4 KiB
// pages its ~45 pages per adapter would each cost a TLB walk per token. Copies share it.
struct DoraAdapter {
  std::size_t rank = 0, in = 0, out = 0, out_padded = 0;
  std::size_t rank2 = 0;            // rank rounded up to even (int8 B layout)
  DoraStorage storage = DoraStorage::F32;
  std::shared_ptr<uint8_t> buffer;  // owns the spans below
  Span<uint16_t> a16, bt16;         // fp16 storage
  Span<float> a32, bt32;            // fp32 storage
  Span<int8_t> a8, bt8;             // int8 storage
  Span<float> z_scale;              // int8: [rank] sa[j] * sb[j]
  Span<float> g;                    // [out_padded], zero-padded
  float coef = 0.0f;                // s * a_scale * b_scale
  float scaling = 0.0f, a_scale = 1.0f, b_scale = 1.0f;

  std::size_t nbytes() const {
    return a16.size() * 2 + bt16.size() * 2 + a8.size() + bt8.size() +
           (a32.size() + bt32.size() + g.size() + z_scale.size()) * 4;
  }
};

// Builds the kernel form of one adapter. lora_a [rank, in], lora_b [out, rank],
// g [out]. Throws std::invalid_argument on non-finite input.
DoraAdapter make_dora_adapter(const float* lora_a, const float* lora_b, const float* g,
                              std::size_t rank, std::size_t in, std::size_t out, float scaling,
                              DoraStorage storage);

// The int16 grid of an int8 adapter's z (see above): writes z16[0, rank2) (the padding
// rank as 0) and returns sz (0, with z16 = 0, when max|z| < kX16Floor). Q keeps
// rank2 * 127 * Q < 2^31, so the epilogue's int32 sums cannot overflow.
float quantize_z16(const float* z, std::size_t rank, std::size_t rank2, int16_t* z16);

// The base output's factor c (see above) of every row of a mix: [mix_rows, out]. mix
// [mix_rows, E]; base_weight [mix_rows] or nullptr; the adapters all of one shape.
std::vector<float> dora_base_factor(const std::vector<const DoraAdapter*>& adapters,
                                    const float* mix, const float* base_weight,
                                    std::size_t mix_rows);

// Everything the epilogue needs for one call (built by dora_linear).
struct DoraMix {
  std::size_t M = 0, N = 0;
  float* out = nullptr;           // [M, N]: holds base on entry, y on exit
  const float* bias = nullptr;    // [N] or nullptr
  const DoraAdapter* const* adapters = nullptr;
  std::vector<uint32_t> act_start;  // [M + 1]: token m's entries are [act_start[m], act_start[m+1])
  std::vector<uint32_t> act_e;      // adapter index of each entry
  std::vector<float> act_w;         // its mix weight
  std::vector<float> base_w;        // [M]: weight of the bare base output in the mix
  // c from dora_base_factor ([1 or M, N]) or nullptr: the epilogue sums it from the g_e.
  const float* base_factor = nullptr;
  std::size_t base_factor_rows = 1;
  std::vector<std::size_t> z_off;   // [E]: column offset of adapter e in z
  std::size_t z_cols = 0;           // sum of ranks
  std::vector<float> z;             // [M, z_cols]: A_e x_m (fp16 path: A16 x_m)
  // Each mix entry's z on the int16 grid (int8 adapters; rank2 wide, the padding rank 0)
  // and its sz: made once per call, after the A pass (finish_a_pass), by whichever worker
  // finishes the A pass last, so every epilogue call reads the same grid.
  std::vector<std::size_t> z16_off;  // [entries]
  std::vector<int16_t> z16;
  std::vector<float> z16_scale;      // [entries]
  // What the SIMD epilogues read of each mix entry on every tile, made with z16: where its
  // B's tiles start and end, the bytes of one tile, its rank (rank2 for int8), its z (the
  // int16 grid for int8 storage) and the update's scale w * coef (* sz for int8).
  struct Entry {
    const uint8_t* bt = nullptr;
    const uint8_t* bt_end = nullptr;
    std::size_t tile_bytes = 0, rank = 0;
    DoraStorage storage = DoraStorage::F32;
    const void* z = nullptr;
    float scale = 0.0f;
  };
  std::vector<Entry> entries;        // [entries]
  void finish_a_pass();
  // Token m's row of base_factor, or nullptr when the epilogue sums c from the gains.
  const float* factor_row(std::size_t m) const {
    return base_factor == nullptr ? nullptr : base_factor + (base_factor_rows == 1 ? 0 : m) * N;
  }
  // c[m, n] of a token with at least one mix entry.
  float factor(std::size_t m, std::size_t n) const;
};

// Per-ISA epilogue over output rows [n0, n1) for all tokens.
void dora_epilogue_rows_scalar(const DoraMix& p, std::size_t n0, std::size_t n1);
// How the SIMD epilogues split a row range: tiles(v0, v1) on its whole 16-row tiles, the
// scalar spec on the partial tiles at either edge.
template <class Tiles>
static inline void dora_epilogue_by_tiles(const DoraMix& p, std::size_t n0, std::size_t n1,
                                   Tiles&& tiles) {
  const std::size_t v0 = (n0 + kDoraTile - 1) / kDoraTile * kDoraTile;
  const std::size_t v1 = n1 / kDoraTile * kDoraTile;
  if (v0 >= v1) {
    dora_epilogue_rows_scalar(p, n0, n1);
    return;
  }
  if (n0 < v0) dora_epilogue_rows_scalar(p, n0, v0);
  tiles(v0, v1);
  if (v1 < n1) dora_epilogue_rows_scalar(p, v1, n1);
}
namespace isa_avx2 {
void dora_epilogue_rows_avx2(const DoraMix& p, std::size_t n0, std::size_t n1);
}
namespace isa_avx512 {
void dora_epilogue_rows_avx512(const DoraMix& p, std::size_t n0, std::size_t n1);
}
namespace isa_avx512vnni {
void dora_epilogue_rows_avx512vnni(const DoraMix& p, std::size_t n0, std::size_t n1);
}

// Per-ISA dot products of a float row with an fp32 / fp16 / int8 row of length k.
float dora_dot_f32_scalar(const float* x, const float* a, std::size_t k);
float dora_dot_f16_scalar(const float* x, const uint16_t* a, std::size_t k);
namespace isa_avx2 {
float dora_dot_f32_avx2(const float* x, const float* a, std::size_t k);
}
namespace isa_avx2 {
float dora_dot_f16_avx2(const float* x, const uint16_t* a, std::size_t k);
}
namespace isa_avx512 {
float dora_dot_f32_avx512(const float* x, const float* a, std::size_t k);
}
namespace isa_avx512 {
float dora_dot_f16_avx512(const float* x, const uint16_t* a, std::size_t k);
}

// The int8 A pass: out[r] = exact sum_k a[r * lda + k] x16[k] for `rows` int8 rows and one
// int16 row (the SIMD kernels take four rows at once, sharing each load of x16), and the
// int16 grid of a float row (x16[k] = round_half_even(x[k] * inv), |x[k] * inv| <= 32767).
// A token with max|x| below kX16Floor gets x16 = 0.

void dora_dot_i8x16_rows_scalar(const int8_t* a, std::size_t lda, std::size_t rows,
                                const int16_t* x16, std::size_t k, int64_t* out);
namespace isa_avx2 {
void dora_dot_i8x16_rows_avx2(const int8_t* a, std::size_t lda, std::size_t rows,
                              const int16_t* x16, std::size_t k, int64_t* out);
}
namespace isa_avx512 {
void dora_dot_i8x16_rows_avx512(const int8_t* a, std::size_t lda, std::size_t rows,
                                const int16_t* x16, std::size_t k, int64_t* out);
}
namespace isa_avx512vnni {
void dora_dot_i8x16_rows_avx512vnni(const int8_t* a, std::size_t lda, std::size_t rows,
                                    const int16_t* x16, std::size_t k, int64_t* out);
}
void dora_quantize_x16_scalar(const float* x, std::size_t k, float inv, int16_t* x16);
namespace isa_avx2 {
void dora_quantize_x16_avx2(const float* x, std::size_t k, float inv, int16_t* x16);
}
namespace isa_avx512 {
void dora_quantize_x16_avx512(const float* x, std::size_t k, float inv, int16_t* x16);
}

// One fused DoRA product made ready for ternary_gemm / ternary_gemm_multi: the
// activations quantised, the A pass hooked in as the GEMM's prologue (same pool
// hand-off, before any epilogue) and the epilogue hooked into `args`. It owns
// the buffers `args` points to, so it must stay in place (not copied or moved) until
// the GEMM has run.
class DoraCall {
 public:
  DoraCall() = default;
  DoraCall(const DoraCall&) = delete;
  DoraCall& operator=(const DoraCall&) = delete;
  // Arguments as dora_linear's. Returns false if x holds NaN/Inf. same_input: a call
  // prepared before this one on the same x (M, K), to run in the same GEMM (q, k and v of
  // a layer): its quantised activations (int8, and the int16 grid with its scales) are
  // used instead of made again, and the GEMM then also shares their packed copies.
  // rows_later: x is not read here (it may not hold its values yet); the caller runs
  // quantize_rows over all M rows, in any split, before the GEMM.
  bool prepare(const float* x, std::size_t M, std::size_t K, const uint8_t* packed,
               std::size_t N, float w_scale, const float* bias,
               const std::vector<const DoraAdapter*>& adapters, const float* mix,
               const float* base_weight, std::size_t mix_rows, float* out, SimdLevel level,
               const float* base_factor = nullptr, const DoraCall* same_input = nullptr,
               bool rows_later = false);
  // Rows [r0, r1) of x quantised for this call (what it shares with same_input is left to
  // that call); calls on disjoint rows may run at once. Returns false if they hold NaN/Inf.
  bool quantize_rows(std::size_t r0, std::size_t r1);
  GemmArgs args{};

 private:
  static void a_pass_task(void* ctx, std::size_t task);
  static void a_pass_finish(void* ctx);

  DoraMix mix_;
  // The A pass (run as prologue tasks of a_grain_ rows of z each).
  const float* mix_ptr_ = nullptr;
  std::size_t mix_rows_ = 1, a_rows_ = 0, a_grain_ = 1, a_tasks_ = 0;
  std::vector<std::size_t> row_adapter_;
  float (*dot32_)(const float*, const float*, std::size_t) = nullptr;
  float (*dot16_)(const float*, const uint16_t*, std::size_t) = nullptr;
  void (*dot8_)(const int8_t* a, std::size_t lda, std::size_t rows, const int16_t* x16,
                std::size_t k, int64_t* out) = nullptr;
  // x on the int16 grid (int8 adapters in the mix): [M, K], or for one token [a_tasks_, K],
  // a copy per A-pass task.
  std::vector<int16_t> x16_;
  std::vector<float> x16_scale_;  // [M]: sx
  std::vector<float> x16_inv_;    // [M]: 1 / sx (0 for a token below kX16Floor)
  // What the A pass and the GEMM read: this call's buffers, or same_input's. x16_grid_ is
  // null for one token (each A-pass task then makes its own copy in x16_).
  const int16_t* x16_grid_ = nullptr;
  const float* x16_scale_of_ = nullptr;
  const float* x16_inv_of_ = nullptr;
  const float* input_ = nullptr;  // x: the activations below are made from it; the A pass reads it
  std::size_t input_m_ = 0, input_k_ = 0;
  bool owns_q_ = false, owns_x16_ = false;  // made by this call's quantize_rows
  SimdLevel level_ = SimdLevel::Scalar;
  float (*absmax_)(const float*, std::size_t, bool*) = nullptr;
  const int8_t* q_of_ = nullptr;
  const float* x_scale_of_ = nullptr;
  const int32_t* qsum_of_ = nullptr;
  void (*quant_x16_)(const float*, std::size_t, float, int16_t*) = nullptr;
  std::vector<const DoraAdapter*> adapters_;
  AlignedVector<int8_t> q_;  // read 64 bytes at a time by the GEMM (common/aligned_vector.h)
  std::vector<float> x_scale_;
  std::vector<int32_t> qsum_;
};

// y [M, N] = the fused DoRA mix of x [M, K] (see above). mix is [mix_rows, E]
// with mix_rows == 1 (same mix for every token) or M; base_weight (nullable) is
// [mix_rows]; base_factor (nullable) is dora_base_factor of this same mix. Returns false
// if x holds NaN/Inf.
bool dora_linear(const float* x, std::size_t M, std::size_t K, const uint8_t* packed,
                 std::size_t N, float w_scale, const float* bias,
                 const std::vector<const DoraAdapter*>& adapters, const float* mix,
                 const float* base_weight, std::size_t mix_rows, float* out, SimdLevel level,
                 const float* base_factor = nullptr);

// out [N, R] = T . a^T with T the ternary values (not divided by s_w), a [R, K]
// float32, accumulated in float32: the exact-in-float ternary x float product.
void ternary_float_matmul(const uint8_t* packed, std::size_t N, std::size_t K, const float* a,
                          std::size_t R, float* out, SimdLevel level);

// Factored DoRA row norms, float64 [N]:
//   ||W0_n + s B_n A||^2 = nnz_n / s_w^2 + 2 s B_n . (W0 A^T)_n + s^2 B_n (A A^T) B_n^T
// without forming the N x K matrix.
void dora_row_norms(const uint8_t* packed, std::size_t N, std::size_t K, float w_scale,
                    const float* lora_a, std::size_t rank, const float* lora_b, float scaling,
                    double* norms, SimdLevel level);

void register_dora_bindings(pybind11::module_& mod);  // dora_bindings.cpp

}  // namespace r3mes
