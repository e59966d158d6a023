// What the CPU kernels share: the storage types of torch's Half / BFloat16 (same bit layout;
// the bindings pass data pointers), scalar conversion to fp32, and Vec, a small fp32 vector
// type over which the kernels are written once for every capability level (like ATen's
// Vectorized<float>): 16 lanes (__m512) with AVX-512, 8 lanes (__m256) with AVX2 + FMA + F16C,
// none in the portable build (the kernels then take their plain-loop paths). Framework-free.
//
// Everything here and in the kernel headers lives in ps_kernels::cpu::PS_CPU_LEVEL, a
// namespace of its own per capability level (level_kernels.cpp is compiled once per level with
// PS_CPU_LEVEL = level_<name>): the inline functions and template instantiations of a level
// built with AVX-512 flags are then symbols of that level only, never COMDAT-merged with
// another level's copy of the same function (the linker keeps one copy, which would run on
// every CPU). Keep std templates with out-of-line code (containers, ...) out of these headers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef PS_CPU_LEVEL
#define PS_CPU_LEVEL level_single  // a one-level build (no CMake: one set of flags for everything)
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define PS_CPU_AVX512 1
#define PS_CPU_VEC_WIDTH 16
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PS_CPU_AVX2 1
#define PS_CPU_VEC_WIDTH 8
#include <immintrin.h>
#endif

// Register-tile helpers must be inlined and their fixed-size loops fully unrolled, or GCC
// keeps accumulator arrays on the stack (seen: a store per FMA, 2x slower).
#if defined(__GNUC__)
#define PS_CPU_INLINE inline __attribute__((always_inline))
#define PS_CPU_UNROLL _Pragma("GCC unroll 16")
#else
#define PS_CPU_INLINE inline
#define PS_CPU_UNROLL
#endif

namespace ps_kernels::cpu::PS_CPU_LEVEL {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16, exp = (x.bits >> 10) & 0x1f, mant = x.bits & 0x3ff;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in fp32
    const float mag = float(mant) * (1.0f / 16777216.0f);
    return bits_to_float(sign | float_to_bits(mag));
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// fp32 -> storage, round to nearest even (what torch's .to() does).
inline void store(float* dst, float x) { *dst = x; }
inline void store(BFloat16* dst, float x) {
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) { dst->bits = uint16_t((u >> 16) | 0x40); return; }  // quiet nan
  dst->bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void store(Half* dst, float x) {
  uint32_t u = float_to_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) { dst->bits = sign | 0x7c00 | (u > 0x7f800000u ? 0x200 : 0); return; }
  if (u >= 0x477ff000u) { dst->bits = sign | 0x7c00; return; }  // >= 65520 rounds to inf
  if (u < 0x38800000u) {  // below 2^-14: a subnormal half, round(x * 2^24) (exact scaling)
    dst->bits = sign | uint16_t(std::nearbyint(bits_to_float(u) * 16777216.0f));
    return;
  }
  const uint32_t v = u - 0x38000000u;  // rebias 127 -> 15
  dst->bits = sign | uint16_t((v + 0xfffu + ((v >> 13) & 1u)) >> 13);
}

#if defined(PS_CPU_VEC_WIDTH)
constexpr int kWidth = PS_CPU_VEC_WIDTH;  // fp32 lanes of a Vec

#if defined(PS_CPU_AVX512)
struct Vec { __m512 v; };
PS_CPU_INLINE Vec vzero() { return {_mm512_setzero_ps()}; }
PS_CPU_INLINE Vec vset1(float x) { return {_mm512_set1_ps(x)}; }
PS_CPU_INLINE Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
PS_CPU_INLINE Vec vload(const Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
PS_CPU_INLINE Vec vload(const BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
PS_CPU_INLINE __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : remaining <= 0 ? __mmask16(0) : __mmask16((1u << remaining) - 1u);
}
// the first min(n, kWidth) elements, zeros after (reads nothing past them)
PS_CPU_INLINE Vec vload_part(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(tail_mask(n), p)}; }
PS_CPU_INLINE Vec vload_part(const Half* p, int64_t n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p))}; }
PS_CPU_INLINE Vec vload_part(const BFloat16* p, int64_t n) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask(n), p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
// the masked 16-lane loads of the attention kernels
PS_CPU_INLINE __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PS_CPU_INLINE __m512 load16(const Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
PS_CPU_INLINE __m512 load16(const BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
PS_CPU_INLINE void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
PS_CPU_INLINE Vec vfmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
PS_CPU_INLINE Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
PS_CPU_INLINE Vec vmul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
PS_CPU_INLINE float vreduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
PS_CPU_INLINE void vprefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// a0..a3 -> one vector whose 128-bit lane i holds, as element j, the sum of a_j's lane i.
PS_CPU_INLINE __m512 lane_sums4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
}
// (sum a0, sum a1, sum a2, sum a3)
PS_CPU_INLINE __m128 vsums4(Vec a0, Vec a1, Vec a2, Vec a3) {
  const __m512 t = lane_sums4(a0.v, a1.v, a2.v, a3.v);
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#else  // AVX2 + FMA + F16C
struct Vec { __m256 v; };
PS_CPU_INLINE Vec vzero() { return {_mm256_setzero_ps()}; }
PS_CPU_INLINE Vec vset1(float x) { return {_mm256_set1_ps(x)}; }
PS_CPU_INLINE Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
PS_CPU_INLINE Vec vload(const Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
PS_CPU_INLINE Vec vload(const BFloat16* p) {  // bf16 -> fp32: widen to 32 bits, shift into the high half
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
}
PS_CPU_INLINE Vec vload_part(const float* p, int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 8 ? (n < 0 ? 0 : n) : 8)), lanes);
  return {_mm256_maskload_ps(p, mask)};
}
template <typename T>  // 16-bit storage: no masked 16-bit load in AVX2, stage the tail
PS_CPU_INLINE Vec vload_part(const T* p, int64_t n) {
  T tmp[8] = {};
  std::memcpy(tmp, p, sizeof(T) * size_t(n < 8 ? (n < 0 ? 0 : n) : 8));
  return vload(static_cast<const T*>(tmp));
}
PS_CPU_INLINE void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
PS_CPU_INLINE Vec vfmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
PS_CPU_INLINE Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
PS_CPU_INLINE Vec vmul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
PS_CPU_INLINE float vreduce_add(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
PS_CPU_INLINE void vprefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
// (sum a0, sum a1, sum a2, sum a3): three horizontal adds and one cross-lane add
PS_CPU_INLINE __m128 vsums4(Vec a0, Vec a1, Vec a2, Vec a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0.v, a1.v), _mm256_hadd_ps(a2.v, a3.v));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif
#endif  // PS_CPU_VEC_WIDTH

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL
