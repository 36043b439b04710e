#pragma once
// Single-token (decode) grouped-query attention over a KV cache in blocks, float32 or
// (opt-in) IEEE half.
#include <cstddef>
#include <cstdint>

namespace r3mes {

// Where each row's keys and values are: the cache is a pool of blocks
// k, v [num_blocks, kv_heads, block_size, head_dim]; position s of row b lives in block
// table[b * max_blocks + s / block_size], at offset s % block_size. A contiguous cache
// [B, kv_heads, max_len, head_dim] is the pool with block_size = max_len and row b's table
// {b} (see decode_layer_bindings.cpp and bindings.cpp).
// The cache's element type. Half (opt-in) halves the bytes a decode step reads of the cache
// and the memory a position takes; each key and value is stored rounded to nearest even, as
// torch's .half(), and read back exactly (the arithmetic stays float32).
enum class KvType { F32, F16 };

struct KvBlocks {
  void* k = nullptr;  // float or binary16 bits [num_blocks, kv_heads, block_size, head_dim]
  void* v = nullptr;
  KvType type = KvType::F32;
  std::size_t block_size = 0, max_blocks = 0;
  const int32_t* table = nullptr;  // [B, max_blocks]

  std::size_t offset(std::size_t b, std::size_t kv_heads, std::size_t g, std::size_t s,
                     std::size_t head_dim) const {
    const std::size_t block = static_cast<std::size_t>(table[b * max_blocks + s / block_size]);
    return ((block * kv_heads + g) * block_size + s % block_size) * head_dim;
  }
};

// q [B, H, D]. Row b attends its positions [start[b], length[b]) (start: the row's left
// padding, 0 for a sequence of its own). Query head h uses kv head h / (H / KV), as HF's
// repeat_kv. out [B, H, D]:
//   out = softmax((q . k_s) * scaling) . v_s
// Each row's kv head is computed in fixed chunks of its positions, merged in chunk order, so
// results depend neither on the thread count nor on which other rows share the call or on
// how the positions are laid out in blocks.
void decode_attention(const float* q, const KvBlocks& kv, const int64_t* start,
                      const int64_t* length, std::size_t batch, std::size_t heads,
                      std::size_t kv_heads, std::size_t head_dim, float scaling, float* out);

}  // namespace r3mes
