// Attention of a few query rows over the cached keys and values of their cache rows, read where
// they lie in the cache, as an XLA FFI custom call on CPU: the part of a decode or verify step
// that grows with the context.
//
// Why a kernel of our own: XLA's CPU loop over the cache (attention.py) runs its small products
// at a tenth of the memory speed. For tiny_starcoder_py at 7,600 cached positions the loop took
// 26 ms a step for 20 layers, where reading the keys and values takes 2 ms; a decode step at
// that context cost twice one at 100 positions. Here each task takes a span of positions of one
// row and key/value head, scores every query row against each key while the key is in
// registers, and keeps a running maximum, sum and output per query row (online softmax); the
// spans, shared out over our workers (workers.h), are then merged.
//
// The result is the softmax state of the past alone, (max, sum, output) per query row, which
// attention.py merges with the state over the new tokens, as its own loop does.
//
// Inputs: q [b, kv, R, hd] (R = new tokens · query heads per key/value head, new token
// r / group), the cache [layers, 2, rows, time, kv, hd], row [b] (the cache row of each batch
// row), length [b] (cached positions per batch row), positions [b, seq] (the new tokens'
// positions, for the sliding window). Attributes: layer, window (0: none).
// Outputs: top [b, kv, R], total [b, kv, R], out [b, kv, R, hd].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "workers.h"
#include "xla/ffi/api/ffi.h"

// Written for AVX-512 only: elsewhere the library has no such symbol and attention.py keeps
// its own loop.
#if defined(__AVX512F__)
#include <immintrin.h>

namespace ffi = xla::ffi;

namespace {

// Cached positions per task: enough that a task's cost dwarfs taking it, few enough that two
// threads share a context of 1,000 positions.
constexpr int64_t kSpan = 256;
// As attention.py's MASKED: finite, so that a row that sees nothing has a zero sum, not NaN.
constexpr float kMasked = std::numeric_limits<float>::lowest();

// exp(x) for 16 lanes: 2^n · p(f), n = round(x · log2 e), f = x - n · ln 2 (in two parts, for
// accuracy), p a degree-6 polynomial (relative error about 2e-7); scalef applies 2^n and gives
// 0 where n is very negative (a masked score).
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

struct Problem {
  const float* q;
  const float* cache;
  const int32_t* row;
  const int32_t* length;
  const int32_t* positions;
  int64_t batch, kv, rows, hd, seq, group;
  int64_t cache_rows, time;
  int64_t layer, window;
  // Strides in floats.
  int64_t position_stride() const { return kv * hd; }
  const float* keys(int64_t b, int64_t h) const {
    const int64_t layer_size = 2 * cache_rows * time * kv * hd;
    return cache + layer * layer_size + (int64_t{row[b]} * time * kv + h) * hd;
  }
  const float* values(int64_t b, int64_t h) const {
    return keys(b, h) + cache_rows * time * kv * hd;
  }
};

// One task: batch row b, key/value head h, positions [t0, t1). Writes each query row's
// (max, sum, output) over the span into state: rows × (hd + 2) floats.
void Span(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, float* state,
          std::vector<float>& scores) {
  const int64_t n = t1 - t0, hd = p.hd, stride = p.position_stride();
  const float* keys = p.keys(b, h) + t0 * stride;
  const float* values = p.values(b, h) + t0 * stride;
  const int64_t padded = (n + 15) / 16 * 16;
  scores.resize(padded);
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* q = p.q + ((b * p.kv + h) * p.rows + r) * hd;
    float* out = state + r * (hd + 2);
    // The keys this query row sees: all cached ones, or those within its window.
    int64_t first = 0;
    if (p.window > 0) {
      const int64_t position = p.positions[b * p.seq + r / p.group];
      first = std::clamp<int64_t>(position - p.window + 1 - t0, 0, n);
    }
    float top = kMasked;
    for (int64_t t = 0; t < n; ++t) {
      const float* k = keys + t * stride;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
      for (int64_t d = 16; d < hd; d += 16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
      }
      const float s = t < first ? kMasked : _mm512_reduce_add_ps(acc);
      scores[t] = s;
      top = std::max(top, s);
    }
    for (int64_t t = n; t < padded; ++t) scores[t] = kMasked;
    __m512 total = _mm512_setzero_ps();
    const __m512 top_v = _mm512_set1_ps(top);
    for (int64_t t = 0; t < padded; t += 16) {
      const __m512 w = Exp(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + t), top_v));
      _mm512_storeu_ps(scores.data() + t, w);
      total = _mm512_add_ps(total, w);
    }
    // The output, 16 dimensions at a time (up to 8 at once: head dims up to 128 in registers).
    for (int64_t d0 = 0; d0 < hd; d0 += 128) {
      const int64_t parts = std::min<int64_t>(8, (hd - d0) / 16);
      __m512 acc[8];
      for (int64_t i = 0; i < parts; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m512 w = _mm512_set1_ps(scores[t]);
        const float* v = values + t * stride + d0;
        for (int64_t i = 0; i < parts; ++i) {
          acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * i), acc[i]);
        }
      }
      for (int64_t i = 0; i < parts; ++i) _mm512_storeu_ps(out + d0 + 16 * i, acc[i]);
    }
    out[hd] = top;
    out[hd + 1] = first >= n ? 0.0f : _mm512_reduce_add_ps(total);
  }
}

ffi::Error PastAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> cache,
                         ffi::Buffer<ffi::S32> row, ffi::Buffer<ffi::S32> length,
                         ffi::Buffer<ffi::S32> positions,
                         int64_t layer, int64_t window, ffi::ResultBuffer<ffi::F32> top,
                         ffi::ResultBuffer<ffi::F32> total, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto cd = cache.dimensions();
  const auto pd = positions.dimensions();
  if (qd.size() != 4 || cd.size() != 6 || pd.size() != 2 || cd[1] != 2 || cd[4] != qd[1] ||
      cd[5] != qd[3] || qd[3] % 16 != 0 || row.element_count() != qd[0] ||
      length.element_count() != qd[0] || pd[0] != qd[0] || qd[2] % pd[1] != 0 ||
      layer < 0 || layer >= cd[0]) {
    return ffi::Error::InvalidArgument(
        "past_attention: q [b, kv, R, hd] (hd a multiple of 16), cache [layers, 2, rows, time, "
        "kv, hd], row [b], length [b] and positions [b, seq] expected");
  }
  std::vector<int64_t> task_b, task_t0;  // per span: its batch row and first position
  const Problem p{q.typed_data(), cache.typed_data(), row.typed_data(), length.typed_data(),
                  positions.typed_data(), qd[0], qd[1], qd[2], qd[3], pd[1], qd[2] / pd[1],
                  cd[2], cd[3], layer, window};
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.row[b] < 0 || p.row[b] >= p.cache_rows || p.length[b] < 0 || p.length[b] > p.time) {
      return ffi::Error::InvalidArgument("past_attention: a row or length outside the cache");
    }
    int64_t start = 0;
    if (window > 0) {  // spans behind every query row's window are never read
      int64_t nearest = std::numeric_limits<int64_t>::max();
      for (int64_t s = 0; s < p.seq; ++s) {
        nearest = std::min<int64_t>(nearest, p.positions[b * p.seq + s]);
      }
      start = std::max<int64_t>(0, nearest - window + 1) / kSpan * kSpan;
    }
    for (int64_t t0 = start; t0 < p.length[b]; t0 += kSpan) {
      task_b.push_back(b);
      task_t0.push_back(t0);
    }
  }
  // Each task: one span of one head; its state, rows × (hd + 2) floats: output, max, sum.
  const int64_t spans = static_cast<int64_t>(task_b.size()), width = p.hd + 2;
  std::vector<float> state(spans * p.kv * p.rows * width);
  auto task_state = [&](int64_t task) { return state.data() + task * p.rows * width; };
  starcoder::Parallel(spans * p.kv, [&](int64_t i) {
    thread_local std::vector<float> scores;
    const int64_t span = i / p.kv, h = i % p.kv, b = task_b[span], t0 = task_t0[span];
    const int64_t t1 = std::min<int64_t>(t0 + kSpan, p.length[b]);
    Span(p, b, h, t0, t1, task_state(i), scores);
  });

  // Merge the spans of each (batch row, head), in order, into the outputs.
  float* top_out = top->typed_data();
  float* total_out = total->typed_data();
  float* out_out = out->typed_data();
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.kv; ++h) {
      for (int64_t r = 0; r < p.rows; ++r) {
        const int64_t at = (b * p.kv + h) * p.rows + r;
        float m = kMasked, s = 0.0f;
        float* o = out_out + at * p.hd;
        std::fill(o, o + p.hd, 0.0f);
        for (int64_t span = 0; span < spans; ++span) {
          if (task_b[span] != b) continue;
          const float* part = task_state(span * p.kv + h) + r * width;
          const float part_top = part[p.hd], part_sum = part[p.hd + 1];
          if (part_sum == 0.0f) continue;  // nothing visible in this span
          const float m_new = std::max(m, part_top);
          const float keep = std::exp(m - m_new), add = std::exp(part_top - m_new);
          for (int64_t d = 0; d < p.hd; ++d) o[d] = o[d] * keep + part[d] * add;
          s = s * keep + part_sum * add;
          m = m_new;
        }
        top_out[at] = m;
        total_out[at] = s;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderPastAttention, PastAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#endif  // __AVX512F__
