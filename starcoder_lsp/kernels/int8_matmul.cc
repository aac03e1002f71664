// y[m, n] = (x[m, :] · w[n, :]) * scale[n]: a float32 activation [M, K] against an int8
// weight [N, K] with a float32 scale per output row, for the few rows of a decode or verify
// step (M ≤ 16), as an XLA FFI custom call on CPU.
//
// Why a kernel of our own: a decode step is bound by reading the weights once, and XLA's CPU
// dot of an int8 weight runs 6-7× slower per element than float32's (it does not stream the
// int8 bytes). Here each 16 int8 weights are loaded once, widened to float32 in registers and
// multiplied into every activation row, so the weights are read at memory speed. The
// activations stay float32 (no activation quantization): the result is the dequantized
// product up to the order of the float sums.
//
// Rows of the weight are shared out in blocks over the calling thread and our workers
// (workers.h).

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define STARCODER_AVX512 1
#endif

#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Weight rows per block a thread takes at a time: small enough that two threads share a
// 768-row matrix evenly, large enough that taking a block costs nothing next to it.
constexpr int64_t kBlockRows = 64;

struct Problem {
  const float* x;
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t m, k, n;
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
      p.y[(m0 + i) * p.n + n] = sum * p.scale[n];
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
    for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.n + n] = acc[i] * p.scale[n];
  }
}
#endif

// Every activation row against weight rows [n0, n1), in groups of up to 8 rows.
void Block(const Problem& p, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 8 <= p.m; m += 8) Rows<8>(p, m, n0, n1);
  switch (p.m - m) {
    case 7: Rows<7>(p, m, n0, n1); break;
    case 6: Rows<6>(p, m, n0, n1); break;
    case 5: Rows<5>(p, m, n0, n1); break;
    case 4: Rows<4>(p, m, n0, n1); break;
    case 3: Rows<3>(p, m, n0, n1); break;
    case 2: Rows<2>(p, m, n0, n1); break;
    case 1: Rows<1>(p, m, n0, n1); break;
    default: break;
  }
}

ffi::Error Int8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != wd[0]) {
    return ffi::Error::InvalidArgument("int8_matmul: x [M, K], w [N, K] and scale [N] expected");
  }
  const Problem p{x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(),
                  xd[0],          xd[1],          wd[0]};
  starcoder::Parallel((p.n + kBlockRows - 1) / kBlockRows, [&p](int64_t b) {
    const int64_t n0 = b * kBlockRows;
    Block(p, n0, std::min(p.n, n0 + kBlockRows));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
