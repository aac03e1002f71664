// Attention of a few query rows over the new tokens' keys and the cached keys of their cache
// rows, read where they lie in the cache, as an XLA FFI custom call on CPU: the attention of
// a decode or verify step, the part of the step that grows with the context.
//
// Why a kernel of our own: XLA's CPU loop over the cache (attention.py) runs its small products
// at a tenth of the memory speed. For tiny_starcoder_py at 7,600 cached positions the loop took
// 26 ms a step for 20 layers, where reading the keys and values takes 2 ms; a decode step at
// that context cost twice one at 100 positions. Here each task takes a span of positions of one
// row and key/value head, scores every query row against each key while the key is in
// registers, and keeps a running maximum, sum and output per query row (online softmax); the
// spans, shared out over our workers (workers.h), are then merged with the new tokens' part.
// The new tokens' part is taken here too: in XLA it was eight small programs a layer (scores,
// softmax, the merge, the division), about 20 µs a layer at batch 1.
//
// Inputs: q [b, kv, R, hd] (R = new tokens · query heads per key/value head, new token
// r / group), the new tokens' keys and values [b, t, kv, hd] (t: the new tokens, after any
// decoded earlier in the same call), which of them each new token sees, visible [b, seq, t]
// (int8, 0 or 1), the cache [layers, 2, rows, time, kv, hd], row [b] (the cache row of each
// batch row), length [b] (cached positions per batch row), positions [b, seq] (the new
// tokens' positions, for the sliding window). Attributes: layer, window (0: none), scale (the
// queries are multiplied by it first: taken here, it is no XLA program of its own, 4 µs a
// layer).
// Output: out [b, kv, R, hd], the attention's output (0 for a row that sees no key).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vector_math.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

// Written for AVX-512 only: elsewhere the library has no such symbol and attention.py keeps
// its own loop.
#if defined(__AVX512F__)
#include <immintrin.h>

namespace ffi = xla::ffi;

namespace {

using starcoder::Exp;

// Cached positions per task: enough that a task's cost dwarfs taking it, few enough that two
// threads share a context of 1,000 positions.
constexpr int64_t kSpan = 256;
// The fewest positions a span is cut to for sharing a row's positions over two threads.
constexpr int64_t kMinSpan = 64;
// As attention.py's MASKED: finite, so that a row that sees nothing has a zero sum, not NaN.
constexpr float kMasked = std::numeric_limits<float>::lowest();

// r[i][j] becomes r[j][i]: a 16 × 16 block of floats transposed in registers.
inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

struct Problem {
  const float* q;
  const float* new_keys;
  const float* new_values;
  const int8_t* visible;
  int64_t new_count;  // t
  const float* cache;
  const int32_t* row;
  const int32_t* length;
  const int32_t* positions;
  int64_t batch, kv, rows, hd, seq, group;
  int64_t cache_rows, time;
  int64_t layer, window;
  float scale;  // of the queries
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

// Query rows scored together against a tile of 16 keys, one accumulator each.
constexpr int kScoreRows = 12;

// Scores of kScoreRows query rows against a tile (hd vectors of 16 keys), into 16 lanes per
// row. The queries are transposed, [hd][kScoreRows], so that the values broadcast for one
// dimension lie at fixed offsets from one pointer.
inline void ScoreRows(const float* queries, const float* tile, int64_t hd, __m512* score) {
  for (int g = 0; g < kScoreRows; ++g) score[g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m512 k = _mm512_loadu_ps(tile + d * 16);
    const float* q = queries + d * kScoreRows;
    for (int g = 0; g < kScoreRows; ++g) {
      score[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g]), k, score[g]);
    }
  }
}

// out[g][d0 .. d0 + 16·P) = Σ_t weights[g][t] · values[t][d0 ..] for G rows at once: each
// value vector is loaded once for the G rows, and the G·P accumulators stay in registers.
template <int P, int G>
void WeighValues(const float* weights, int64_t weight_stride, const float* values, int64_t n,
                 int64_t stride, float* out, int64_t out_stride) {
  __m512 acc[G][P];
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < P; ++i) acc[g][i] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < n; ++t) {
    __m512 v[P];
    for (int i = 0; i < P; ++i) v[i] = _mm512_loadu_ps(values + t * stride + 16 * i);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * weight_stride + t]);
      for (int i = 0; i < P; ++i) acc[g][i] = _mm512_fmadd_ps(w, v[i], acc[g][i]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < P; ++i) _mm512_storeu_ps(out + g * out_stride + 16 * i, acc[g][i]);
  }
}

// All query rows' outputs over dimensions [d0, d0 + 16·P), G rows at a time and the rest
// one at a time. weights: rows × padded; state: rows × width.
template <int P>
void WeighAllValues(int64_t rows, const float* weights, int64_t padded, const float* values,
                    int64_t n, int64_t stride, float* state, int64_t width, int64_t d0) {
  constexpr int G = std::max(1, std::min(8, 24 / P));
  int64_t r = 0;
  for (; r + G <= rows; r += G) {
    WeighValues<P, G>(weights + r * padded, padded, values + d0, n, stride, state + r * width + d0,
                      width);
  }
  for (; r < rows; ++r) {
    WeighValues<P, 1>(weights + r * padded, padded, values + d0, n, stride, state + r * width + d0,
                      width);
  }
}

// One task: batch row b, key/value head h, positions [t0, t1). Writes each query row's
// (max, sum, output) over the span into state: rows × (hd + 2) floats.
//
// Scores are taken 16 keys at a time: the 16 keys are transposed into a tile of hd vectors
// (one per dimension), and 12 query rows at once multiply it with one broadcast value per
// dimension, so that each row gets 16 scores in one vector with no horizontal sum. The
// outputs weigh each value vector once for several rows. Scoring one key at a time and
// summing its 16 lanes, and weighing the values one row at a time, took 40 µs per layer at
// 256 positions for tiny_starcoder_py (MQA: 12 query rows); gathering the tile instead of
// transposing it was slower still (gathers are slow on Xeons whose microcode mitigates
// Gather Data Sampling).
void Span(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, float* state,
          std::vector<float>& scores, std::vector<float>& tile) {
  const int64_t n = t1 - t0, hd = p.hd, stride = p.position_stride(), width = hd + 2;
  const float* keys = p.keys(b, h) + t0 * stride;
  const float* values = p.values(b, h) + t0 * stride;
  const int64_t padded = (n + 15) / 16 * 16;
  // Rows of scores, then the queries transposed in groups of kScoreRows (zero past the last
  // row). The tile (hd × 16 keys) is a buffer of its own.
  const int64_t groups = (p.rows + kScoreRows - 1) / kScoreRows;
  scores.assign(p.rows * padded + groups * kScoreRows * hd, 0.0f);
  float* queries = scores.data() + p.rows * padded;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* q = p.q + ((b * p.kv + h) * p.rows + r) * hd;
    float* group = queries + (r / kScoreRows) * kScoreRows * hd;
    for (int64_t d = 0; d < hd; ++d) group[d * kScoreRows + r % kScoreRows] = q[d] * p.scale;
  }
  tile.resize(hd * 16);
  // The keys each query row sees: all cached ones, or those within its window.
  std::vector<int64_t> first(p.rows, 0);
  if (p.window > 0) {
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t position = p.positions[b * p.seq + r / p.group];
      first[r] = std::clamp<int64_t>(position - p.window + 1 - t0, 0, n);
    }
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 masked = _mm512_set1_ps(kMasked);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    // Keys past the span are read as zeros and score kMasked.
    const __mmask16 inside = static_cast<__mmask16>(
        n - j0 >= 16 ? 0xffff : (1u << (n - j0)) - 1);
    const float* base = keys + j0 * stride;
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      __m512 block[16];
      for (int64_t i = 0; i < 16; ++i) {
        block[i] = j0 + i < n ? _mm512_loadu_ps(base + i * stride + d0) : _mm512_setzero_ps();
      }
      Transpose16(block);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(tile.data() + (d0 + i) * 16, block[i]);
    }
    const __m512i index = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j0)));
    for (int64_t r0 = 0; r0 < p.rows; r0 += kScoreRows) {
      __m512 score[kScoreRows];
      ScoreRows(queries + r0 * hd, tile.data(), hd, score);
      for (int g = 0; g < kScoreRows && r0 + g < p.rows; ++g) {
        const int64_t r = r0 + g;
        const __mmask16 seen = inside & _mm512_cmpge_epi32_mask(
                                            index, _mm512_set1_epi32(static_cast<int>(first[r])));
        _mm512_storeu_ps(scores.data() + r * padded + j0,
                         _mm512_mask_mov_ps(masked, seen, score[g]));
      }
    }
  }
  // Each row's maximum, and its scores turned into weights exp(score - maximum).
  for (int64_t r = 0; r < p.rows; ++r) {
    float* row_scores = scores.data() + r * padded;
    __m512 top_v = masked;
    for (int64_t t = 0; t < padded; t += 16) {
      top_v = _mm512_max_ps(top_v, _mm512_loadu_ps(row_scores + t));
    }
    const float top = _mm512_reduce_max_ps(top_v);
    top_v = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      const __m512 w = Exp(_mm512_sub_ps(_mm512_loadu_ps(row_scores + t), top_v));
      _mm512_storeu_ps(row_scores + t, w);
      total = _mm512_add_ps(total, w);
    }
    float* out = state + r * width;
    out[hd] = top;
    out[hd + 1] = first[r] >= n ? 0.0f : _mm512_reduce_add_ps(total);
  }
  // The outputs, up to 128 dimensions at a time.
  for (int64_t d0 = 0; d0 < hd; d0 += 128) {
    const int64_t parts = std::min<int64_t>(8, (hd - d0) / 16);
    const auto weigh = [&](auto part_count) {
      WeighAllValues<decltype(part_count)::value>(p.rows, scores.data(), padded, values, n,
                                                  stride, state, width, d0);
    };
    switch (parts) {
      case 1: weigh(std::integral_constant<int, 1>()); break;
      case 2: weigh(std::integral_constant<int, 2>()); break;
      case 3: weigh(std::integral_constant<int, 3>()); break;
      case 4: weigh(std::integral_constant<int, 4>()); break;
      case 5: weigh(std::integral_constant<int, 5>()); break;
      case 6: weigh(std::integral_constant<int, 6>()); break;
      case 7: weigh(std::integral_constant<int, 7>()); break;
      default: weigh(std::integral_constant<int, 8>()); break;
    }
  }
}

// The new tokens' part for batch row b, key/value head h: each query row's (max, sum,
// output) over the new keys it sees, into state (rows × (hd + 2) floats), as a span's.
void NewTokens(const Problem& p, int64_t b, int64_t h, float* state) {
  const int64_t hd = p.hd, width = hd + 2, t = p.new_count;
  std::vector<float> scores(t);
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* q = p.q + ((b * p.kv + h) * p.rows + r) * hd;
    const int8_t* sees = p.visible + (b * p.seq + r / p.group) * t;
    float top = kMasked;
    for (int64_t j = 0; j < t; ++j) {
      if (!sees[j]) continue;
      const float* key = p.new_keys + ((b * t + j) * p.kv + h) * hd;
      __m512 dot = _mm512_setzero_ps();
      for (int64_t d = 0; d < hd; d += 16) {
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(key + d), dot);
      }
      scores[j] = _mm512_reduce_add_ps(dot) * p.scale;
      top = std::max(top, scores[j]);
    }
    float* out = state + r * width;
    for (int64_t d = 0; d < hd; d += 16) _mm512_storeu_ps(out + d, _mm512_setzero_ps());
    float sum = 0.0f;
    for (int64_t j = 0; j < t; ++j) {
      if (!sees[j]) continue;
      const float weight = std::exp(scores[j] - top);
      const __m512 w = _mm512_set1_ps(weight);
      const float* value = p.new_values + ((b * t + j) * p.kv + h) * hd;
      for (int64_t d = 0; d < hd; d += 16) {
        _mm512_storeu_ps(out + d,
                         _mm512_fmadd_ps(w, _mm512_loadu_ps(value + d), _mm512_loadu_ps(out + d)));
      }
      sum += weight;
    }
    out[hd] = top;
    out[hd + 1] = sum;
  }
}

ffi::Error PastAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> new_keys,
                         ffi::Buffer<ffi::F32> new_values, ffi::Buffer<ffi::S8> visible,
                         ffi::Buffer<ffi::F32> cache, ffi::Buffer<ffi::S32> row,
                         ffi::Buffer<ffi::S32> length, ffi::Buffer<ffi::S32> positions,
                         int64_t layer, int64_t window, float scale,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto nd = new_keys.dimensions();
  const auto vd = visible.dimensions();
  const auto cd = cache.dimensions();
  const auto pd = positions.dimensions();
  if (qd.size() != 4 || nd.size() != 4 || vd.size() != 3 || cd.size() != 6 || pd.size() != 2 ||
      cd[1] != 2 || cd[4] != qd[1] || cd[5] != qd[3] || qd[3] % 16 != 0 ||
      nd[0] != qd[0] || nd[2] != qd[1] || nd[3] != qd[3] ||
      new_values.element_count() != new_keys.element_count() || vd[0] != qd[0] ||
      vd[1] != pd[1] || vd[2] != nd[1] || row.element_count() != qd[0] ||
      length.element_count() != qd[0] || pd[0] != qd[0] || qd[2] % pd[1] != 0 ||
      layer < 0 || layer >= cd[0]) {
    return ffi::Error::InvalidArgument(
        "past_attention: q [b, kv, R, hd] (hd a multiple of 16), new keys and values "
        "[b, t, kv, hd], visible [b, seq, t], cache [layers, 2, rows, time, kv, hd], row [b], "
        "length [b] and positions [b, seq] expected");
  }
  std::vector<int64_t> task_b, task_t0, task_t1;  // per span: its batch row and positions
  const Problem p{q.typed_data(), new_keys.typed_data(), new_values.typed_data(),
                  visible.typed_data(), nd[1], cache.typed_data(), row.typed_data(),
                  length.typed_data(), positions.typed_data(), qd[0], qd[1], qd[2], qd[3],
                  pd[1], qd[2] / pd[1], cd[2], cd[3], layer, window, scale};
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
      start = std::max<int64_t>(0, nearest - window + 1);
    }
    // Spans of at most kSpan positions, of equal size, and two at least where each would
    // have kMinSpan: the cached keys are read from memory (the step's weights have gone
    // through the cache since), and one core alone reads them slower than two (256 cold
    // positions of tiny_starcoder_py: 36-44 µs in one span, 32-34 µs in two).
    const int64_t n = p.length[b] - start;
    const int64_t count = std::max((n + kSpan - 1) / kSpan, std::min<int64_t>(2, n / kMinSpan));
    const int64_t size = count > 0 ? (n + count - 1) / count : 0;
    for (int64_t t0 = start; t0 < p.length[b]; t0 += size) {
      task_b.push_back(b);
      task_t0.push_back(t0);
      task_t1.push_back(std::min<int64_t>(t0 + size, p.length[b]));
    }
  }
  // Each task: one span of one head; its state, rows × (hd + 2) floats: output, max, sum.
  const int64_t spans = static_cast<int64_t>(task_b.size()), width = p.hd + 2;
  std::vector<float> state(spans * p.kv * p.rows * width);
  auto task_state = [&](int64_t task) { return state.data() + task * p.rows * width; };
  starcoder::Parallel(spans * p.kv, [&](int64_t i) {
    thread_local std::vector<float> scores, tile;
    const int64_t span = i / p.kv, h = i % p.kv, b = task_b[span];
    const int64_t t0 = task_t0[span], t1 = task_t1[span];
    Span(p, b, h, t0, t1, task_state(i), scores, tile);
  });

  // The new tokens' part of each (batch row, head), then its spans merged into it in order.
  std::vector<float> merged(p.rows * width);
  float* out_out = out->typed_data();
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.kv; ++h) {
      NewTokens(p, b, h, merged.data());
      for (int64_t r = 0; r < p.rows; ++r) {
        float* o = merged.data() + r * width;
        float m = o[p.hd], s = o[p.hd + 1];
        for (int64_t span = 0; span < spans; ++span) {
          if (task_b[span] != b) continue;
          const float* part = task_state(span * p.kv + h) + r * width;
          const float part_top = part[p.hd], part_sum = part[p.hd + 1];
          if (part_sum == 0.0f) continue;  // nothing visible in this span
          const float m_new = std::max(m, part_top);
          const float keep = std::exp(m - m_new), add = std::exp(part_top - m_new);
          const __m512 keep_v = _mm512_set1_ps(keep), add_v = _mm512_set1_ps(add);
          for (int64_t d = 0; d < p.hd; d += 16) {
            const __m512 kept = _mm512_mul_ps(_mm512_loadu_ps(o + d), keep_v);
            _mm512_storeu_ps(o + d, _mm512_fmadd_ps(_mm512_loadu_ps(part + d), add_v, kept));
          }
          s = s * keep + part_sum * add;
          m = m_new;
        }
        // A row that sees nothing (padding) gets zeros rather than 0 / 0.
        const __m512 inverse_v = _mm512_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
        float* written = out_out + ((b * p.kv + h) * p.rows + r) * p.hd;
        for (int64_t d = 0; d < p.hd; d += 16) {
          _mm512_storeu_ps(written + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), inverse_v));
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarcoderPastAttention, PastAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new values
                                  .Arg<ffi::Buffer<ffi::S8>>()   // visible
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // length
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

#endif  // __AVX512F__
