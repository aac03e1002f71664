// The layer norm of rows of floats, shared by layer_norm.cc and int8_matmul.cc (which takes
// the norm of its input rows itself where a product follows a norm).
#pragma once

#include <cmath>
#include <cstdint>

namespace starcoder {

// y[r, :] = (x[r, :] - mean) / sqrt(variance + epsilon) · scale + bias for m rows of k; the
// variance is taken around the mean (two passes), in float32, as model.py's LayerNorm does.
inline void NormalizeRows(const float* x, int64_t m, int64_t k, const float* scale,
                          const float* bias, float epsilon, float* y) {
  for (int64_t row = 0; row < m; ++row) {
    const float* in = x + row * k;
    float* out = y + row * k;
    float sum = 0.0f;
    for (int64_t i = 0; i < k; ++i) sum += in[i];
    const float mean = sum / static_cast<float>(k);
    float squares = 0.0f;
    for (int64_t i = 0; i < k; ++i) squares += (in[i] - mean) * (in[i] - mean);
    const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(k) + epsilon);
    for (int64_t i = 0; i < k; ++i) out[i] = (in[i] - mean) * inverse * scale[i] + bias[i];
  }
}

}  // namespace starcoder
