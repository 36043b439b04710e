#pragma once
// One BitNet decoder layer for decode (one new token per row), run natively end to end:
//
//   x = rms_norm(h, input_norm)
//   q, k, v = ternary projections of x (one pool hand-off for the three), RoPE on q, k
//   k, v written to the cache at `pos`; o = single-token GQA attention over the cache
//   h += o_proj(attn_sub_norm(o))
//   x = rms_norm(h, post_norm)
//   h += down(ffn_sub_norm(act(gate(x)) * up(x)))      (gate and up in one hand-off)
//
// exactly the arithmetic of core/model.py's forward (HF BitNetForCausalLM), with every
// projection a fused DoRA mix when adapters are set on it. Between Python and the
// kernels this removes ~35 framework ops and 7 Python calls per layer and token.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "attention/decode_attention.h"
#include "common/cpu_features.h"
#include "dora/dora.h"

namespace r3mes {

// A BitLinear (+ DoRA mix) of the layer.
struct DecodeProjection {
  const uint8_t* packed = nullptr;  // r3mes-2bit-g256 [out, packed_row_bytes(in)]
  std::size_t out = 0, in = 0;
  float w_scale = 1.0f;
  // The DoRA mix on this projection: no adapters means the bare ternary product.
  std::vector<const DoraAdapter*> adapters;
  std::vector<float> mix;     // [mix_rows, adapters.size()]
  std::vector<float> base_w;  // [mix_rows] or empty
  std::size_t mix_rows = 1;   // 1 (every row) or the batch size
  // dora_base_factor of the mix [mix_rows, out], made once when the mix is set: each step
  // then reads one float a row for the base instead of each adapter's gain.
  std::vector<float> base_factor;
};

enum class DecodeActivation { Relu2, Silu };

enum DecodeProjectionIndex { kQ = 0, kK, kV, kO, kGate, kUp, kDown, kNumProjections };

struct DecodeLayerSpec {
  std::size_t hidden = 0, intermediate = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float eps = 1e-6f;
  float attn_scaling = 1.0f;
  DecodeActivation activation = DecodeActivation::Relu2;
  const float* input_norm = nullptr;     // [hidden]
  const float* post_norm = nullptr;      // [hidden]
  const float* attn_sub_norm = nullptr;  // [heads * head_dim] or nullptr
  const float* ffn_sub_norm = nullptr;   // [intermediate] or nullptr
  DecodeProjection proj[kNumProjections];
};

// Buffers reused from one step to the next (no allocation in the steady state).
struct DecodeScratch {
  std::vector<float> x, q, k, v, o, gate, up, y, rope;
  std::vector<int64_t> lengths;
  DoraCall calls[kNumProjections];
};

// One decode step for B rows, each at its own position (continuous batching: rows of
// different sequences, prompt lengths and ages share the step). h [B, hidden] is updated in
// place. kv holds this layer's cache blocks; row b's new key and value go to position
// pos[b] and its positions [start[b], pos[b]] are attended. cos, sin [B, head_dim] are
// the RoPE tables of each row's position. A row's result does not depend on the other rows
// of the call. Returns false if an activation became NaN/Inf.
bool decode_layer_step(const DecodeLayerSpec& spec, float* h, std::size_t B, const KvBlocks& kv,
                       const int64_t* start, const int64_t* pos, const float* cos,
                       const float* sin, DecodeScratch& scratch, SimdLevel level);

void register_decode_layer_bindings(pybind11::module_& mod);

}  // namespace r3mes
