// Elementwise functions of 16 floats in AVX-512 registers, shared by the kernels: exp for the
// attention's softmax, and the tanh-approximated GELU that int8 products apply to their output.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace starcoder {

// exp(x) for 16 lanes: 2^n · p(f), n = round(x · log2 e), f = x - n · ln 2 (in two parts, for
// accuracy), p a degree-6 polynomial (relative error about 2e-7); scalef applies 2^n, and gives
// 0 where n is very negative (a masked score) and infinity where it is large.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GELU with tanh's approximation, x/2 · (1 + tanh(u)), u = sqrt(2/π) · (x + 0.044715 x³), as
// jax.nn.gelu(approximate=True) and PyTorch's "tanh" GELU: 1 + tanh(u) = 2 - 2 / (e^2u + 1),
// which is 2 where e^2u overflows and 0 where it underflows.
inline __m512 GeluTanh(__m512 x) {
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, x));
  // Capped where e^2u would overflow to infinity anyway: the polynomial of a huge argument
  // is no number.
  const __m512 e = Exp(_mm512_min_ps(_mm512_add_ps(u, u), _mm512_set1_ps(88.0f)));
  const __m512 two = _mm512_set1_ps(2.0f);
  const __m512 one_plus_tanh =
      _mm512_sub_ps(two, _mm512_div_ps(two, _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus_tanh);
}

}  // namespace starcoder

#endif  // __AVX512F__
