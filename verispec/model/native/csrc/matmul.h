// y = x W^T over M rows, each output accumulated in one order whatever M is.
//
// exact (fp32 activations): y[m][n] = hsum(acc), acc (8 lanes) = fma(w[n][k..k+8], x[m][k..k+8], acc)
// over k = 0, 8, 16, ... in order, from zero. Every path below (weights decoded in registers for
// tiles of M <= 8, in chunks of them up to 16 rows, decoded once into a panel beyond; any tile shape,
// any thread) runs exactly that sequence for every (m, n), so a k-row verify equals k one-row steps
// bit for bit.
//
// int8 (llama.cpp's numerics): x is quantized per row in groups of 32 (d = max|x| / 127, s = d * sum q);
// per group the integer dot of q_w and q_x (8 lanes of 4 products each) is scaled by a * d and added
// to acc in group order; formats with a minimum add b * s to a scalar in the same order;
// y = hsum(acc) + that scalar. Quantization is per row, so this mode is row-invariant too.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "formats.h"
#include "pool.h"

namespace vs {

struct Matrix {  // one weight matrix [rows = outputs, cols = inputs] as it lies in the file
  const uint8_t* data;
  int32_t type;
  int32_t rows, cols;
  int64_t row_bytes;
};

// Test hook (tests/test_native.py): when set, tiles of more than one row take their groups in reverse
// order, the kind of M-dependent order that breaks invariance; the invariance test must catch it.
static int planted_order_bug = 0;

static inline bool reversed_groups(int rows) { return planted_order_bug && rows > 1; }
static inline int group_at(int gi, int groups, bool reverse) { return reverse ? groups - 1 - gi : gi; }
// fn(std::true_type{}) for a tile the hook reverses, else fn(std::false_type{}): tiles take the order
// as a constant, so that the hook costs them nothing (tested in their group loops, it made the 16-lane
// kernels 10-25 % slower at 1-16 rows). The VNNI tiles keep the run-time test: compiled with the
// constant they were slower, 96 -> 144 ps per weight at 6 rows.
template <class Fn>
static VS_INLINE void in_order(int rows, Fn&& fn) {
  if (reversed_groups(rows)) return fn(std::true_type{});
  fn(std::false_type{});
}

struct QuantRows {  // activations quantized for the int8 kernels: per row cols int8, cols / 32 d and s
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int cols = 0;
  // the same in pairs of groups, for the VNNI kernels (vnni.h prepare)
  std::vector<int8_t> qp;
  std::vector<int32_t> start;
  std::vector<float> dv, sv;
  int pairs = 0;
};

// The 16-lane kernels (wide.h: exact; vnni.h: int8), used where the CPU has AVX-512 (and VNNI)
// unless vs_set_wide(0) said not.
static bool has_wide() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
static bool has_vnni() { return has_wide() && __builtin_cpu_supports("avx512vnni"); }
static bool use_wide = has_wide(), use_vnni = has_vnni();
namespace wide {
static void exact_columns(const Matrix& W, int n0, int n1, int M, const float* x, int64_t ldx, float* y, int64_t ldy);
}
namespace vnni {
static void prepare(QuantRows& x);
static void int8_columns(const Matrix& W, int n0, int n1, int M, const QuantRows& x, float* y, int64_t ldy);
}

// The rows of the next tile, asked for while this one computes: a decode step reads every weight once,
// from memory, and a tile's compute is about as long as memory's latency.
static inline void prefetch_rows(const Matrix& W, int first, int count) {
  const int last = std::min(first + count, W.rows);
  for (int r = first; r < last; r++)
    for (int64_t off = 0; off < W.row_bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(W.data + r * W.row_bytes + off), _MM_HINT_T0);
}

static VS_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// --- exact ------------------------------------------------------------------------------------------

// R rows x C columns, weights decoded in registers once per group for all R rows.
template <class D, int R, int C, bool reverse>
static void tile_decoded(const Matrix& W, int n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  prefetch_rows(W, n + C, C);
  __m256 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
  const int groups = W.cols / 32;
  for (int gi = 0; gi < groups; gi++) {
    const int g = group_at(gi, groups, reverse);
    for (int c = 0; c < C; c++) {
      __m256 w[4];
      D::decode(W.data + (n + c) * W.row_bytes, g, w);
      for (int r = 0; r < R; r++) {
        const float* xp = x + r * ldx + 32 * g;
        for (int j = 0; j < 4; j++) acc[r][c] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xp + 8 * j), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) y[r * ldy + n + c] = hsum(acc[r][c]);
}

// R rows x C columns over weights already decoded into a panel [C][K] of floats.
template <int R, int C, bool reverse>
static void tile_panel(const float* panel, int K, const float* x, int64_t ldx, float* y, int64_t ldy, int n) {
  __m256 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
  for (int ki = 0; ki < K; ki += 8) {
    const int k = 32 * group_at(ki / 32, K / 32, reverse) + ki % 32;
    __m256 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < C; c++) {
      __m256 w = _mm256_loadu_ps(panel + c * K + k);
      for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(w, xv[r], acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) y[r * ldy + n + c] = hsum(acc[r][c]);
}

template <class D, int C>
static void columns_small(const Matrix& W, int n, int M, const float* x, int64_t ldx, float* y, int64_t ldy) {
  in_order(M, [&](auto reverse) {
    switch (M) {  // one tile of all M rows; fewer columns per tile as rows grow (registers)
      case 1: tile_decoded<D, 1, C, reverse>(W, n, x, ldx, y, ldy); break;
      case 2: tile_decoded<D, 2, C, reverse>(W, n, x, ldx, y, ldy); break;
      case 3: tile_decoded<D, 3, (C > 2 ? 2 : C), reverse>(W, n, x, ldx, y, ldy); break;
      case 4: tile_decoded<D, 4, (C > 2 ? 2 : C), reverse>(W, n, x, ldx, y, ldy); break;
      case 5: tile_decoded<D, 5, 1, reverse>(W, n, x, ldx, y, ldy); break;
      case 6: tile_decoded<D, 6, 1, reverse>(W, n, x, ldx, y, ldy); break;
      case 7: tile_decoded<D, 7, 1, reverse>(W, n, x, ldx, y, ldy); break;
      default: tile_decoded<D, 8, 1, reverse>(W, n, x, ldx, y, ldy); break;
    }
  });
}

static constexpr int kSmallRows = 8;   // up to this many rows, weights are decoded in registers
// Up to this many rows, chunks of at most kSmallRows (each decoding the weights again) beat one
// decoded panel: SmolLM2 forwards of 12/16 rows 25.5/35.1 -> 23.7/32.7 ms; of 24 the panel wins.
static constexpr int kSplitRows = 16;
// Rows per chunk when M rows go in balanced chunks of at most `most`.
static inline int chunk_rows(int M, int most) {
  const int chunks = (M + most - 1) / most;
  return (M + chunks - 1) / chunks;
}
// Columns per work item: about 8 items per thread, so that a slow core takes fewer while claims stay
// rare next to the work (one claim costs a cache line's trip between cores); a multiple of 16.
static int chunk_columns(int columns, int threads) {
  const int per = columns / (8 * threads);
  return std::max(16, (per + 15) / 16 * 16);
}

// Columns [n0, n1) of y for all M rows.
template <class D>
static void columns(const Matrix& W, int n0, int n1, int M, const float* x, int64_t ldx, float* y, int64_t ldy) {
  if (M > kSmallRows && M <= kSplitRows) {
    const int per = chunk_rows(M, kSmallRows);
    for (int m = 0; m < M; m += per) columns<D>(W, n0, n1, std::min(per, M - m), x + m * ldx, ldx, y + m * ldy, ldy);
    return;
  }
  if (M <= kSmallRows) {
    // columns per tile shrink with M so that accumulators stay in registers
    int n = n0;
    const int C = M <= 2 ? 4 : M <= 4 ? 2 : 1;
    for (; C == 4 && n + 4 <= n1; n += 4) columns_small<D, 4>(W, n, M, x, ldx, y, ldy);
    for (; C >= 2 && n + 2 <= n1; n += 2) columns_small<D, 2>(W, n, M, x, ldx, y, ldy);
    for (; n < n1; n++) columns_small<D, 1>(W, n, M, x, ldx, y, ldy);
    return;
  }
  thread_local std::vector<float> panel;
  const int K = W.cols;
  panel.resize(static_cast<size_t>(4) * K);
  for (int n = n0; n < n1; n += 4) {
    const int C = std::min(4, n1 - n);
    for (int c = 0; c < C; c++)
      for (int g = 0; g < K / 32; g++) {
        __m256 w[4];
        D::decode(W.data + (n + c) * W.row_bytes, g, w);
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(&panel[c * K + 32 * g + 8 * j], w[j]);
      }
    int m = 0;
    in_order(3, [&](auto reverse) {
      for (; m + 3 <= M; m += 3) {
        const float* xm = x + m * ldx;
        float* ym = y + m * ldy;
        switch (C) {
          case 4: tile_panel<3, 4, reverse>(panel.data(), K, xm, ldx, ym, ldy, n); break;
          case 3: tile_panel<3, 3, reverse>(panel.data(), K, xm, ldx, ym, ldy, n); break;
          case 2: tile_panel<3, 2, reverse>(panel.data(), K, xm, ldx, ym, ldy, n); break;
          default: tile_panel<3, 1, reverse>(panel.data(), K, xm, ldx, ym, ldy, n); break;
        }
      }
    });
    for (; m < M; m++)
      for (int c = 0; c < C; c++)
        tile_panel<1, 1, false>(panel.data() + c * K, K, x + m * ldx, ldx, y + m * ldy, ldy, n + c);
  }
}

// --- int8 ---------------------------------------------------------------------------------------

static void quantize_rows(const float* x, int M, int64_t ldx, int K, QuantRows& out) {
  const int G = K / 32;
  out.cols = K;
  out.q.resize(static_cast<size_t>(M) * K);
  out.d.resize(static_cast<size_t>(M) * G);
  out.s.resize(static_cast<size_t>(M) * G);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int m = 0; m < M; m++)
    for (int g = 0; g < G; g++) {
      const float* p = x + m * ldx + 32 * g;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(p + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      }
      __m128 t = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      t = _mm_max_ps(t, _mm_movehl_ps(t, t));
      t = _mm_max_ss(t, _mm_movehdup_ps(t));
      const float d = _mm_cvtss_f32(t) / 127.0f;
      const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
      __m256i i[4];
      for (int j = 0; j < 4; j++)
        i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_hadd_epi32(s4, s4);
      s4 = _mm_hadd_epi32(s4, s4);
      // pack 4 x 8 int32 -> 32 int8 in element order
      __m256i a = _mm256_packs_epi32(i[0], i[1]), b = _mm256_packs_epi32(i[2], i[3]);
      __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out.q[static_cast<size_t>(m) * K + 32 * g]), q);
      out.d[m * G + g] = d;
      out.s[m * G + g] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  if (use_vnni) vnni::prepare(out);
}

template <class F, int R, int C, bool reverse>
static void tile_int8(const Matrix& W, int n, const QuantRows& xq, int m0, float* y, int64_t ldy) {
  if (m0 == 0) prefetch_rows(W, n + C, C);
  __m256 acc[R][C];
  float low[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps(), low[r][c] = 0.f;
  const int K = W.cols, groups = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int gi = 0; gi < groups; gi++) {
    const int g = group_at(gi, groups, reverse);
    for (int c = 0; c < C; c++) {
      Group G = F::group(W.data + (n + c) * W.row_bytes, g);
      const __m256i aw = _mm256_sign_epi8(G.q, G.q);
      const __m256 a = _mm256_set_m128(_mm_set1_ps(G.a1), _mm_set1_ps(G.a0));
      for (int r = 0; r < R; r++) {
        const int row = m0 + r;
        __m256i xv = load32(reinterpret_cast<const uint8_t*>(&xq.q[static_cast<size_t>(row) * K + 32 * g]));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, G.q)), ones);
        const __m256 scale = _mm256_mul_ps(a, _mm256_set1_ps(xq.d[row * groups + g]));
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][c]);
        if (F::kMin) low[r][c] = __builtin_fmaf(G.b, xq.s[row * groups + g], low[r][c]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) y[(m0 + r) * ldy + n + c] = hsum(acc[r][c]) + low[r][c];
}

template <class F, int C>
static void columns_int8_tile(const Matrix& W, int n, int rows, const QuantRows& xq, int m0, float* y, int64_t ldy) {
  in_order(rows, [&](auto reverse) {
    switch (rows) {
      case 1: tile_int8<F, 1, C, reverse>(W, n, xq, m0, y, ldy); break;
      case 2: tile_int8<F, 2, (C > 2 ? 2 : C), reverse>(W, n, xq, m0, y, ldy); break;
      case 3: tile_int8<F, 3, 1, reverse>(W, n, xq, m0, y, ldy); break;
      default: tile_int8<F, 4, 1, reverse>(W, n, xq, m0, y, ldy); break;
    }
  });
}

template <class F>
static void columns_int8(const Matrix& W, int n0, int n1, int M, const QuantRows& xq, float* y, int64_t ldy) {
  for (int m = 0; m < M; m += 4) {
    const int rows = std::min(4, M - m);
    int n = n0;
    const int C = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    for (; C == 4 && n + 4 <= n1; n += 4) columns_int8_tile<F, 4>(W, n, rows, xq, m, y, ldy);
    for (; C >= 2 && n + 2 <= n1; n += 2) columns_int8_tile<F, 2>(W, n, rows, xq, m, y, ldy);
    for (; n < n1; n++) columns_int8_tile<F, 1>(W, n, rows, xq, m, y, ldy);
  }
}

// --- dispatch --------------------------------------------------------------------------------------

// Columns [n0, n1) of W for all M rows; xq non-null selects the int8 kernels for quantized formats.
static void matmul_columns(const Matrix& W, int n0, int n1, int M, const float* x, int64_t ldx,
                           const QuantRows* xq, float* y, int64_t ldy) {
  if (xq != nullptr && quantized(W.type) && use_vnni) return vnni::int8_columns(W, n0, n1, M, *xq, y, ldy);
  if (xq != nullptr && quantized(W.type))
    return with_format(W.type, [&](auto format) { columns_int8<decltype(format)>(W, n0, n1, M, *xq, y, ldy); });
  if (use_wide) return wide::exact_columns(W, n0, n1, M, x, ldx, y, ldy);
  with_reader<AsFloat, DF32, DF16, DBF16>(W.type,
                                          [&](auto reader) { columns<decltype(reader)>(W, n0, n1, M, x, ldx, y, ldy); });
}

// Weights of one row as floats (an embedding lookup).
static void decode_row(const Matrix& W, int row, float* out) {
  const uint8_t* p = W.data + row * W.row_bytes;
  with_reader<AsFloat, DF32, DF16, DBF16>(W.type, [&](auto reader) {
    __m256 w[4];
    for (int g = 0; g < W.cols / 32; g++) {
      decltype(reader)::decode(p, g, w);
      for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + 32 * g + 8 * j, w[j]);
    }
  });
}

// Several matrices over the same input side by side in y (q, k and v; gate and up): one parallel
// region for all of them. parts[i] fills columns [offset_i, offset_i + rows_i) of y.
static void matmul(Pool& pool, const Matrix* parts, int nparts, int M, const float* x, int64_t ldx,
                   const QuantRows* xq, float* y, int64_t ldy) {
  std::vector<int> part_of, first;
  std::vector<int> offset(nparts + 1, 0);
  for (int p = 0; p < nparts; p++) offset[p + 1] = offset[p] + parts[p].rows;
  const int chunk = chunk_columns(offset[nparts], pool.size());
  for (int p = 0; p < nparts; p++)
    for (int n = 0; n < parts[p].rows; n += chunk) part_of.push_back(p), first.push_back(n);
  pool.run(static_cast<int>(part_of.size()), [&](int item) {
    const Matrix& W = parts[part_of[item]];
    const int n0 = first[item], n1 = std::min(n0 + chunk, W.rows);
    matmul_columns(W, n0, n1, M, x, ldx, xq, y + offset[part_of[item]], ldy);
  });
}

}  // namespace vs
