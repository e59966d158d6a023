// skinny_linear CPU kernel: out[M, N] = x[M, K] W[N, K]^T (+ bias) for a few rows M, as in a
// verification pass (M = batch x tree nodes). Framework-free; the binding is skinny_linear.cpp.
//
// Why: for M = 2..16 torch's CPU GEMM (oneDNN / MKL) costs up to 4x its M = 1 GEMV on a
// weight that streams from memory (measured on SmolLM2's LM head, 576 x 49152 fp32: 10 ms at
// M = 1, 40 ms at M = 16), so verifying a tree on a CPU paid for the width. Here every weight
// row is read from memory once for all M rows: a tile of 4 weight rows x 4 x rows keeps 16
// fp32 accumulators in registers over K; the 4 rows (a few KiB) stay in L1 while the next
// row groups of x pass over them. The cost is the weight's bytes, about the GEMV's, up to
// M ~ 16 where the FMAs start to count.
//
// Contract: x fp32 [M, K] contiguous; W [N, K] contiguous in float / Half / BFloat16 (widened
// to fp32 as it is loaded); bias fp32 [N] or null; out fp32 [M, N]; products and sums in fp32.
// rows_range computes output columns [n_begin, n_end) (the binding splits N over threads).
#pragma once
#include <algorithm>
#include <cstdint>

#include "simd.h"

#if defined(__GNUC__)
#define PS_LINEAR_INLINE inline __attribute__((always_inline))
#define PS_LINEAR_UNROLL _Pragma("GCC unroll 8")
#else
#define PS_LINEAR_INLINE inline
#define PS_LINEAR_UNROLL
#endif

namespace ps_kernels::cpu::skinny {

constexpr int kRows = 4;  // weight rows per tile
constexpr int kCols = 4;  // x rows per tile
constexpr int kPrefetchRows = 2;  // software prefetch from this many x rows on (tile_rows)

#if defined(PS_CPU_AVX512)
constexpr bool kVectorized = true;  // the path SKINNY_ROWS was measured with

// a0..a3 -> one vector whose 128-bit lane i holds, as element j, the sum of a_j's lane i.
PS_LINEAR_INLINE __m512 lane_sums4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
}

// The 4 x 4 tile's 16 horizontal sums at once: lane m of the result is out[m, n0 .. n0 + 3]. One
// shuffle tree (~45 operations) instead of 16 separate reductions (~130), which competed with
// the FMAs once the tile is compute-bound (M >= 12: SmolLM2's 540 MB at M = 12 / 16 / 24, A/B
// in one process: 23.6 / 29.7 / 43.6 -> 22.6 / 28.6 / 40.8 ms).
PS_LINEAR_INLINE __m512 tile_sums(const __m512 (&acc)[4][4]) {
  __m512 u[4];
  PS_LINEAR_UNROLL
  for (int m = 0; m < 4; ++m) u[m] = lane_sums4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
  // u[m]'s lane i holds row m's 4 partial sums over lane i: add the 4 lanes, rows side by side
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// out[m, n0 + r] for r < RR, m < MR: one pass over K with RR x MR accumulators.
template <int RR, int MR, bool Prefetch, typename W>
PS_LINEAR_INLINE void tile(const float* x, int64_t K, const W* w, const float* bias, float* out, int64_t N,
                           int64_t n0) {
  __m512 acc[RR][MR];
  PS_LINEAR_UNROLL
  for (int r = 0; r < RR; ++r) {
    PS_LINEAR_UNROLL
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const __mmask16 mask = tail_mask(K - k0);
    __m512 xv[MR];
    PS_LINEAR_UNROLL
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k0);
    if constexpr (Prefetch) {  // the tile after next, same columns (tile_rows)
      PS_LINEAR_UNROLL
      for (int r = 0; r < RR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + 2 * RR + r) * K + k0), _MM_HINT_T1);
    }
    PS_LINEAR_UNROLL
    for (int r = 0; r < RR; ++r) {
      const __m512 wv = load16(w + (n0 + r) * K + k0, mask);
      PS_LINEAR_UNROLL
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if constexpr (RR == 4 && MR == 4) {  // the full tile: 16 sums in one shuffle tree, 4 stores
    const __m512 sums = tile_sums(acc);
    const __m128 b = bias ? _mm_loadu_ps(bias + n0) : _mm_setzero_ps();
    _mm_storeu_ps(out + 0 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 0), b));
    _mm_storeu_ps(out + 1 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 1), b));
    _mm_storeu_ps(out + 2 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 2), b));
    _mm_storeu_ps(out + 3 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 3), b));
    return;
  }
  PS_LINEAR_UNROLL
  for (int r = 0; r < RR; ++r) {
    const float b = bias ? bias[n0 + r] : 0.0f;
    PS_LINEAR_UNROLL
    for (int m = 0; m < MR; ++m) out[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + b;
  }
}

template <int RR, bool Prefetch, typename W>
inline void tile_groups(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* out, int64_t N,
                        int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kCols <= M; m0 += kCols) tile<RR, kCols, Prefetch>(x + m0 * K, K, w, bias, out + m0 * N, N, n0);
  switch (M - m0) {
    case 1: tile<RR, 1, Prefetch>(x + m0 * K, K, w, bias, out + m0 * N, N, n0); break;
    case 2: tile<RR, 2, Prefetch>(x + m0 * K, K, w, bias, out + m0 * N, N, n0); break;
    case 3: tile<RR, 3, Prefetch>(x + m0 * K, K, w, bias, out + m0 * N, N, n0); break;
    default: break;
  }
}

// From M = kPrefetchRows on, a tile's FMAs take long enough that prefetching the weight tile
// after next (software, alongside the hardware stream) overlaps DRAM with compute. The prefetch
// goes to L2 (prefetcht1), not L1: a whole tile's lines requested into L1 at once fill its miss
// buffers and stall the FMAs, so memory and compute took turns instead of overlapping. SmolLM2's
// 30 layers + LM head (540 MB fp32, 2 threads, medians; standalone A/B in one process): into L1
// M = 4 / 8 / 16: 24.5 / 26.8 / 35.8 ms, into L2 19.7 / 19.1 / 28.2 (M = 1: 18-19 either way:
// 8 rows now cost what 1 does). At M = 1 the loop is memory-bound and prefetches only add work.
template <int RR, typename W>
inline void tile_rows(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* out, int64_t N,
                      int64_t n0) {
  if (M >= kPrefetchRows) {
    tile_groups<RR, true>(x, M, K, w, bias, out, N, n0);
  } else {
    tile_groups<RR, false>(x, M, K, w, bias, out, N, n0);
  }
}

// One row (M = 1): weight rows one after another, a single sequential stream per thread for
// the hardware prefetcher (the 4-row tiles read four streams 4K bytes apart); four accumulators
// hide the FMA latency. SmolLM2's 540 MB, 2 threads: median 25.6 -> 23.5 ms (a software
// prefetch on top of it measured slower: 26.7).
template <typename W>
PS_LINEAR_INLINE float row_dot(const float* x, int64_t K, const W* row) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  const __mmask16 all = 0xffff;
  int64_t k0 = 0;
  for (; k0 + 64 <= K; k0 += 64) {
    a0 = _mm512_fmadd_ps(load16(row + k0, all), _mm512_loadu_ps(x + k0), a0);
    a1 = _mm512_fmadd_ps(load16(row + k0 + 16, all), _mm512_loadu_ps(x + k0 + 16), a1);
    a2 = _mm512_fmadd_ps(load16(row + k0 + 32, all), _mm512_loadu_ps(x + k0 + 32), a2);
    a3 = _mm512_fmadd_ps(load16(row + k0 + 48, all), _mm512_loadu_ps(x + k0 + 48), a3);
  }
  for (; k0 < K; k0 += 16) {
    const __mmask16 mask = tail_mask(K - k0);
    a0 = _mm512_fmadd_ps(load16(row + k0, mask), _mm512_maskz_loadu_ps(mask, x + k0), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename W>
inline void rows_range(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* out, int64_t N,
                       int64_t n_begin, int64_t n_end) {
  if (M == 1) {
    for (int64_t n = n_begin; n < n_end; ++n) out[n] = row_dot(x, K, w + n * K) + (bias ? bias[n] : 0.0f);
    return;
  }
  int64_t n0 = n_begin;
  for (; n0 + kRows <= n_end; n0 += kRows) tile_rows<kRows>(x, M, K, w, bias, out, N, n0);
  switch (n_end - n0) {
    case 1: tile_rows<1>(x, M, K, w, bias, out, N, n0); break;
    case 2: tile_rows<2>(x, M, K, w, bias, out, N, n0); break;
    case 3: tile_rows<3>(x, M, K, w, bias, out, N, n0); break;
    default: break;
  }
}
#else
// Portable version of the same contract. Sixteen independent partial sums per dot product
// let the compiler vectorise the loop over K without reassociating a float sum (AVX2 / NEON).
constexpr bool kVectorized = false;
template <typename W>
inline void rows_range(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* out, int64_t N,
                       int64_t n_begin, int64_t n_end) {
  constexpr int kLanes = 16;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float lanes[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes) {
        for (int l = 0; l < kLanes; ++l) lanes[l] += to_float(row[k + l]) * xr[k + l];
      }
      float acc = 0.0f;
      for (int l = 0; l < kLanes; ++l) acc += lanes[l];
      for (; k < K; ++k) acc += to_float(row[k]) * xr[k];
      out[m * N + n] = acc + (bias ? bias[n] : 0.0f);
    }
  }
}
#endif

}  // namespace ps_kernels::cpu::skinny
