// Host emulation of the two ternary GEMM kernels' per-lane programs, built
// from the same fragments.h functions and index helpers the kernels use. It
// lets machines without a GPU check the layout and fragment index math (the
// part of the kernels most likely to be wrong) against the torch reference.
// The tensor-core instruction is modelled from the PTX ISA's fragment tables
// for mma.m16n8k32 .s8 ("Matrix Fragments for mma.m16n8k32"), written here
// independently of the kernel's own reading of them.
#include "cuda/emulate.h"

#include <algorithm>
#include <cstring>

#include "cuda/fragments.h"
#include "cuda/layout.h"

namespace r3mes::cuda {

namespace {

uint32_t load_word(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);  // little-endian, as the GPU loads it
  return v;
}

int8_t byte_of(uint32_t reg, int i) { return static_cast<int8_t>(reg >> (8 * i)); }

}  // namespace

void mma_m16n8k32_s8_model(const uint32_t a[32][4], const uint32_t b[32][2], int32_t d[32][4]) {
  int32_t A[16][32], B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane & 3;  // groupID, threadID_in_group
    for (int i = 0; i < 16; ++i) {                // a0..a15, four to a register
      const int row = (i < 4 || (i >= 8 && i < 12)) ? group : group + 8;
      const int col = tig * 4 + (i & 3) + (i >= 8 ? 16 : 0);
      A[row][col] = byte_of(a[lane][i / 4], i % 4);
    }
    for (int i = 0; i < 8; ++i) {  // b0..b7
      const int row = tig * 4 + (i & 3) + (i >= 4 ? 16 : 0);
      B[row][group] = byte_of(b[lane][i / 4], i % 4);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; ++i) {  // c0..c3
      const int row = group + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][col];
      d[lane][i] += s;
    }
  }
}

void emulate_gemv(const int8_t* q, const int32_t* qsum, std::size_t M, const uint8_t* packed,
                  std::size_t N, std::size_t K, int32_t* out) {
  const std::size_t cpr = chunks_per_row(K), kp = padded_k(K), row_bytes = packed_row_bytes(K);
  for (std::size_t n = 0; n < N; ++n)
    for (std::size_t m = 0; m < M; ++m) {
      int32_t total = 0;  // the warp butterfly's result: the sum over lanes
      for (std::size_t lane = 0; lane < 32; ++lane) {
        int32_t acc = 0;
        for (std::size_t c0 = lane; c0 < cpr; c0 += 64)
          for (std::size_t u = 0; u < 2; ++u) {
            const std::size_t c = c0 + 32 * u;
            if (c >= cpr) break;
            const uint8_t* chunk = packed + n * row_bytes + 16 * c;
            const uint32_t words[4] = {load_word(chunk), load_word(chunk + 4),
                                       load_word(chunk + 8), load_word(chunk + 12)};
            uint32_t codes[16], act[16];
            decode_chunk(words, codes);
            const uint8_t* qa = reinterpret_cast<const uint8_t*>(q + m * kp + 64 * c);
            for (int j = 0; j < 16; ++j) act[j] = load_word(qa + 4 * j);
            acc = codes_dot(codes, act, acc);
          }
        total += acc;
      }
      out[m * N + n] = total - qsum[m];
    }
}

void emulate_mma(const int8_t* q, const int32_t* qsum, std::size_t M, const uint8_t* packed,
                 std::size_t N, std::size_t K, int32_t* out) {
  const std::size_t cpr = chunks_per_row(K), kp = padded_k(K), row_bytes = packed_row_bytes(K);
  for (std::size_t nb = 0; nb < N; nb += 16)
    for (std::size_t mb = 0; mb < M; mb += 8) {
      int32_t d[32][4] = {};
      for (std::size_t c = 0; c < cpr; ++c) {
        uint32_t a[2][32][4], b[2][32][2];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t4 = lane & 3;
          const std::size_t rg = std::min(nb + g, N - 1), rh = std::min(nb + g + 8, N - 1);
          const std::size_t tok = std::min(mb + g, M - 1);
          const std::size_t wi = static_cast<std::size_t>(mma_weight_word(c, t4));
          const uint32_t w_g = load_word(packed + rg * row_bytes + 4 * wi);
          const uint32_t w_h = load_word(packed + rh * row_bytes + 4 * wi);
          const uint8_t* qv = reinterpret_cast<const uint8_t*>(q + tok * kp) +
                              16 * static_cast<std::size_t>(mma_act_vector(c, t4));
          const uint32_t act[4] = {load_word(qv), load_word(qv + 4), load_word(qv + 8),
                                   load_word(qv + 12)};
          for (int ks = 0; ks < 2; ++ks) {
            mma_a_fragment(w_g, w_h, ks, a[ks][lane]);
            mma_b_fragment(act, ks, b[ks][lane]);
          }
        }
        for (int ks = 0; ks < 2; ++ks) mma_m16n8k32_s8_model(a[ks], b[ks], d);
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t4 = lane & 3;
        for (int i = 0; i < 4; ++i) {
          const std::size_t n = nb + g + (i >= 2 ? 8 : 0), m = mb + 2 * t4 + (i & 1);
          if (n < N && m < M) out[m * N + n] = d[lane][i] - qsum[m];
        }
      }
    }
}

}  // namespace r3mes::cuda
