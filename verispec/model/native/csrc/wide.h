// The exact kernels again with 16-lane AVX-512 vectors, for CPUs that have them (chosen at run time,
// vs_set_wide). A copy rather than one template over the width: the rest of the library is compiled
// for AVX2, and GCC will not inline AVX-512 intrinsics into a function compiled without them. The definition is matmul.h's with 16 lanes: y[m][n] = hsum16(acc), acc taking
// fma(w[n][k..k+16], x[m][k..k+16], acc) for k = 0, 16, 32, ... in order; every path runs exactly
// that sequence, so rows are invariant here as there (the two widths round differently, so one
// machine uses one width throughout). Weights are decoded in registers for tiles of up to 8 rows,
// up to 24 rows in chunks of at most 8, into a panel beyond.
#pragma once
#include "matmul.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

namespace vs {
namespace wide {

static VS_INLINE float hsum16(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

template <class F>
struct AsFloat {  // a quantized group as 2 x 16 floats: elements 0..15 take a0, 16..31 a1
  static VS_INLINE void decode(const uint8_t* row, int g, __m512 w[2]) {
    Group G = F::group(row, g);
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(G.q))), _mm512_set1_ps(G.a0));
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(G.q, 1))),
                         _mm512_set1_ps(G.a1));
    if (F::kMin) {
      w[0] = _mm512_add_ps(w[0], _mm512_set1_ps(G.b));
      w[1] = _mm512_add_ps(w[1], _mm512_set1_ps(G.b));
    }
  }
};

// The 4-bit formats decode through a table of their 16 weights, q * a (+ b) made once per group
// with the same operations AsFloat makes per weight (so the floats are the same), then looked up
// by each nibble: vpermps reads an index's low 4 bits, so the byte holding two nibbles indexes its
// low one as it is. One run of SmolLM2's Q4_1 gate at 1 row: 41 -> 30 ps per weight.
template <class F>
static VS_INLINE void look_up(__m512i low, __m512i high, float a, float b, __m512 w[2]) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 table = _mm512_mul_ps(F::kMin ? q : _mm512_sub_ps(q, _mm512_set1_ps(8)), _mm512_set1_ps(a));
  if (F::kMin) table = _mm512_add_ps(table, _mm512_set1_ps(b));
  w[0] = _mm512_permutexvar_ps(low, table);
  w[1] = _mm512_permutexvar_ps(high, table);
}

static VS_INLINE __m512i bytes16(const uint8_t* p) {  // 16 bytes -> 16 dwords
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <class F>
struct SplitNibbles {  // Q4_0, Q4_1: d (, m), then 16 bytes: element j < 16 the low nibble of byte j, j >= 16 the high
  static VS_INLINE void decode(const uint8_t* row, int g, __m512 w[2]) {
    const uint8_t* b = row + F::kGroupBytes * g;
    const __m512i q = bytes16(b + F::kGroupBytes - 16);
    look_up<F>(q, _mm512_srli_epi32(q, 4), half(b), F::kMin ? half(b + 2) : 0.f, w);
  }
};
template <> struct AsFloat<FQ4_0> : SplitNibbles<FQ4_0> {};
template <> struct AsFloat<FQ4_1> : SplitNibbles<FQ4_1> {};

template <>
struct AsFloat<FQ4_K> {  // sub-block s: byte j of its 32 holds element j, low nibble for even s, high for odd
  static VS_INLINE void decode(const uint8_t* row, int g, __m512 w[2]) {
    const uint8_t* b = row + 144 * (g >> 3);
    const int s = g & 7;
    int sc, mn;
    scale_min_k4(b + 4, s, &sc, &mn);
    const uint8_t* p = b + 16 + 32 * (s >> 1);
    const __m128i shift = _mm_cvtsi32_si128(4 * (s & 1));
    const float a = half(b) * static_cast<float>(sc);
    look_up<FQ4_K>(_mm512_srl_epi32(bytes16(p), shift), _mm512_srl_epi32(bytes16(p + 16), shift), a,
                   -(half(b + 2) * static_cast<float>(mn)), w);
  }
};

struct DF32 {
  static VS_INLINE void decode(const uint8_t* row, int g, __m512 w[2]) {
    const float* p = reinterpret_cast<const float*>(row) + 32 * g;
    w[0] = _mm512_loadu_ps(p);
    w[1] = _mm512_loadu_ps(p + 16);
  }
};

struct DF16 {
  static VS_INLINE void decode(const uint8_t* row, int g, __m512 w[2]) {
    const uint8_t* p = row + 64 * g;
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
  }
};

struct DBF16 {
  static VS_INLINE void decode(const uint8_t* row, int g, __m512 w[2]) {
    const uint8_t* p = row + 64 * g;
    for (int j = 0; j < 2; j++) {
      __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * j)));
      w[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    }
  }
};

template <class D, int R, int C, bool reverse>
static void tile_decoded(const Matrix& W, int n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  prefetch_rows(W, n + C, C);
  __m512 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
  const int groups = W.cols / 32;
  for (int gi = 0; gi < groups; gi++) {
    const int g = group_at(gi, groups, reverse);
    __m512 w[C][2];
    for (int c = 0; c < C; c++) D::decode(W.data + (n + c) * W.row_bytes, g, w[c]);
    for (int j = 0; j < 2; j++)
      for (int r = 0; r < R; r++) {
        const __m512 xv = _mm512_loadu_ps(x + r * ldx + 32 * g + 16 * j);
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(w[c][j], xv, acc[r][c]);
      }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) y[r * ldy + n + c] = hsum16(acc[r][c]);
}

template <int R, int C, bool reverse>
static void tile_panel(const float* panel, int K, const float* x, int64_t ldx, float* y, int64_t ldy, int n) {
  __m512 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
  for (int ki = 0; ki < K; ki += 16) {
    const int k = 32 * group_at(ki / 32, K / 32, reverse) + ki % 32;
    __m512 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm512_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < C; c++) {
      __m512 w = _mm512_loadu_ps(panel + c * K + k);
      for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(w, xv[r], acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) y[r * ldy + n + c] = hsum16(acc[r][c]);
}

// Columns per tile of weights decoded in registers: 8 for one row, else 4; each x vector loaded
// serves all of them. 8 rows x 4 columns spill some of their 32 accumulators and still beat 8 x 2
// (single thread, Q4_1 1536 x 576, ps per weight at 6/8/12/16 rows: 80/122/159/241 with 2 columns
// from 5 rows on, 76/107/147/206 with 4; 16 rows in one tile of 2 columns: 346). Two rows with 8
// columns made a SmolLM2 forward of 2 rows slower than one of 3 (7.5 against 6.8 ms; 4: 6.1 ms).
static constexpr int tile_columns(int rows) { return rows <= 1 ? 8 : 4; }

template <class D, int C>
static void tile_rows(const Matrix& W, int n, int M, const float* x, int64_t ldx, float* y, int64_t ldy) {
#define VS_ROWS(R) \
  case R: \
    return in_order(R, [&](auto reverse) { wide::tile_decoded<D, R, std::min(C, tile_columns(R)), reverse>(W, n, x, ldx, y, ldy); });
  switch (M) {
    VS_ROWS(1) VS_ROWS(2) VS_ROWS(3) VS_ROWS(4) VS_ROWS(5) VS_ROWS(6) VS_ROWS(7) VS_ROWS(8)
  }
#undef VS_ROWS
}

template <int R>
static void panel_rows(const float* panel, int K, int C, const float* x, int64_t ldx, float* y, int64_t ldy, int n) {
  in_order(R, [&](auto reverse) {
    switch (C) {
      case 4: return wide::tile_panel<R, 4, reverse>(panel, K, x, ldx, y, ldy, n);
      case 3: return wide::tile_panel<R, 3, reverse>(panel, K, x, ldx, y, ldy, n);
      case 2: return wide::tile_panel<R, 2, reverse>(panel, K, x, ldx, y, ldy, n);
      default: return wide::tile_panel<R, 1, reverse>(panel, K, x, ldx, y, ldy, n);
    }
  });
}

static constexpr int kDecodedRows = 8;
// Up to this many rows, chunks of weights decoded in registers (each chunk decodes again) beat one
// decoded panel: SmolLM2 forwards of 9/12/16 rows 18.0/19.2/22.7 -> 13.7/15.8/20.6 ms, of 24 rows
// 21.9 -> 20.0; from 32 rows on the panel is faster (64 rows: 47 against 55 ms).
static constexpr int kSplitRows = 24;

template <class D>
static void columns(const Matrix& W, int n0, int n1, int M, const float* x, int64_t ldx, float* y, int64_t ldy) {
  if (M > kDecodedRows && M <= kSplitRows) {
    const int per = chunk_rows(M, kDecodedRows);
    for (int m = 0; m < M; m += per)
      wide::columns<D>(W, n0, n1, std::min(per, M - m), x + m * ldx, ldx, y + m * ldy, ldy);
    return;
  }
  if (M <= kDecodedRows) {
    const int C = tile_columns(M);
    int n = n0;
    for (; C >= 8 && n + 8 <= n1; n += 8) wide::tile_rows<D, 8>(W, n, M, x, ldx, y, ldy);
    for (; C >= 4 && n + 4 <= n1; n += 4) wide::tile_rows<D, 4>(W, n, M, x, ldx, y, ldy);
    for (; C >= 2 && n + 2 <= n1; n += 2) wide::tile_rows<D, 2>(W, n, M, x, ldx, y, ldy);
    for (; n < n1; n++) wide::tile_rows<D, 1>(W, n, M, x, ldx, y, ldy);
    return;
  }
  thread_local std::vector<float> panel;
  const int K = W.cols;
  panel.resize(static_cast<size_t>(4) * K);
  for (int n = n0; n < n1; n += 4) {
    const int C = std::min(4, n1 - n);
    for (int c = 0; c < C; c++)
      for (int g = 0; g < K / 32; g++) {
        __m512 w[2];
        D::decode(W.data + (n + c) * W.row_bytes, g, w);
        _mm512_storeu_ps(&panel[c * K + 32 * g], w[0]);
        _mm512_storeu_ps(&panel[c * K + 32 * g + 16], w[1]);
      }
    int m = 0;
    for (; m + 6 <= M; m += 6) wide::panel_rows<6>(panel.data(), K, C, x + m * ldx, ldx, y + m * ldy, ldy, n);
    switch (M - m) {  // the last rows in one tile too: a lone row's single chain of FMAs is slow
      case 5: wide::panel_rows<5>(panel.data(), K, C, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
      case 4: wide::panel_rows<4>(panel.data(), K, C, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
      case 3: wide::panel_rows<3>(panel.data(), K, C, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
      case 2: wide::panel_rows<2>(panel.data(), K, C, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
      case 1: wide::panel_rows<1>(panel.data(), K, C, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
    }
  }
}

static void exact_columns(const Matrix& W, int n0, int n1, int M, const float* x, int64_t ldx, float* y, int64_t ldy) {
  with_reader<wide::AsFloat, wide::DF32, wide::DF16, wide::DBF16>(
      W.type, [&](auto reader) { wide::columns<decltype(reader)>(W, n0, n1, M, x, ldx, y, ldy); });
}

}  // namespace wide
}  // namespace vs

#pragma GCC pop_options
