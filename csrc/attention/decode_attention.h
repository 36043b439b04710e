#pragma once
// Single-token (decode) grouped-query attention over a float32 KV cache.
#include <cstddef>
#include <cstdint>

namespace r3mes {

// q [B, H, D]; k, v [B, KV, S_max, D] (cache layout); keys [start_b, length) of row b are
// attended (start_b = pad[b], the row's left padding). Query head h uses kv head
// h / (H / KV), as HF's repeat_kv. out [B, H, D]:
//   out = softmax((q . k_s) * scaling) . v_s
// Each (b, h) is computed by one thread in a fixed order, so results do not depend on
// the thread count.
void decode_attention(const float* q, const float* k, const float* v, const int64_t* pad,
                      std::size_t batch, std::size_t heads, std::size_t kv_heads,
                      std::size_t head_dim, std::size_t max_len, std::size_t length,
                      float scaling, float* out);

}  // namespace r3mes
