// Weight formats as they lie in a GGUF file, read 32 weights (a group) at a time.
//
// Every quantized format reads as a Group: 32 signed int8 values q and, per half of the group,
// a scale a (elements 0..15: a0, 16..31: a1; they differ only in Q6_K, whose scales cover 16),
// plus an offset b for the formats with a minimum. The weight is q * a + b, computed with one
// rounding per operation exactly as gguf.quants' reference dequantizer does. The exact kernels
// turn a group into floats; the int8 kernels take q as it is. Dense formats (F32, F16, BF16)
// only have the float form.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

// Readers are inlined into every kernel: called, they cost as much as the work they do.
#define VS_INLINE inline __attribute__((always_inline))

namespace vs {

// ggml's type numbers (gguf.GGMLQuantizationType)
enum Type : int32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

struct Group {
  __m256i q;
  float a0, a1, b;
};

static VS_INLINE float half(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

static VS_INLINE __m256i nibbles(const uint8_t* p) {  // 16 bytes -> 32: low nibbles, then high ones
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

static VS_INLINE __m256i bits16(const uint8_t* p) {  // 32 bits -> 32 bytes of 0 or 16
  uint32_t x;
  memcpy(&x, p, 4);
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), shuffle);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(16));
}

static VS_INLINE __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

static VS_INLINE __m256i shift_right(__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }

// Q4_K / Q5_K: the 6-bit scale and minimum of sub-block s (0..7) from the 12 packed bytes
static VS_INLINE void scale_min_k4(const uint8_t* q, int s, int* sc, int* mn) {
  if (s < 4) {
    *sc = q[s] & 63;
    *mn = q[s + 4] & 63;
  } else {
    *sc = (q[s + 4] & 0x0F) | ((q[s - 4] >> 2) & 0x30);
    *mn = (q[s + 4] >> 4) | ((q[s] >> 2) & 0x30);
  }
}

struct FQ8_0 {
  static constexpr int kGroupBytes = 34, kGroupsPerBlock = 1;
  static constexpr bool kMin = false;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 34 * g;
    float d = half(b);
    return {load32(b + 2), d, d, 0.f};
  }
};

struct FQ4_0 {
  static constexpr int kGroupBytes = 18, kGroupsPerBlock = 1;
  static constexpr bool kMin = false;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 18 * g;
    float d = half(b);
    return {_mm256_sub_epi8(nibbles(b + 2), _mm256_set1_epi8(8)), d, d, 0.f};
  }
};

struct FQ4_1 {
  static constexpr int kGroupBytes = 20, kGroupsPerBlock = 1;
  static constexpr bool kMin = true;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 20 * g;
    float d = half(b);
    return {nibbles(b + 4), d, d, half(b + 2)};
  }
};

struct FQ5_0 {
  static constexpr int kGroupBytes = 22, kGroupsPerBlock = 1;
  static constexpr bool kMin = false;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 22 * g;
    float d = half(b);
    __m256i q = _mm256_or_si256(nibbles(b + 6), bits16(b + 2));
    return {_mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d, 0.f};
  }
};

struct FQ5_1 {
  static constexpr int kGroupBytes = 24, kGroupsPerBlock = 1;
  static constexpr bool kMin = true;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 24 * g;
    float d = half(b);
    return {_mm256_or_si256(nibbles(b + 8), bits16(b + 4)), d, d, half(b + 2)};
  }
};

struct FQ4_K {  // 256 weights: d, dmin, 12 bytes of scales, 128 bytes of nibbles
  static constexpr int kGroupBytes = 18, kGroupsPerBlock = 8;  // 144 bytes per block
  static constexpr bool kMin = true;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 144 * (g >> 3);
    int s = g & 7, sc, mn;
    scale_min_k4(b + 4, s, &sc, &mn);
    __m256i q = _mm256_and_si256(shift_right(load32(b + 16 + 32 * (s >> 1)), 4 * (s & 1)), _mm256_set1_epi8(0x0F));
    float a = half(b) * static_cast<float>(sc);
    return {q, a, a, -(half(b + 2) * static_cast<float>(mn))};
  }
};

struct FQ5_K {  // 256 weights: d, dmin, 12 bytes of scales, 32 bytes of high bits, 128 of nibbles
  static constexpr int kGroupBytes = 22, kGroupsPerBlock = 8;  // 176 bytes per block
  static constexpr bool kMin = true;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 176 * (g >> 3);
    int s = g & 7, sc, mn;
    scale_min_k4(b + 4, s, &sc, &mn);
    __m256i lo = _mm256_and_si256(shift_right(load32(b + 48 + 32 * (s >> 1)), 4 * (s & 1)), _mm256_set1_epi8(0x0F));
    __m256i hi = _mm256_and_si256(shift_right(load32(b + 16), s), _mm256_set1_epi8(1));
    float a = half(b) * static_cast<float>(sc);
    return {_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), a, a, -(half(b + 2) * static_cast<float>(mn))};
  }
};

struct FQ6_K {  // 256 weights: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d
  static constexpr int kGroupBytes = 0, kGroupsPerBlock = 8;  // 210 bytes per block (not a multiple)
  static constexpr bool kMin = false;
  static VS_INLINE Group group(const uint8_t* row, int g) {
    const uint8_t* b = row + 210 * (g >> 3);
    int local = g & 7, h = local >> 2, p = local & 3;
    __m256i lo = _mm256_and_si256(shift_right(load32(b + 64 * h + 32 * (p & 1)), 4 * (p >> 1)), _mm256_set1_epi8(0x0F));
    __m256i hi = _mm256_and_si256(shift_right(load32(b + 128 + 32 * h), 2 * p), _mm256_set1_epi8(3));
    __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 2 * local;
    float d = half(b + 208);
    return {q, d * static_cast<float>(sc[0]), d * static_cast<float>(sc[1]), 0.f};
  }
};

// A quantized format's group as 4 x 8 floats: q * a (+ b).
template <class F>
struct AsFloat {
  static VS_INLINE void decode(const uint8_t* row, int g, __m256 w[4]) {
    Group G = F::group(row, g);
    __m128i lo = _mm256_castsi256_si128(G.q), hi = _mm256_extracti128_si256(G.q, 1);
    __m256 a0 = _mm256_set1_ps(G.a0), a1 = _mm256_set1_ps(G.a1);
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), a0);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), a0);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), a1);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), a1);
    if (F::kMin) {
      __m256 b = _mm256_set1_ps(G.b);
      for (int j = 0; j < 4; j++) w[j] = _mm256_add_ps(w[j], b);
    }
  }
};

struct DF32 {
  static VS_INLINE void decode(const uint8_t* row, int g, __m256 w[4]) {
    const float* p = reinterpret_cast<const float*>(row) + 32 * g;
    for (int j = 0; j < 4; j++) w[j] = _mm256_loadu_ps(p + 8 * j);
  }
};

struct DF16 {
  static VS_INLINE void decode(const uint8_t* row, int g, __m256 w[4]) {
    const uint8_t* p = row + 64 * g;
    for (int j = 0; j < 4; j++) w[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
  }
};

struct DBF16 {
  static VS_INLINE void decode(const uint8_t* row, int g, __m256 w[4]) {
    const uint8_t* p = row + 64 * g;
    for (int j = 0; j < 4; j++) {
      __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
      w[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
  }
};

static inline bool quantized(int32_t type) { return type != F32 && type != F16 && type != BF16; }

// fn(F{}) with F the quantized format of `type`: the one place a type number becomes a format.
template <class Fn>
static void with_format(int32_t type, Fn&& fn) {
  switch (type) {
    case Q8_0: return fn(FQ8_0{});
    case Q4_0: return fn(FQ4_0{});
    case Q4_1: return fn(FQ4_1{});
    case Q5_0: return fn(FQ5_0{});
    case Q5_1: return fn(FQ5_1{});
    case Q4_K: return fn(FQ4_K{});
    case Q5_K: return fn(FQ5_K{});
    case Q6_K: return fn(FQ6_K{});
  }
}

// fn(R{}) with R the float reader of `type` in one vector width: the dense readers given, and
// AsFloatT<F> for a quantized format F.
template <template <class> class AsFloatT, class DenseF32, class DenseF16, class DenseBF16, class Fn>
static void with_reader(int32_t type, Fn&& fn) {
  switch (type) {
    case F32: return fn(DenseF32{});
    case F16: return fn(DenseF16{});
    case BF16: return fn(DenseBF16{});
    default: return with_format(type, [&](auto format) { fn(AsFloatT<decltype(format)>{}); });
  }
}

}  // namespace vs
