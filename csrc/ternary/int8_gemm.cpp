// int8 GEMM (LM head): scalar reference, weight quantisation, dispatch.
#include "ternary/int8_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "common/thread_pool.h"
#include "ternary/amx.h"
#include "ternary/quantized_acts.h"

namespace r3mes {

constexpr std::size_t kAmxMinHeadTokens = 8;

bool quantize_int8_weight(const float* w, std::size_t n, std::size_t k, int8_t* out,
                          float* scale, int32_t* rowsum) {
  const std::size_t kp = int8_padded_k(k);
  bool finite = true;
  for (std::size_t i = 0; i < n * k; ++i) finite &= std::fabs(w[i]) <= 3.4028235e38f;
  if (!finite) return false;
  parallel_for(n, 256, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) {
      const float* row = w + r * k;
      float m = 0.0f;
      for (std::size_t i = 0; i < k; ++i) m = std::max(m, std::fabs(row[i]));
      const float s = (1.0f / std::max(m, 1e-5f)) * 127.0f;
      int32_t sum = 0;
      for (std::size_t i = 0; i < k; ++i) {
        float v = std::min(127.0f, std::max(-128.0f, std::nearbyint(row[i] * s)));
        out[r * kp + i] = static_cast<int8_t>(v);
        sum += static_cast<int32_t>(v);
      }
      std::memset(out + r * kp + k, 0, kp - k);
      scale[r] = s;
      rowsum[r] = sum;
    }
  });
  return true;
}

void int8_gemm_rows_scalar(const Int8GemmArgs& a, std::size_t n0, std::size_t n1) {
  const std::size_t kp = int8_padded_k(a.K);
  for (std::size_t n = n0; n < n1; ++n)
    for (std::size_t m = 0; m < a.M; ++m) {
      int32_t acc = 0;
      for (std::size_t k = 0; k < a.K; ++k)
        acc += static_cast<int32_t>(a.w[n * kp + k]) * a.q[m * kp + k];
      store_int8_output(a, m, n, acc);
    }
}

void int8_gemm(const Int8GemmArgs& args, SimdLevel level) {
  if (args.M == 0 || args.N == 0) return;
  Int8GemmArgs a = args;
  AlignedVector<uint8_t> u;  // the VNNI kernel reads u = q + 128 (vpdpbusd: unsigned x signed)
  AlignedVector<int16_t> q16;  // the AVX2 kernel's activations, widened once
  auto fn = int8_gemm_rows_scalar;
  std::unique_ptr<int32_t[]> quads;  // not cleared: the packing writes every dword
  if (level == SimdLevel::Avx512Vnni) {
    u = unsigned_activations(a.q, a.M * int8_padded_k(a.K));
    a.u = u.data();
    fn = isa_avx512vnni::int8_gemm_rows_avx512vnni;
#if defined(R3MES_HAVE_AMX)
    // From 8 tokens the tile unit streams the weights at the memory's rate where vpdpbusd
    // falls behind (128256 x 2560 from DRAM, 2 threads: 8 tokens 13.1 -> 12.1 ms, 16 tokens
    // 18.9 -> 12.5; one token 10.0; 4 tokens 3% slower, so they stay on VNNI).
    if (a.M >= kAmxMinHeadTokens && amx_usable()) {
      const std::size_t kp = int8_padded_k(a.K);
      a.m_pad = amx_token_pad(a.M);
      quads.reset(new int32_t[kp / 4 * a.m_pad]);
      isa_amx::amx_pack_activations(a.q, a.M, kp, quads.get(), a.m_pad);
      a.q_quads = quads.get();
      fn = isa_amx::int8_gemm_rows_amx;
    }
#endif
  } else if (level == SimdLevel::Avx512) {
    fn = isa_avx512::int8_gemm_rows_avx512;
  } else if (level == SimdLevel::Avx2) {
    q16 = AlignedVector<int16_t>(a.M * int8_padded_k(a.K));
    isa_avx2::widen_activations_avx2(a.q, q16.size(), q16.data());
    a.q16 = q16.data();
    fn = isa_avx2::int8_gemm_rows_avx2;
  }
  parallel_rows(a.N, [&](std::size_t n0, std::size_t n1) { fn(a, n0, n1); });
}

}  // namespace r3mes
