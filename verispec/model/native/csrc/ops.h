// The rest of a layer: norms, RoPE, activations, attention. Each works on one row (one query for
// attention) at a time with a fixed order of operations, so no result depends on how many rows a
// forward carries.
#pragma once
#include <math.h>
#include <stdint.h>

#include "exp8.h"
#include "matmul.h"

namespace vs {

static inline float exp1(float x) {  // the same function on one value (tails of rows)
  float in[8] = {x}, out[8];
  _mm256_storeu_ps(out, vs_exp8(_mm256_loadu_ps(in)));
  return out[0];
}

enum Activation : int32_t { SILU = 0, GELU_TANH = 1 };

// gate[i] = act(gate[i]) * up[i] over n values (n a multiple of 8)
static void gated(int32_t kind, float* gate, const float* up, int n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int i = 0; i < n; i += 8) {
    __m256 g = _mm256_loadu_ps(gate + i), a;
    if (kind == SILU) {
      a = _mm256_div_ps(g, _mm256_add_ps(one, vs_exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    } else {  // 0.5 g (1 + tanh(u)), tanh(u) = 1 - 2 / (e^2u + 1)
      const __m256 c = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
      __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, g), _mm256_mul_ps(g, g), g));
      __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f),
                                                  _mm256_add_ps(vs_exp8(_mm256_add_ps(u, u)), one)));
      a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, t));
    }
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(a, _mm256_loadu_ps(up + i)));
  }
}

// out = x / sqrt(mean(x^2) + eps) * w over n values (n a multiple of 8); out may be x
static void rms_norm(const float* x, const float* w, float eps, int n, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum(acc) / static_cast<float>(n) + eps));
  for (int i = 0; i < n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), r), _mm256_loadu_ps(w + i)));
}

// Rotate-half RoPE of one head x [d] with cos, sin [d] of its position
static void rope(float* x, const float* cos_, const float* sin_, int d) {
  const int h = d / 2;
  for (int i = 0; i < h; i += 8) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + h + i);
    __m256 ca = _mm256_loadu_ps(cos_ + i), sa = _mm256_loadu_ps(sin_ + i);
    __m256 cb = _mm256_loadu_ps(cos_ + h + i), sb = _mm256_loadu_ps(sin_ + h + i);
    _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(a, ca), _mm256_mul_ps(b, sa)));
    _mm256_storeu_ps(x + h + i, _mm256_add_ps(_mm256_mul_ps(b, cb), _mm256_mul_ps(a, sb)));
  }
}

static inline float dot(const float* a, const float* b, int d) {
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

// [hsum(a[0]), ..., hsum(a[7])]: the same additions as hsum's, in the same association, so each value
// is bitwise hsum's, for an eighth of its shuffles.
static inline __m256 hsum8(const __m256 a[8]) {
  __m256 s[4];  // s[i]: a[2i]'s four sums lo + hi, then a[2i+1]'s
  for (int i = 0; i < 4; i++)
    s[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  __m256 u[2];  // pairs (s0 + s2, s1 + s3) of two vectors side by side
  for (int i = 0; i < 2; i++)
    u[i] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lanes hold a[0], a[2], a[4], a[6], a[1], a[3], a[5], a[7]
  return _mm256_permutevar8x32_ps(_mm256_hadd_ps(u[0], u[1]), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The three steps of attention for one query head q [d] over keys and values [first, first + n) of
// its kv head (k, v: [slots, d]). slot(t): where key t lies (t itself for a chain; a tree node reads
// its ancestors' slots, in the same order and grouping). Each step has one order of operations for a
// given n, whatever else the forward carries.

// scores[t] = q . k_t * scale, eight keys at a time, each with dot's own sequence
template <class Slot>
static void key_scores(const float* q, const float* k, int first, int n, int d, float scale, float* scores,
                       Slot slot) {
  int t = 0;
  for (; t + 8 <= n; t += 8) {
    const float* kt[8];
    for (int i = 0; i < 8; i++) kt[i] = k + static_cast<int64_t>(slot(first + t + i)) * d;
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    for (int j = 0; j < d; j += 8) {
      const __m256 qj = _mm256_loadu_ps(q + j);
      for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(kt[i] + j), acc[i]);
    }
    _mm256_storeu_ps(scores + t, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
  }
  for (; t < n; t++) scores[t] = dot(q, k + static_cast<int64_t>(slot(first + t)) * d, d) * scale;
}

// scores[t] = e^(scores[t] - max) in place; returns 1 / their sum
static float exponentiate(float* scores, int n) {
  __m256 top8 = _mm256_set1_ps(-INFINITY);  // max_ps keeps its second operand against a NaN, as `>` does
  int t = 0;
  for (; t + 8 <= n; t += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(scores + t), top8);
  float lanes[8], top = -INFINITY;
  _mm256_storeu_ps(lanes, top8);
  for (int i = 0; i < 8; i++) top = lanes[i] > top ? lanes[i] : top;
  for (; t < n; t++) top = scores[t] > top ? scores[t] : top;
  const __m256 m = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (t = 0; t + 8 <= n; t += 8) {
    __m256 e = vs_exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), m));
    _mm256_storeu_ps(scores + t, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  for (; t < n; t++) sum += (scores[t] = exp1(scores[t] - top));
  return 1.0f / sum;
}

// out [d] = inv * sum_t scores[t] v_t, 64 values of out at a time in registers
template <class Slot>
static void weigh_values(const float* scores, const float* v, int first, int n, int d, float inv, float* out,
                         Slot slot) {
  for (int j0 = 0; j0 < d; j0 += 64) {
    const int w = d - j0 < 64 ? d - j0 : 64;
    __m256 acc[8];
    for (int j = 0; j < w / 8; j++) acc[j] = _mm256_setzero_ps();
    for (int t = 0; t < n; t++) {
      const __m256 e = _mm256_set1_ps(scores[t]);
      const float* vt = v + static_cast<int64_t>(slot(first + t)) * d + j0;
      for (int j = 0; j < w / 8; j++) acc[j] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vt + 8 * j), acc[j]);
    }
    for (int j = 0; j < w / 8; j++) _mm256_storeu_ps(out + j0 + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
  }
}

// softmax(q . k * scale) v -> out [d] over keys [first, last]; scores: room for last - first + 1
template <class Slot>
static void attend(const float* q, const float* k, const float* v, int first, int last, int d, float scale,
                   float* scores, float* out, Slot slot) {
  const int n = last - first + 1;
  key_scores(q, k, first, n, d, scale, scores, slot);
  weigh_values(scores, v, first, n, d, exponentiate(scores, n), out, slot);
}

}  // namespace vs
