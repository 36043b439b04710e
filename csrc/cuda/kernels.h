#pragma once
// Host-side launchers of the CUDA kernels. Plain C++ (no CUDA types), so the
// bindings compile with the host compiler. Every pointer is a device pointer
// unless named host_*. Launchers throw std::invalid_argument for arguments the
// bindings should have caught and std::runtime_error carrying the CUDA error
// string when a launch fails. All work is queued on `stream` (a cudaStream_t).
#include <cstddef>
#include <cstdint>

namespace r3mes::cuda {

constexpr int kMaxAdapters = 8;
// Largest K: the int32 accumulator holds sum_k c_k q_k <= 2 * 128 * Kp < 2^31.
constexpr std::int64_t kMaxInFeatures = std::int64_t{1} << 22;
// Largest M: token tiles go on gridDim.y (<= 65535) with 8 tokens a tile.
constexpr std::int64_t kMaxTokens = std::int64_t{65535} * 8;

// One DoRA adapter as the fused epilogue reads it (see dora.cuh for storage).
struct DoraAdapterDev {
  const void* a = nullptr;  // [rank, K] row-major, fp16 (half != 0) or fp32
  const void* b = nullptr;  // [N, rank] row-major, same dtype
  const float* g = nullptr; // [N]: m / ||W0 + s B A||_row
  int rank = 0;
  int half = 0;
  float coef = 0.0f;        // s * a_scale * b_scale
  int z_off = 0;            // first column of this adapter in z
};

// The fused DoRA mix (E == 0: plain ternary_linear epilogue).
struct DoraEpilogue {
  int E = 0;
  int mix_rows = 1;               // 1 (one mix for all tokens) or M
  int z_cols = 0;                 // sum of ranks
  const float* mix = nullptr;     // [mix_rows, E]
  const float* base_w = nullptr;  // [mix_rows] or nullptr (= 0)
  float* z = nullptr;             // [M, z_cols] workspace: z[m, off_e + j] = A_e[j] . x_m
  DoraAdapterDev ad[kMaxAdapters];
};

enum class GemmKernel { Auto, Gemv, Mma };

struct GemmArgs {
  const uint8_t* packed = nullptr;  // [N, packed_row_bytes(K)], layout.h, 16-byte aligned
  const int8_t* q = nullptr;        // [M, padded_k(K)], 16-byte aligned
  const int32_t* qsum = nullptr;    // [M]
  const float* x_scale = nullptr;   // [M] (float output only)
  std::int64_t M = 0, N = 0, K = 0;
  float w_scale = 1.0f;
  const float* bias = nullptr;      // [N] or nullptr
  float* out_f32 = nullptr;         // [M, N]: y; or
  int32_t* out_i32 = nullptr;       // [M, N]: the exact integer product q . T^T
  DoraEpilogue dora;                // E == 0 unless fused DoRA
};

// Per-token absmax int8 quantisation of x [M, K] (fp32) into q [M, padded_k(K)]
// (zero past K), x_scale [M] and qsum [M]. A token with NaN/Inf gets
// x_scale = NaN and q = 0 (so its float outputs are NaN). When dora.E > 0 the
// same launch also runs the DoRA A pass: dora.z[m, off_e + j] = A_e[j] . x_m
// in fp32 for the (token, adapter) pairs with a nonzero mix weight (0 otherwise).
void quantize_activations(const float* x, std::int64_t M, std::int64_t K, int8_t* q,
                          float* x_scale, int32_t* qsum, const DoraEpilogue& dora,
                          void* stream);

// out = (q . T^T - ...) per GemmArgs; Auto picks the dp4a GEMV for M <= 8 and
// the tensor-core GEMM above. Returns the kernel used.
GemmKernel ternary_gemm(const GemmArgs& args, GemmKernel kernel, void* stream);

// Factored DoRA row norms: norms[n] = ||W0_n + s B_n A||, float64, with
// W0 = T / w_scale, lora_a [rank, K] and lora_b [N, rank] fp32, gram a
// [rank, rank] float64 workspace.
void dora_row_norms(const uint8_t* packed, std::int64_t N, std::int64_t K, float w_scale,
                    const float* lora_a, const float* lora_b, std::int64_t rank, float scaling,
                    double* gram, double* norms, void* stream);

}  // namespace r3mes::cuda
