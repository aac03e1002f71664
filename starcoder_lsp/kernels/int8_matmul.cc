// y[m, n] = act((x[m, :] · w[n, :]) * scale[n] + bias[n]) + residual[m, n]: a float32
// activation [M, K] against an int8 weight [N, K] with a float32 scale per output row (and a
// bias, or none), for the few rows of a decode or verify step (M ≤ 16), as an XLA FFI custom
// call on CPU. What comes around the product is taken here because XLA runs each as a program
// of its own, 2-5 µs apiece, about seven a layer: the bias; the layer norm that precedes the
// product (norm_scale and norm_bias [K], else [0]); the activation that follows it (attribute
// activation: 0 none, 1 GELU with tanh's approximation); and the residual the output is added
// to (residual [M, N], else [0]).
//
// Why a kernel of our own: a decode step is bound by reading the weights once, and XLA's CPU
// dot of an int8 weight runs 6-7× slower per element than float32's (it does not stream the
// int8 bytes). Here each weight is read once and used for every activation row.
//
// Two forms of the product (attribute int8_activations):
// - float activations: each 16 int8 weights are widened to float32 in registers and
//   multiplied into every row. The result is the dequantized product up to the order of the
//   float sums. Widening costs three instructions per 16 weights: on a 2-core Xeon this loop
//   read the weights at 60-75% of the memory's speed before they were prefetched, and at
//   about 80% after.
// - int8 activations (where the CPU has AVX-512 VNNI and K is a multiple of 64): each group of
//   64 values of a row is rounded to int8 with a scale of its own (its largest magnitude /
//   127), as llama.cpp's q8_0 does with groups of 32, and one vpdpbusd multiplies 64 weights
//   by 64 activations. This reads the weights at the memory's speed; each activation is off
//   by at most half its group's step.
//
// Rows of the weight are shared out in blocks over the calling thread and our workers
// (workers.h). The weights are prefetched ahead of the loads: one core's reads alone reach
// 8 GB/s on that Xeon, and the hardware prefetcher does not keep two cores' reads in flight.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define STARCODER_AVX512 1
#endif
#if defined(STARCODER_AVX512) && defined(__AVX512VNNI__)
#define STARCODER_VNNI 1
#endif

#include "layer_norm.h"
#include "vector_math.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Weight bytes per block of rows a thread takes at a time, about. Large, since a block's first
// reads wait on memory before the prefetches ahead of them pay: blocks of 12, 24, 48, 96 and
// 192 KiB read tiny_starcoder_py's 2.4 MB matrices at 12.1, 13.8, 14.6, 15.7 and 16.1 GB/s on
// a 2-core Xeon. The blocks are as many as the threads, or a multiple, so that the threads
// end together: a 590 KB matrix in 3 blocks of 192 KiB read at 11.6 GB/s, in 4 at 13.1.
constexpr int64_t kBlockBytes = 192 * 1024;
// Activation values per int8 scale: one vector of 64 bytes.
constexpr int64_t kGroup = 64;
// The activation attribute's values.
constexpr int64_t kNoActivation = 0;
constexpr int64_t kGeluTanh = 1;
// How far ahead of its loads a thread prefetches the weights (bytes). On a 2-core Xeon,
// reading a 150 MB int8 matrix as the int8 form does: 11-13 GB/s with no prefetch, 18-19
// with 2 KiB ahead, 19-20 with 4 or 8 KiB.
constexpr int64_t kAhead = 4096;

struct Problem {
  const float* x;
  const int8_t* w;
  const float* scale;
  const float* bias;  // [N], or null
  float* y;
  int64_t m, k, n;
  int64_t activation = kNoActivation;
  const float* residual = nullptr;  // [M, N], or null
  // The int8 form: x as uint8 (each value + 128) [M, K] and a scale per group [M, K / 64].
  const uint8_t* xq = nullptr;
  const float* xs = nullptr;
};

#ifdef STARCODER_AVX512
// MB activation rows against weight rows [n0, n1): the weights of a row are widened once per
// 16 and reused by all MB rows. U independent accumulators per row (16·U weights a turn of the
// loop), so that few rows do not wait on one chain of dependent multiply-adds: one row with
// one accumulator ran at 9 GB/s per core, bound by the FMA's latency.
template <int MB>
void Rows(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  constexpr int64_t kStep = 16 * U;
  const int64_t full = p.k - p.k % kStep;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = p.w + n * p.k;
    __m512 acc[MB][U];
    for (int i = 0; i < MB; ++i) {
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < full; k += kStep) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kAhead), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * u));
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        for (int i = 0; i < MB; ++i) {
          const __m512 xv = _mm512_loadu_ps(p.x + (m0 + i) * p.k + k + 16 * u);
          acc[i][u] = _mm512_fmadd_ps(xv, wf, acc[i][u]);
        }
      }
    }
    for (int i = 0; i < MB; ++i) {
      __m512 total = acc[i][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[i][u]);
      float sum = _mm512_reduce_add_ps(total);
      const float* x = p.x + (m0 + i) * p.k;
      for (int64_t k = full; k < p.k; ++k) sum += x[k] * static_cast<float>(w[k]);
      p.y[(m0 + i) * p.n + n] = sum * p.scale[n] + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}
#else
// Without AVX-512: the same loop order for the compiler to vectorize.
template <int MB>
void Rows(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = p.w + n * p.k;
    float acc[MB] = {};
    for (int64_t k = 0; k < p.k; ++k) {
      const float wf = static_cast<float>(w[k]);
      for (int i = 0; i < MB; ++i) acc[i] += p.x[(m0 + i) * p.k + k] * wf;
    }
    for (int i = 0; i < MB; ++i) {
      p.y[(m0 + i) * p.n + n] = acc[i] * p.scale[n] + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}
#endif

#ifdef STARCODER_VNNI
// Rounds each group of 64 values of x [M, K] to int8 with a scale of its own: xq = value /
// scale + 128 as uint8 (vpdpbusd multiplies unsigned by signed bytes), xs = the scales.
void QuantizeRows(const float* x, int64_t m, int64_t k, uint8_t* xq, float* xs) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t g = 0; g < m * k / kGroup; ++g) {
    const float* v = x + g * kGroup;
    __m512 peak = _mm512_setzero_ps();
    for (int j = 0; j < kGroup; j += 16) {
      peak = _mm512_max_ps(peak, _mm512_andnot_ps(sign, _mm512_loadu_ps(v + j)));
    }
    const float top = _mm512_reduce_max_ps(peak);
    xs[g] = top / 127.0f;
    const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    for (int j = 0; j < kGroup; j += 16) {
      // Rounded to nearest (even), as numpy's rint; -127..127, so + 128 fits a byte.
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + j), inverse));
      const __m512i shifted = _mm512_add_epi32(q, _mm512_set1_epi32(128));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * kGroup + j),
                       _mm512_cvtepi32_epi8(shifted));
    }
  }
}

// MB int8 activation rows against weight rows [n0, n1). Per group of 64: vpdpbusd of the
// shifted activations with the weights, less 128 · the weights' sum (taken with vpdpbusd of
// ones, once for all MB rows), gives the exact int32 products in 16 lanes; they are scaled
// by the group's activation scale into two float accumulators per row.
template <int MB>
void RowsInt8(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t groups = p.k / kGroup;
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = p.w + n * p.k;
    __m512 acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    auto group = [&](int64_t g, int u) {
      _mm_prefetch(reinterpret_cast<const char*>(w + g * kGroup + kAhead), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w + g * kGroup);
      const __m512i offset = _mm512_sub_epi32(zero, _mm512_slli_epi32(
                                                        _mm512_dpbusd_epi32(zero, ones, wv), 7));
      for (int i = 0; i < MB; ++i) {
        const int64_t row = m0 + i;
        const __m512i xv = _mm512_loadu_si512(p.xq + row * p.k + g * kGroup);
        const __m512i dot = _mm512_dpbusd_epi32(offset, xv, wv);
        const __m512 xs = _mm512_set1_ps(p.xs[row * groups + g]);
        acc[i][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs, acc[i][u]);
      }
    };
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      group(g, 0);
      group(g + 1, 1);
    }
    if (g < groups) group(g, 0);
    for (int i = 0; i < MB; ++i) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
      p.y[(m0 + i) * p.n + n] = sum * p.scale[n] + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}
#endif

// The activation and the residual, on every row's outputs [n0, n1), once the block's
// products are in y (still in the thread's cache).
void Finish(const Problem& p, int64_t n0, int64_t n1) {
  if (p.activation == kNoActivation && p.residual == nullptr) return;
  for (int64_t m = 0; m < p.m; ++m) {
    float* y = p.y + m * p.n;
    const float* residual = p.residual ? p.residual + m * p.n : nullptr;
    int64_t n = n0;
#ifdef STARCODER_AVX512
    for (; n < n1; n += 16) {
      const __mmask16 lanes =
          static_cast<__mmask16>(n1 - n >= 16 ? 0xffff : (1u << (n1 - n)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(lanes, y + n);
      if (p.activation == kGeluTanh) v = starcoder::GeluTanh(v);
      if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, residual + n));
      _mm512_mask_storeu_ps(y + n, lanes, v);
    }
#endif
    for (; n < n1; ++n) {
      float v = y[n];
      if (p.activation == kGeluTanh) {
        v = 0.5f * v * (1.0f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
      }
      y[n] = residual ? v + residual[n] : v;
    }
  }
}

// Every activation row against weight rows [n0, n1), in groups of up to 8 rows.
template <template <int> class Form>
void BlockOf(const Problem& p, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 8 <= p.m; m += 8) Form<8>::Run(p, m, n0, n1);
  switch (p.m - m) {
    case 7: Form<7>::Run(p, m, n0, n1); break;
    case 6: Form<6>::Run(p, m, n0, n1); break;
    case 5: Form<5>::Run(p, m, n0, n1); break;
    case 4: Form<4>::Run(p, m, n0, n1); break;
    case 3: Form<3>::Run(p, m, n0, n1); break;
    case 2: Form<2>::Run(p, m, n0, n1); break;
    case 1: Form<1>::Run(p, m, n0, n1); break;
    default: break;
  }
}

template <int MB>
struct FloatForm {
  static void Run(const Problem& p, int64_t m0, int64_t n0, int64_t n1) { Rows<MB>(p, m0, n0, n1); }
};

#ifdef STARCODER_VNNI
template <int MB>
struct Int8Form {
  static void Run(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
    RowsInt8<MB>(p, m0, n0, n1);
  }
};
#endif

// The product of p, in the int8 form where asked and possible.
void Multiply(Problem p, bool int8_activations) {
  void (*block)(const Problem&, int64_t, int64_t) = BlockOf<FloatForm>;
#ifdef STARCODER_VNNI
  std::vector<uint8_t> xq;
  std::vector<float> xs;
  if (int8_activations && p.k % kGroup == 0) {
    xq.resize(p.m * p.k);
    xs.resize(p.m * p.k / kGroup);
    QuantizeRows(p.x, p.m, p.k, xq.data(), xs.data());
    p.xq = xq.data();
    p.xs = xs.data();
    block = BlockOf<Int8Form>;
  }
#endif
  const int64_t threads = starcoder::Threads(), turn = threads * kBlockBytes;
  const int64_t blocks = threads * std::max<int64_t>(1, (p.n * p.k + turn - 1) / turn);
  const int64_t rows = (p.n + blocks - 1) / blocks;
  starcoder::Parallel((p.n + rows - 1) / rows, [&p, block, rows](int64_t b) {
    const int64_t n0 = b * rows, n1 = std::min(p.n, n0 + rows);
    block(p, n0, n1);
    Finish(p, n0, n1);
  });
}

ffi::Error Int8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> norm_scale,
                      ffi::Buffer<ffi::F32> norm_bias, ffi::Buffer<ffi::F32> residual,
                      ffi::ResultBuffer<ffi::F32> y, int64_t int8_activations, float epsilon,
                      int64_t activation) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const int64_t norm = norm_scale.element_count();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != wd[0] ||
      (bias.element_count() != 0 && bias.element_count() != wd[0]) ||
      (norm != 0 && norm != xd[1]) || norm_bias.element_count() != norm ||
      (residual.element_count() != 0 && residual.element_count() != xd[0] * wd[0])) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: x [M, K], w [N, K], scale [N], bias [N] or [0], norm scale and bias [K] "
        "or [0], and residual [M, N] or [0] expected");
  }
  if (activation != kNoActivation && activation != kGeluTanh) {
    return ffi::Error::InvalidArgument("int8_matmul: activation 0 (none) or 1 (GELU, tanh)");
  }
  const float* rows = x.typed_data();
  std::vector<float> normalized;
  if (norm != 0) {
    normalized.resize(xd[0] * xd[1]);
    starcoder::NormalizeRows(rows, xd[0], xd[1], norm_scale.typed_data(), norm_bias.typed_data(),
                             epsilon, normalized.data());
    rows = normalized.data();
  }
  const float* added = bias.element_count() != 0 ? bias.typed_data() : nullptr;
  const float* residual_rows = residual.element_count() != 0 ? residual.typed_data() : nullptr;
  Multiply({rows, w.typed_data(), scale.typed_data(), added, y->typed_data(), xd[0], xd[1], wd[0],
            activation, residual_rows},
           int8_activations != 0);
  return ffi::Error::Success();
}

}  // namespace

// Whether int8_activations takes effect here (for K a multiple of 64): 1 where the kernel
// was built for a CPU with AVX-512 VNNI.
extern "C" int StarcoderInt8Activations() {
#ifdef STARCODER_VNNI
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("int8_activations")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("activation"));
