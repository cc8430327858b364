// The int8 kernels again with 16-lane AVX-512 VNNI, for CPUs that have it (chosen with the wide exact
// kernels, vs_set_wide). One instruction (vpdpbusd) takes the integer dot of two groups of 32 with
// one row, where the AVX2 kernel needs five per group (sign, sign, maddubs, madd, and the scale's
// broadcast), so a verify of M rows costs far less per row.
//
// Numerics: weights and activations are matmul.h's (q signed int8 per group of 32, scales a0, a1, b;
// activations quantized per row in groups of 32 with d and s = d * sum q). Two groups make a pair:
// lanes 0..7 hold group 2p (lanes 0..3 its elements 0..15, scale a0; 4..7 elements 16..31, a1),
// lanes 8..15 group 2p + 1. vpdpbusd multiplies unsigned by signed bytes, so the weights enter as
// u = q + 128 and each lane's accumulator starts at -128 * (the sum of its 4 activations): the lane's
// integer dot is exact. Per pair, in pair order:
//   acc = fma(float(dot), a * d, acc)
// and y = hsum16(acc); formats with a minimum add hsum16(low), low = fma(b[g..g+16], s[g..g+16], low)
// over the groups in order (zeros past the last). Every (row, column) runs that sequence whatever the
// tile, so rows are invariant.
// (A different rounding from the AVX2 int8 kernels: one machine uses one width throughout.)
#pragma once
#include "wide.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace vs {
namespace vnni {

static constexpr int padded(int groups) { return (groups + 15) / 16 * 16; }

// What quantize_rows adds for these kernels: per row and pair of groups, the activations padded to
// whole pairs and, per lane, the accumulator's start and d; per row s padded to 16 groups.
static void prepare(QuantRows& x) {
  const int K = x.cols, G = K / 32, P = (G + 1) / 2, M = static_cast<int>(x.q.size()) / K;
  x.pairs = P;
  x.qp.assign(static_cast<size_t>(M) * P * 64, 0);
  x.start.assign(static_cast<size_t>(M) * P * 16, 0);
  x.dv.assign(x.start.size(), 0.f);
  x.sv.assign(static_cast<size_t>(M) * padded(G), 0.f);
  for (int m = 0; m < M; m++)
    for (int g = 0; g < G; g++) {
      const int8_t* q = &x.q[static_cast<size_t>(m) * K + 32 * g];
      const size_t pair = static_cast<size_t>(m) * P + g / 2, lane = pair * 16 + (g % 2) * 8;
      memcpy(&x.qp[pair * 64 + (g % 2) * 32], q, 32);
      for (int l = 0; l < 8; l++) {
        x.start[lane + l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
        x.dv[lane + l] = x.d[m * G + g];
      }
      x.sv[static_cast<size_t>(m) * padded(G) + g] = x.s[m * G + g];
    }
}

struct Pair {  // one column's weights for a pair of groups
  __m512i u;   // q + 128
  __m512 a;
};

// The pair's weights; the groups' minima go to b[2p], b[2p + 1].
template <class F>
static VS_INLINE Pair pair_of(const uint8_t* row, int p, int groups, float* b) {
  const __m256i bias = _mm256_set1_epi8(-128);
  const Group g0 = F::group(row, 2 * p);
  const Group g1 = 2 * p + 1 < groups ? F::group(row, 2 * p + 1) : Group{_mm256_set1_epi8(-128), 0.f, 0.f, 0.f};
  if (F::kMin) b[2 * p] = g0.b, b[2 * p + 1] = g1.b;
  const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return {_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_xor_si256(g0.q, bias)), _mm256_xor_si256(g1.q, bias), 1),
          _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_setr_ps(g0.a0, g0.a1, g1.a0, g1.a1)))};
}

template <class F, int R, int C>
static void tile(const Matrix& W, int n, const QuantRows& x, int m0, float* y, int64_t ldy) {
  if (m0 == 0) prefetch_rows(W, n + C, C);
  __m512 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
  const int groups = W.cols / 32, P = x.pairs, S = padded(groups);
  thread_local std::vector<float> minima;  // [C][S]: each column's b per group, zeros past the last
  if (F::kMin) minima.assign(static_cast<size_t>(C) * S, 0.f);
  const bool reverse = reversed_groups(R);
  for (int pi = 0; pi < P; pi++) {
    const int p = group_at(pi, P, reverse);
    Pair w[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) w[c] = pair_of<F>(W.data + (n + c) * W.row_bytes, p, groups, &minima[c * S]);
#pragma GCC unroll 16  // whole, so that the accumulators stay in registers
    for (int r = 0; r < R; r++) {
      const size_t at = static_cast<size_t>(m0 + r) * P + p;
      const __m512i xq = _mm512_loadu_si512(&x.qp[at * 64]);
      const __m512i start = _mm512_loadu_si512(&x.start[at * 16]);
      const __m512 d = _mm512_loadu_ps(&x.dv[at * 16]);
#pragma GCC unroll 4
      for (int c = 0; c < C; c++) {
        const __m512i dot = _mm512_dpbusd_epi32(start, w[c].u, xq);
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w[c].a, d), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      float sum = wide::hsum16(acc[r][c]);
      if (F::kMin) {
        const float* s = &x.sv[static_cast<size_t>(m0 + r) * S];
        __m512 low = _mm512_setzero_ps();
        for (int g = 0; g < S; g += 16)
          low = _mm512_fmadd_ps(_mm512_loadu_ps(&minima[c * S + g]), _mm512_loadu_ps(s + g), low);
        sum += wide::hsum16(low);
      }
      y[(m0 + r) * ldy + n + c] = sum;
    }
}

// Columns per tile. Up to 32 accumulators, some of them spilled, beat 16 in registers: single thread,
// Q4_1 1536 x 576, ps per weight at 6/8/12/16 rows 96/104/226/289 with 4/2/1/1 columns, 89/109/156/215
// with 4/2/2/2.
static constexpr int columns_for(int rows) { return rows <= 6 ? 4 : 2; }

template <class F, int C>
static void tile_rows(const Matrix& W, int n, int rows, const QuantRows& x, int m0, float* y, int64_t ldy) {
#define VS_ROWS(R) case R: return tile<F, R, (C < columns_for(R) ? C : columns_for(R))>(W, n, x, m0, y, ldy);
  switch (rows) {
    VS_ROWS(1) VS_ROWS(2) VS_ROWS(3) VS_ROWS(4) VS_ROWS(5) VS_ROWS(6) VS_ROWS(7) VS_ROWS(8)
    VS_ROWS(9) VS_ROWS(10) VS_ROWS(11) VS_ROWS(12) VS_ROWS(13) VS_ROWS(14) VS_ROWS(15) VS_ROWS(16)
  }
#undef VS_ROWS
}

static constexpr int kTileRows = 16;  // weights are decoded once per 16 rows

template <class F>
static void columns(const Matrix& W, int n0, int n1, int M, const QuantRows& x, float* y, int64_t ldy) {
  for (int m = 0; m < M; m += kTileRows) {
    const int rows = std::min(kTileRows, M - m), C = columns_for(rows);
    int n = n0;
    for (; C == 4 && n + 4 <= n1; n += 4) tile_rows<F, 4>(W, n, rows, x, m, y, ldy);
    for (; C == 2 && n + 2 <= n1; n += 2) tile_rows<F, 2>(W, n, rows, x, m, y, ldy);
    for (; n < n1; n++) tile_rows<F, 1>(W, n, rows, x, m, y, ldy);
  }
}

static void int8_columns(const Matrix& W, int n0, int n1, int M, const QuantRows& x, float* y, int64_t ldy) {
  with_format(W.type, [&](auto format) { vnni::columns<decltype(format)>(W, n0, n1, M, x, y, ldy); });
}

}  // namespace vnni
}  // namespace vs

#pragma GCC pop_options
