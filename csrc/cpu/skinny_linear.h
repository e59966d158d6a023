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
// Written once over Vec (simd.h) for the AVX-512 and AVX2 levels; plain loops for `default`.
//
// Contract: x fp32 [M, K] contiguous; W [N, K] contiguous in float / Half / BFloat16 (widened
// to fp32 as it is loaded); bias fp32 [N] or null; out fp32 [M, N]; products and sums in fp32.
// On the avx512_bf16 level, x may also be bf16 [M, K] with a bf16 W: bf16 pairs are
// multiplied by vdpbf16ps, products exact, sums in fp32 (denormal inputs read as zero;
// PS_SKINNY_BF16_PAIRS), and out is then bf16 [M, N]: sum + bias rounded once, as torch's .to()
// rounds (no fp32 output for the binding to allocate and convert on every call).
// rows_range computes output columns [n_begin, n_end) (the binding splits N over threads).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace ps_kernels::cpu::PS_CPU_LEVEL::skinny {

#if defined(PS_CPU_VEC_WIDTH)
constexpr bool kVectorized = true;
// Register tile: kRows weight rows x kCols x rows of accumulators. AVX-512: 4 x 4 = 16 of 32
// registers. AVX2 has 16: 2 x 4 = 8 accumulators + 4 x vectors + a weight vector. SmolLM2's
// 540 MB fp32, one thread, AVX2 code, % of a plain read: M = 4 / 8 / 16: 4 x 2 tiles 86 / 70 /
// 47, 2 x 4 90 / 86 / 59, 3 x 4 (spills) 103 / 79 / 56 (one run, interleaved; within noise at 4).
#if defined(PS_CPU_AVX512)
constexpr int kRows = 4;
constexpr int kCols = 4;
#else
constexpr int kRows = 2;
constexpr int kCols = 4;
#endif
// One x row (M = 1) runs prefetching row tiles, as more rows do, at both vector levels, where it
// ran weight rows one after another (a single stream, one dot product at a time) before.
// Llama-3.2-1B's shapes in bf16 at one thread, AVX-512, one row at a time -> 4-row tiles with
// the L2 prefetch (ms a call, standalone A/B in one process on a loaded machine): 2048 x 2048
// 0.86 -> 0.67, 2048 x 8192 3.11 -> 1.75 (= a plain read of the bytes), 8192 x 2048 3.20 -> 1.68,
// SmolLM2's 49152 x 576 LM head 3.41 -> 3.16; fp32 1.03 / 4.69 / 3.26 / 6.68 -> 0.90 / 3.69 / 3.07
// / 5.80. AVX2, against the AVX-512-BF16 level in the same runs (Llama-3.2-1B's one-row step, 1
// thread): one row at a time 1.40x (bf16) / 1.16x (fp32) the AVX-512-BF16 time -> 8-row tiles
// 1.20x / 1.05x (benchmarks/results/linear_bound/README.md).
//
// One x row's tiles are 8 weight rows tall (8 accumulators; the prefetch runs 16 rows ahead): more
// lines in flight per step than the 4-row tile's. Standalone bf16 GEMV at one thread, AVX-512,
// medians of 9 interleaved rounds, 4 -> 8 rows (GB/s): 2048 x 8192 22.6 -> 26.3, 8192 x 2048
// 19.9 -> 21.5, 2048 x 2048 21.5 -> 24.9, 576 x 1536 19.1 -> 21.8, 49152 x 576 18.1 -> 18.7
// (benchmarks/results/linear_bound/README.md).
constexpr int kOneRowTileRows = 8;
// Rows ahead of a tile that its steps prefetch: the tile after next; one row's 8-row tiles go
// 4 tiles (32 rows) ahead. Standalone bf16 GEMV, 8-row tiles, 2 -> 4 tiles ahead (GB/s, medians of
// 9 interleaved rounds): 2048 x 8192 26.9 -> 27.4, 8192 x 2048 25.4 -> 26.1, 32768 x 2048 25.1 -> 26.0
// (in the library's benchmark, separate runs before and after, within their noise).
constexpr int64_t prefetch_ahead(int rows) { return rows == kOneRowTileRows ? 4 * rows : 2 * rows; }

#if defined(PS_CPU_AVX512)
// The 4 x 4 tile's 16 horizontal sums at once: lane m of the result is out[m, n0 .. n0 + 3]. One
// shuffle tree (~45 operations) instead of 16 separate reductions (~130), which competed with
// the FMAs once the tile is compute-bound (M >= 12: SmolLM2's 540 MB at M = 12 / 16 / 24, A/B
// in one process: 23.6 / 29.7 / 43.6 -> 22.6 / 28.6 / 40.8 ms).
PS_CPU_INLINE __m512 tile_sums(const Vec (&acc)[4][4]) {
  __m512 u[4];
  PS_CPU_UNROLL
  for (int m = 0; m < 4; ++m) u[m] = lane_sums4(acc[0][m].v, acc[1][m].v, acc[2][m].v, acc[3][m].v);
  // u[m]'s lane i holds row m's 4 partial sums over lane i: add the 4 lanes, rows side by side
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}
#endif

// 4 outputs from one vector: fp32 as they are, bf16 rounded to nearest even (store in simd.h)
PS_CPU_INLINE void store4(float* p, __m128 v) { _mm_storeu_ps(p, v); }
PS_CPU_INLINE void store4(BFloat16* p, __m128 v) {
  alignas(16) float t[4];
  _mm_store_ps(t, v);
  PS_CPU_UNROLL
  for (int i = 0; i < 4; ++i) store(p + i, t[i]);
}

// Every step prefetches the weight rows prefetch_ahead(RR) on (software, alongside the hardware
// stream), so that DRAM overlaps the FMAs. The prefetch goes to L2 (prefetcht1), not L1: a whole
// tile's lines requested into L1 at once fill its miss buffers and stall the FMAs, so memory and
// compute took turns instead of overlapping. SmolLM2's 30 layers + LM head (540 MB fp32, 2
// threads, medians; standalone A/B in one process): into L1 M = 4 / 8 / 16: 24.5 / 26.8 / 35.8
// ms, into L2 19.7 / 19.1 / 28.2 (8 rows cost what 1 does). One row prefetches too: without it
// the hardware stream alone left the long bf16 rows of a 1B model at half the read rate.
//
// One step over K of the RR x MR tile; Tail: the last K - k0 < kWidth columns (zero-padded).
template <int RR, int MR, bool Tail, typename W>
PS_CPU_INLINE void tile_step(Vec (&acc)[RR][MR], const float* x, int64_t K, const W* w, int64_t n0, int64_t k0) {
  Vec xv[MR];
  PS_CPU_UNROLL
  for (int m = 0; m < MR; ++m) xv[m] = Tail ? vload_part(x + m * K + k0, K - k0) : vload(x + m * K + k0);
  if constexpr (!Tail) {  // prefetch_ahead(RR) rows on, same columns, once per 64-byte line
    constexpr int64_t kLine = 64 / int64_t(sizeof(W));
    if (kLine <= kWidth || (k0 & (kLine - 1)) == 0) {
      PS_CPU_UNROLL
      for (int r = 0; r < RR; ++r) vprefetch_l2(w + (n0 + prefetch_ahead(RR) + r) * K + k0);
    }
  }
  PS_CPU_UNROLL
  for (int r = 0; r < RR; ++r) {
    const Vec wv = Tail ? vload_part(w + (n0 + r) * K + k0, K - k0) : vload(w + (n0 + r) * K + k0);
    PS_CPU_UNROLL
    for (int m = 0; m < MR; ++m) acc[r][m] = vfmadd(wv, xv[m], acc[r][m]);
  }
}

#if defined(PS_CPU_AVX512) && defined(__AVX512BF16__)
#define PS_SKINNY_BF16_PAIRS 1  // rows_range takes a bf16 x with a bf16 weight (level_kernels.cpp)
// bf16 x with a bf16 weight: one vdpbf16ps multiplies 16 pairs of x and weight elements (32 of
// each) and adds both products to an fp32 lane, so a weight vector is used as loaded, with no
// widening. Llama-3.2-1B's shapes, one x row, one thread: 2048 x 8192 2.75 -> 1.65 ms a call, the
// bf16 plain loop 0.76x -> 0.82x llama.cpp's decode speed (benchmarks/results/linear_bound/README.md). A step covers
// 2 x kWidth columns of K (one 64-byte line of each weight row); Tail: the last K - k0 < 32.
template <int RR, int MR, bool Tail>
PS_CPU_INLINE void tile_step(Vec (&acc)[RR][MR], const BFloat16* x, int64_t K, const BFloat16* w, int64_t n0,
                             int64_t k0) {
  const __mmask32 part = Tail ? __mmask32((uint64_t{1} << (K - k0)) - 1) : ~__mmask32{0};
  __m512bh xv[MR];
  PS_CPU_UNROLL
  for (int m = 0; m < MR; ++m)
    xv[m] = (__m512bh)(Tail ? _mm512_maskz_loadu_epi16(part, x + m * K + k0) : _mm512_loadu_si512(x + m * K + k0));
  if constexpr (!Tail) {  // prefetch_ahead(RR) rows on, same columns: one line a step
    PS_CPU_UNROLL
    for (int r = 0; r < RR; ++r) vprefetch_l2(w + (n0 + prefetch_ahead(RR) + r) * K + k0);
  }
  PS_CPU_UNROLL
  for (int r = 0; r < RR; ++r) {
    const BFloat16* row = w + (n0 + r) * K + k0;
    const __m512bh wv = (__m512bh)(Tail ? _mm512_maskz_loadu_epi16(part, row) : _mm512_loadu_si512(row));
    PS_CPU_UNROLL
    for (int m = 0; m < MR; ++m) acc[r][m].v = _mm512_dpbf16_ps(acc[r][m].v, wv, xv[m]);
  }
}
#endif

// out[m, n0 + r] for r < RR, m < MR: one pass over K with RR x MR accumulators. X: float, or
// BFloat16 with a BFloat16 weight where PS_SKINNY_BF16_PAIRS (two elements a lane per step).
template <int RR, int MR, typename X, typename W, typename O>
PS_CPU_INLINE void tile(const X* x, int64_t K, const W* w, const float* bias, O* out, int64_t N, int64_t n0) {
  constexpr int64_t kStep = std::is_same_v<X, float> ? kWidth : 2 * kWidth;
  Vec acc[RR][MR];
  PS_CPU_UNROLL
  for (int r = 0; r < RR; ++r) {
    PS_CPU_UNROLL
    for (int m = 0; m < MR; ++m) acc[r][m] = vzero();
  }
  int64_t k0 = 0;
  for (; k0 + kStep <= K; k0 += kStep) tile_step<RR, MR, false>(acc, x, K, w, n0, k0);
  if (k0 < K) tile_step<RR, MR, true>(acc, x, K, w, n0, k0);
  if constexpr (RR % 4 == 0) {  // 4 output columns at a time per x row: vector sums, 4-float stores
#if defined(PS_CPU_AVX512)
    if constexpr (RR == 4 && MR == 4) {  // the full tile: 16 sums in one shuffle tree, 4 stores
      const __m512 sums = tile_sums(acc);
      const __m128 b = bias ? _mm_loadu_ps(bias + n0) : _mm_setzero_ps();
      store4(out + 0 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 0), b));
      store4(out + 1 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 1), b));
      store4(out + 2 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 2), b));
      store4(out + 3 * N + n0, _mm_add_ps(_mm512_extractf32x4_ps(sums, 3), b));
      return;
    }
#endif
    PS_CPU_UNROLL
    for (int g = 0; g < RR; g += 4) {
      const __m128 b = bias ? _mm_loadu_ps(bias + n0 + g) : _mm_setzero_ps();
      PS_CPU_UNROLL
      for (int m = 0; m < MR; ++m)
        store4(out + m * N + n0 + g, _mm_add_ps(vsums4(acc[g][m], acc[g + 1][m], acc[g + 2][m], acc[g + 3][m]), b));
    }
    return;
  }
  PS_CPU_UNROLL
  for (int r = 0; r < RR; ++r) {
    const float b = bias ? bias[n0 + r] : 0.0f;
    PS_CPU_UNROLL
    for (int m = 0; m < MR; ++m) store(out + m * N + n0 + r, vreduce_add(acc[r][m]) + b);
  }
}

template <int RR, typename X, typename W, typename O>
inline void tile_groups(const X* x, int64_t M, int64_t K, const W* w, const float* bias, O* out, int64_t N,
                        int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kCols <= M; m0 += kCols) tile<RR, kCols>(x + m0 * K, K, w, bias, out + m0 * N, N, n0);
  static_assert(kCols <= 4, "tile_groups handles remainders of up to 3 rows");
  switch (M - m0) {
    case 1: tile<RR, 1>(x + m0 * K, K, w, bias, out + m0 * N, N, n0); break;
    case 2: tile<RR, 2>(x + m0 * K, K, w, bias, out + m0 * N, N, n0); break;
    case 3: tile<RR, 3>(x + m0 * K, K, w, bias, out + m0 * N, N, n0); break;
    default: break;
  }
}

// out: float, or BFloat16 with a BFloat16 x (the pairs path)
template <typename X, typename W, typename O>
inline void rows_range(const X* x, int64_t M, int64_t K, const W* w, const float* bias, O* out, int64_t N,
                       int64_t n_begin, int64_t n_end) {
  // Two rows: one weight row at a time (a 1 x 2 tile, a single stream per thread). SmolLM2's
  // 540 MB fp32, 2 threads, AMD EPYC (Zen 5), standalone A/B, medians of 15 interleaved: AVX-512
  // 14.0 / 14.2 ms with the 4 x 4 tiles -> 12.0 / 11.5; AVX2 11.3 / 10.9 with 2 x 4 -> 10.6 / 10.6.
  // From 3 rows on the row tiles are as fast or faster (AVX-512 at 4 rows: 14.5 vs 16.1 ms).
  if (M == 2) {
    for (int64_t n = n_begin; n < n_end; ++n) tile<1, 2>(x, K, w, bias, out, N, n);
    return;
  }
  int64_t n0 = n_begin;
  if (M == 1) {
    for (; n0 + kOneRowTileRows <= n_end; n0 += kOneRowTileRows) tile<kOneRowTileRows, 1>(x, K, w, bias, out, N, n0);
  }
  for (; n0 + kRows <= n_end; n0 += kRows) tile_groups<kRows>(x, M, K, w, bias, out, N, n0);
  static_assert(kRows <= 4, "rows_range handles remainders of up to 3 weight rows");
  switch (n_end - n0) {
    case 1: tile_groups<1>(x, M, K, w, bias, out, N, n0); break;
    case 2: tile_groups<2>(x, M, K, w, bias, out, N, n0); break;
    case 3: tile_groups<3>(x, M, K, w, bias, out, N, n0); break;
    default: break;
  }
}
#else
// Portable version of the same contract (the `default` level). Sixteen independent partial
// sums per dot product let the compiler vectorise the loop over K without reassociating a
// float sum (SSE2 on baseline x86-64, NEON).
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

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL::skinny
