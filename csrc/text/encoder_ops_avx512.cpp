// AVX-512 encoder steps (both AVX-512 levels): encoder_ops_impl.h on 16-float vectors (zmm).
#include "text/encoder_ops_impl.h"

namespace r3mes {
namespace isa_avx512 {

void attention_head(const AttentionHead& a) { attention_head_lanes<Zmm>(a); }

void layernorm_rows(float* x, const float* y, const float* weight, const float* bias,
                    std::size_t t0, std::size_t t1, std::size_t h, float eps) {
  layernorm_rows_lanes<Zmm>(x, y, weight, bias, t0, t1, h, eps);
}

void gelu(float* x, std::size_t n) { gelu_lanes<Zmm>(x, n); }

}  // namespace isa_avx512
}  // namespace r3mes
