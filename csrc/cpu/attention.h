// Attention CPU core shared by tree_attention and draft_attention: framework-free (raw
// pointers, sizes); the torch bindings are tree_attention.cpp and draft_attention.cpp.
//
// Both ops are "queries over a cache prefix plus a few new keys under a pattern". Per sequence
// the new rows of q / k_new / v_new are compacted to n rows by (split, skip): compact index i
// is row i for i < split and row i + skip after it. Tree: n = N, split = N, skip = 0. Draft:
// the new_lens[b] = r real rows then the M mask slots (rows R..T-1), so split = r,
// skip = R - r, and the drafter's pattern (real t sees reals 0..t; slot j sees every real and
// slots 0..j) is exactly causal over compact indices. A query attends every prefix row plus
// the new keys its mask policy allows: CausalPolicy or TreeBitsPolicy (packed int64 bits).
//
// One work item = (sequence b, KV head g, a chunk of the group's query rows); a chunk holds
// query rows rho = i * G + h (node-major, so rows of one node share their mask) of ALL G query
// heads of the group, and each key block (kKeyBlock rows of K and V, converted to fp32 once)
// serves every query row of the chunk. Online softmax in fp32, in the log2 domain (q is
// pre-multiplied by scale * log2(e)), so exp is exp2.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <cstdlib>
#include <type_traits>

#include "simd.h"

#if defined(PS_CPU_AVX512)
#define PS_ATTENTION_AVX512 1
#if defined(__AVX512BF16__)
#define PS_ATTENTION_BF16_DOT 1  // vdpbf16ps: bf16 dot products at twice the fp32 FMA rate
#endif
#endif

#define PS_ATTENTION_INLINE PS_CPU_INLINE
#define PS_ATTENTION_UNROLL PS_CPU_UNROLL

namespace ps_kernels::cpu::PS_CPU_LEVEL::attention {

using PS_CPU_LEVEL::BFloat16;
using PS_CPU_LEVEL::bits_to_float;
using PS_CPU_LEVEL::float_to_bits;
using PS_CPU_LEVEL::Half;
using PS_CPU_LEVEL::to_float;

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

constexpr int kKeyBlock = 32;  // keys per block: two 16-float vectors of scores per query row
constexpr int kRowTile = 8;    // query rows per score tile (16 accumulators + 2 K vectors)
constexpr int kPvRows = 4;     // query rows per PV tile (4 rows x 4 vectors = 16 accumulators)
constexpr int kSumLanes = 16;  // softmax denominators are kept as 16 partial sums per row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
struct Problem {
  const T* q;            // [B, Hq, rows, D]
  const T* k_new;        // [B, Hkv, rows, D]
  const T* v_new;
  T* k_cache;            // [B, Hkv, S, D]
  T* v_cache;
  const int64_t* cache_lens;  // [B]
  T* out;                // [B, Hq, rows, D]
  float* lse;            // [B, Hq, rows]
  int64_t batch, q_heads, kv_heads, rows, head_dim, cache_rows;
  float scale;
};

// Per sequence: n compact rows (module comment), the first `written` of which are appended
// to the cache after the prefix; rows [split, split + skip) are padding (out 0, lse -inf).
struct SeqRows {
  int64_t n, split, skip, written;
  int64_t row(int64_t i) const { return i < split ? i : i + skip; }
};

// Allowed new keys j0 .. j0 + 31 of compact query i, as bits (bit c <=> key j0 + c).
struct CausalPolicy {
  uint32_t bits(int64_t /*b*/, int64_t i, int64_t j0) const {
    if (i < j0) return 0;
    const int64_t allowed = i - j0 + 1;
    return allowed >= 32 ? 0xffffffffu : (1u << allowed) - 1u;
  }
};

struct TreeBitsPolicy {
  const int64_t* words;  // [B, N, W] contiguous
  int64_t nodes, words_per_row;
  // j0 is a multiple of 32 (blocks start at new key 0), so the 32 bits sit in one word
  uint32_t bits(int64_t b, int64_t i, int64_t j0) const {
    const uint64_t w = uint64_t(words[(b * nodes + i) * words_per_row + (j0 >> 6)]);
    return uint32_t(w >> (j0 & 63));
  }
};

// A growable scratch array of this level (not std::vector: its out-of-line members would be
// COMDAT code shared with other levels' copies, see simd.h). Contents are not kept on growth.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  int64_t capacity = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(ptr); }
  void resize(int64_t n) {
    if (n <= capacity) return;
    std::free(ptr);
    ptr = static_cast<T*>(std::malloc(sizeof(T) * size_t(n)));
    if (ptr == nullptr) std::abort();
    capacity = n;
  }
  T* data() { return ptr; }
  T& operator[](int64_t i) { return ptr[i]; }
};

// Scratch of one thread, reused across its work items.
struct Workspace {
  Buffer<float> q, o, m, l, kt, v, s, p, alpha;
  Buffer<uint32_t> q_pairs, kt_pairs, v_pairs;  // the bf16 path's operands (pairs of bf16)
  void reserve(int64_t rows, int64_t d, int64_t dp) {
    q.resize(rows * d);
    q_pairs.resize(rows * (d + 1) / 2);
    kt_pairs.resize((dp / 2) * kKeyBlock);
    v_pairs.resize((kKeyBlock / 2) * dp);
    o.resize(rows * dp);
    m.resize(rows);
    l.resize(rows * kSumLanes);
    kt.resize(dp * kKeyBlock);
    v.resize(kKeyBlock * dp);
    s.resize(kRowTile * kKeyBlock);
    p.resize(kRowTile * kKeyBlock);
    alpha.resize(kRowTile);
  }
};

// ---------------------------------------------------------------------------------------
// Leaf kernels: AVX-512, AVX2 and portable versions with the same contract.
//   build_kt:  kt[d * 32 + c] = key c's element d (fp32), zero for c >= kb
//   stage_v:   vrow[c] -> a row of D fp32 values (the cache row itself for fp32 input)
//   qk:        s[r * 32 + c] = q_r . k_c for r < mr (q rows already scaled)
//   softmax:   online update of m and l (kSumLanes partial sums) per row with the allowed
//              bits; p = exp2(s - m_new),
//              alpha[r] = exp2(m_old - m_new) (1 for a row with nothing allowed, p = 0)
//   pv:        o_r = o_r * alpha[r] + sum_c p[r][c] v_c over the D (padded to dp) columns
// ---------------------------------------------------------------------------------------
#if defined(PS_ATTENTION_AVX512)

// In-register 16x16 transpose: r[a] holds row a; afterwards r[c] holds column c.
PS_ATTENTION_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

template <typename T>
inline void build_kt(const T* const* krow, int kb, int64_t d, float* kt) {
  for (int half = 0; half < 2; ++half) {
    for (int64_t d0 = 0; d0 < d; d0 += 16) {
      const __mmask16 cols = tail_mask(d - d0);
      __m512 r[16];
      for (int c = 0; c < 16; ++c) {
        const int key = half * 16 + c;
        r[c] = key < kb ? load16(krow[key] + d0, cols) : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t n = std::min<int64_t>(16, d - d0);
      for (int64_t c = 0; c < n; ++c) _mm512_storeu_ps(kt + (d0 + c) * kKeyBlock + half * 16, r[c]);
    }
  }
}

template <typename T>
inline void stage_v(const T* const* vsrc, int kb, int64_t d, int64_t dp, float* buf, const float** vrow) {
  for (int c = 0; c < kb; ++c) {
    for (int64_t d0 = 0; d0 < d; d0 += 16) _mm512_storeu_ps(buf + c * dp + d0, load16(vsrc[c] + d0, tail_mask(d - d0)));
    vrow[c] = buf + c * dp;
  }
}

template <int MR>
PS_ATTENTION_INLINE void qk_kernel(const float* q, int64_t d, const float* kt, float* s) {
  __m512 acc[MR][2];
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; ++e) {
    const __m512 k0 = _mm512_loadu_ps(kt + e * kKeyBlock), k1 = _mm512_loadu_ps(kt + e * kKeyBlock + 16);
    PS_ATTENTION_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * d + e]);
      acc[r][0] = _mm512_fmadd_ps(qb, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qb, k1, acc[r][1]);
    }
  }
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(s + r * kKeyBlock, acc[r][0]);
    _mm512_storeu_ps(s + r * kKeyBlock + 16, acc[r][1]);
  }
}

inline void qk(const float* q, int mr, int64_t d, const float* kt, float* s) {
  switch (mr) {
    case 1: qk_kernel<1>(q, d, kt, s); break;
    case 2: qk_kernel<2>(q, d, kt, s); break;
    case 3: qk_kernel<3>(q, d, kt, s); break;
    case 4: qk_kernel<4>(q, d, kt, s); break;
    case 5: qk_kernel<5>(q, d, kt, s); break;
    case 6: qk_kernel<6>(q, d, kt, s); break;
    case 7: qk_kernel<7>(q, d, kt, s); break;
    default: qk_kernel<8>(q, d, kt, s); break;
  }
}

#if defined(PS_ATTENTION_BF16_DOT)
// bf16 scores: K and q stay bf16, as 32-bit pairs (elements 2e, 2e + 1); vdpbf16ps multiplies
// pairs exactly and accumulates in fp32, so the scores are as exact as the fp32 path's.
// kt_pairs[e * 32 + c] = key c's pair e (zero past D or kb).
inline void build_kt_pairs(const BFloat16* const* krow, int kb, int64_t d, uint32_t* kt) {
  const int64_t pairs = (d + 1) / 2;
  for (int half = 0; half < 2; ++half) {
    for (int64_t e0 = 0; e0 < pairs; e0 += 16) {
      const int64_t left = d - 2 * e0;  // bf16 elements left in the row
      const __mmask32 cols = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
      __m512 r[16];
      for (int c = 0; c < 16; ++c) {
        const int key = half * 16 + c;
        r[c] = key < kb ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(cols, krow[key] + 2 * e0)) : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t n = std::min<int64_t>(16, pairs - e0);
      for (int64_t c = 0; c < n; ++c) _mm512_storeu_ps(reinterpret_cast<float*>(kt + (e0 + c) * kKeyBlock + half * 16), r[c]);
    }
  }
}

template <int MR>
PS_ATTENTION_INLINE void qk_pairs_kernel(const uint32_t* q, int64_t pairs, const uint32_t* kt, float scale, float* s) {
  __m512 acc[MR][2];
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t e = 0; e < pairs; ++e) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + e * kKeyBlock);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + e * kKeyBlock + 16);
    PS_ATTENTION_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(int(q[r * pairs + e]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(s + r * kKeyBlock, _mm512_mul_ps(acc[r][0], sc));
    _mm512_storeu_ps(s + r * kKeyBlock + 16, _mm512_mul_ps(acc[r][1], sc));
  }
}

inline void qk_pairs(const uint32_t* q, int mr, int64_t pairs, const uint32_t* kt, float scale, float* s) {
  switch (mr) {
    case 1: qk_pairs_kernel<1>(q, pairs, kt, scale, s); break;
    case 2: qk_pairs_kernel<2>(q, pairs, kt, scale, s); break;
    case 3: qk_pairs_kernel<3>(q, pairs, kt, scale, s); break;
    case 4: qk_pairs_kernel<4>(q, pairs, kt, scale, s); break;
    case 5: qk_pairs_kernel<5>(q, pairs, kt, scale, s); break;
    case 6: qk_pairs_kernel<6>(q, pairs, kt, scale, s); break;
    case 7: qk_pairs_kernel<7>(q, pairs, kt, scale, s); break;
    default: qk_pairs_kernel<8>(q, pairs, kt, scale, s); break;
  }
}

// bf16 P.V: V stays bf16, staged as pairs of keys (2c, 2c + 1) per column,
// v_pairs[c2 * dp + e] = (v_{2c2}[e], v_{2c2+1}[e]) (zero past D or kb); the probabilities are
// rounded to bf16 pairs (as FlashAttention's GPU kernels round P for their P.V MMA), and
// vdpbf16ps accumulates two keys per instruction in fp32; the softmax denominators keep the
// fp32 probabilities. Cost in accuracy, measured over 1,500 random trees / shapes: outputs at
// most 1.86x the error of the fp32-compute-and-round reference (within one bf16 step of exact;
// the tests allow 2x). fp32 and fp16 inputs keep the fp32 P.V below.
inline void stage_v_pairs(const BFloat16* const* vsrc, int kb, int64_t d, int64_t dp, uint32_t* vp) {
  for (int c2 = 0; c2 < kKeyBlock / 2; ++c2) {
    const int c = 2 * c2;
    for (int64_t e0 = 0; e0 < dp; e0 += 16) {
      const __mmask16 cols = e0 < d ? tail_mask(d - e0) : __mmask16(0);
      const __m256i lo = c < kb ? _mm256_maskz_loadu_epi16(cols, vsrc[c] + e0) : _mm256_setzero_si256();
      const __m256i hi = c + 1 < kb ? _mm256_maskz_loadu_epi16(cols, vsrc[c + 1] + e0) : _mm256_setzero_si256();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm512_storeu_si512(vp + c2 * dp + e0, pair);
    }
  }
}

// The P.V source of the bf16 path (see pv below): per row, the 32 probabilities of the block
// as 16 bf16 pairs; per key pair, 16 columns of V pairs; one vdpbf16ps per pair of keys.
struct Bf16PairsPV {
  uint32_t pp[kRowTile * (kKeyBlock / 2)];
  const uint32_t* vp;
  int64_t dp;
  int kp;  // key pairs in the block
  Bf16PairsPV(const float* p, int mr, const uint32_t* vp_, int64_t dp_, int kb) : vp(vp_), dp(dp_), kp((kb + 1) / 2) {
    for (int r = 0; r < mr; ++r) {  // keys 0..31 of row r as 16 bf16 pairs, round to nearest even
      const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + r * kKeyBlock + 16), _mm512_loadu_ps(p + r * kKeyBlock));
      _mm512_storeu_si512(pp + r * (kKeyBlock / 2), (__m512i)packed);
    }
  }
  template <int MR, int NV>
  PS_ATTENTION_INLINE void accumulate(__m512 (&acc)[MR][NV], int r0, int64_t col0, __mmask16 /*last: V is zero-padded*/) const {
    for (int c2 = 0; c2 < kp; ++c2) {
      __m512bh vv[NV];
      PS_ATTENTION_UNROLL
      for (int v = 0; v < NV; ++v) vv[v] = (__m512bh)_mm512_loadu_si512(vp + c2 * dp + col0 + 16 * v);
      PS_ATTENTION_UNROLL
      for (int r = 0; r < MR; ++r) {
        const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(pp[(r0 + r) * (kKeyBlock / 2) + c2]));
        PS_ATTENTION_UNROLL
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pb, vv[v]);
      }
    }
  }
};
#endif  // PS_ATTENTION_BF16_DOT

// 2^x for x <= 0 (scores minus the running max); -inf (masked) gives exactly 0.
PS_ATTENTION_INLINE __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));  // 2^-200 underflows to 0 in scalef
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln 2) to degree 7: truncation < 5e-9 on |f| <= 0.5
  __m512 y = _mm512_set1_ps(1.525273380405984e-05f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.5403530393381608e-04f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-03f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.618129107628477e-03f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550410866482158e-02f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402265069591007e-01f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931471805599453e-01f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

inline void softmax(const float* s, const uint32_t* bits, int mr, float* m, float* l, float* p, float* alpha) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int r = 0; r < mr; ++r) {
    const __m512 s0 = _mm512_mask_mov_ps(ninf, __mmask16(bits[r]), _mm512_loadu_ps(s + r * kKeyBlock));
    const __m512 s1 = _mm512_mask_mov_ps(ninf, __mmask16(bits[r] >> 16), _mm512_loadu_ps(s + r * kKeyBlock + 16));
    const float block_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
    if (block_max == kNegInf) {
      alpha[r] = 1.0f;
      _mm512_storeu_ps(p + r * kKeyBlock, _mm512_setzero_ps());
      _mm512_storeu_ps(p + r * kKeyBlock + 16, _mm512_setzero_ps());
      continue;
    }
    const float m_new = std::max(m[r], block_max);
    const __m512 mv = _mm512_set1_ps(m_new);
    const __m512 p0 = exp2_nonpositive(_mm512_sub_ps(s0, mv)), p1 = exp2_nonpositive(_mm512_sub_ps(s1, mv));
    alpha[r] = m_new == m[r] ? 1.0f : std::exp2(m[r] - m_new);  // the max settles after a few blocks
    // partial sums stay in lanes: no horizontal add per block
    const __m512 lr = _mm512_loadu_ps(l + r * kSumLanes);
    _mm512_storeu_ps(l + r * kSumLanes, _mm512_fmadd_ps(lr, _mm512_set1_ps(alpha[r]), _mm512_add_ps(p0, p1)));
    m[r] = m_new;
    _mm512_storeu_ps(p + r * kKeyBlock, p0);
    _mm512_storeu_ps(p + r * kKeyBlock + 16, p1);
  }
}

// The P.V source of the fp32 path: per row, the block's 32 fp32 probabilities; per key, a row
// of V as fp32 (staged); one FMA per key.
struct F32RowsPV {
  const float* p;
  const float* const* vrow;
  int kb;
  template <int MR, int NV>
  PS_ATTENTION_INLINE void accumulate(__m512 (&acc)[MR][NV], int r0, int64_t col0, __mmask16 last) const {
    for (int c = 0; c < kb; ++c) {
      __m512 vv[NV];
      PS_ATTENTION_UNROLL
      for (int v = 0; v < NV; ++v) vv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xffff), vrow[c] + col0 + 16 * v);
      PS_ATTENTION_UNROLL
      for (int r = 0; r < MR; ++r) {
        const __m512 pb = _mm512_set1_ps(p[(r0 + r) * kKeyBlock + c]);
        PS_ATTENTION_UNROLL
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(pb, vv[v], acc[r][v]);
      }
    }
  }
};

// o_r = o_r * alpha[r] + P.V for rows r0 .. r0 + MR - 1, columns col0 .. col0 + 16 NV - 1, in
// MR x NV accumulators; the source (F32RowsPV, Bf16PairsPV) supplies the products.
template <int MR, int NV, typename Src>
PS_ATTENTION_INLINE void pv_kernel(float* o, int64_t dp, const float* alpha, const Src& src, int r0, int64_t col0,
                                   __mmask16 last) {
  __m512 acc[MR][NV];
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r0 + r]);
    PS_ATTENTION_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o + (r0 + r) * dp + col0 + 16 * v), a);
  }
  src.template accumulate<MR, NV>(acc, r0, col0, last);
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) {
    PS_ATTENTION_UNROLL
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + (r0 + r) * dp + col0 + 16 * v, acc[r][v]);
  }
}

template <int MR, typename Src>
inline void pv_rows(float* o, int64_t d, int64_t dp, const float* alpha, const Src& src, int r0) {
  for (int64_t col0 = 0; col0 < d; col0 += 64) {
    const int64_t left = d - col0;
    const int nv = int(std::min<int64_t>(4, (left + 15) / 16));
    const __mmask16 last = tail_mask(left - 16 * (nv - 1));
    switch (nv) {
      case 1: pv_kernel<MR, 1>(o, dp, alpha, src, r0, col0, last); break;
      case 2: pv_kernel<MR, 2>(o, dp, alpha, src, r0, col0, last); break;
      case 3: pv_kernel<MR, 3>(o, dp, alpha, src, r0, col0, last); break;
      default: pv_kernel<MR, 4>(o, dp, alpha, src, r0, col0, last); break;
    }
  }
}

// P.V for the mr rows of a score tile, kPvRows rows at a time.
template <typename Src>
inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* alpha, const Src& src) {
  for (int r0 = 0; r0 < mr; r0 += kPvRows) {
    switch (std::min(kPvRows, mr - r0)) {
      case 1: pv_rows<1>(o, d, dp, alpha, src, r0); break;
      case 2: pv_rows<2>(o, d, dp, alpha, src, r0); break;
      case 3: pv_rows<3>(o, d, dp, alpha, src, r0); break;
      default: pv_rows<4>(o, d, dp, alpha, src, r0); break;
    }
  }
}

inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, const float* const* vrow,
               int kb) {
  pv(o, mr, d, dp, alpha, F32RowsPV{p, vrow, kb});
}

#elif defined(PS_CPU_AVX2)  // AVX2 + FMA + F16C: the same contracts, 8 lanes, 16 registers

// In-register 8x8 transpose: r[a] holds row a; afterwards r[c] holds column c.
PS_ATTENTION_INLINE void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

template <typename T>
inline void build_kt(const T* const* krow, int kb, int64_t d, float* kt) {
  for (int group = 0; group < kKeyBlock / 8; ++group) {
    for (int64_t d0 = 0; d0 < d; d0 += 8) {
      __m256 r[8];
      for (int c = 0; c < 8; ++c) {
        const int key = group * 8 + c;
        r[c] = key < kb ? vload_part(krow[key] + d0, d - d0).v : _mm256_setzero_ps();
      }
      transpose8(r);
      const int64_t n = std::min<int64_t>(8, d - d0);
      for (int64_t c = 0; c < n; ++c) _mm256_storeu_ps(kt + (d0 + c) * kKeyBlock + group * 8, r[c]);
    }
  }
}

template <typename T>
inline void stage_v(const T* const* vsrc, int kb, int64_t d, int64_t dp, float* buf, const float** vrow) {
  for (int c = 0; c < kb; ++c) {
    for (int64_t d0 = 0; d0 < d; d0 += 8) vstore(buf + c * dp + d0, vload_part(vsrc[c] + d0, d - d0));
    vrow[c] = buf + c * dp;
  }
}

// s[r, 0..31] for MR <= 3 rows: 4 vectors a row (12 accumulators), K columns from L1.
template <int MR>
PS_ATTENTION_INLINE void qk_kernel(const float* q, int64_t d, const float* kt, float* s) {
  __m256 acc[MR][4];
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t e = 0; e < d; ++e) {
    const float* krow = kt + e * kKeyBlock;
    PS_ATTENTION_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m256 qb = _mm256_set1_ps(q[r * d + e]);
      PS_ATTENTION_UNROLL
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(qb, _mm256_loadu_ps(krow + 8 * v), acc[r][v]);
    }
  }
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(s + r * kKeyBlock + 8 * v, acc[r][v]);
}

inline void qk(const float* q, int mr, int64_t d, const float* kt, float* s) {
  for (int r0 = 0; r0 < mr; r0 += 3) {
    switch (std::min(3, mr - r0)) {
      case 1: qk_kernel<1>(q + r0 * d, d, kt, s + r0 * kKeyBlock); break;
      case 2: qk_kernel<2>(q + r0 * d, d, kt, s + r0 * kKeyBlock); break;
      default: qk_kernel<3>(q + r0 * d, d, kt, s + r0 * kKeyBlock); break;
    }
  }
}

// 2^x for x <= 0 (scores minus the running max); -inf (masked) gives exactly 0: x is clamped
// to -127, whose power of two has a zero exponent field (0.0f).
PS_ATTENTION_INLINE __m256 exp2_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);  // [-0.5, 0.5]
  __m256 y = _mm256_set1_ps(1.525273380405984e-05f);  // the AVX-512 path's Taylor series of 2^f
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.5403530393381608e-04f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3333558146428443e-03f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.618129107628477e-03f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.550410866482158e-02f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.402265069591007e-01f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.931471805599453e-01f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

PS_ATTENTION_INLINE float hmax(__m256 a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline void softmax(const float* s, const uint32_t* bits, int mr, float* m, float* l, float* p, float* alpha) {
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int r = 0; r < mr; ++r) {
    __m256 sv[4];
    __m256 mx = ninf;
    for (int v = 0; v < 4; ++v) {
      const __m256i b = _mm256_and_si256(_mm256_set1_epi32(int((bits[r] >> (8 * v)) & 0xffu)), lane_bit);
      const __m256 allowed = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane_bit));
      sv[v] = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + r * kKeyBlock + 8 * v), allowed);
      mx = _mm256_max_ps(mx, sv[v]);
    }
    const float block_max = hmax(mx);
    if (block_max == kNegInf) {
      alpha[r] = 1.0f;
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(p + r * kKeyBlock + 8 * v, _mm256_setzero_ps());
      continue;
    }
    const float m_new = std::max(m[r], block_max);
    const __m256 mv = _mm256_set1_ps(m_new);
    __m256 pv[4];
    for (int v = 0; v < 4; ++v) pv[v] = exp2_nonpositive(_mm256_sub_ps(sv[v], mv));
    alpha[r] = m_new == m[r] ? 1.0f : std::exp2(m[r] - m_new);  // the max settles after a few blocks
    // partial sums stay in lanes (kSumLanes = 16: two vectors a row)
    const __m256 a = _mm256_set1_ps(alpha[r]);
    float* lr = l + r * kSumLanes;
    _mm256_storeu_ps(lr, _mm256_fmadd_ps(_mm256_loadu_ps(lr), a, _mm256_add_ps(pv[0], pv[2])));
    _mm256_storeu_ps(lr + 8, _mm256_fmadd_ps(_mm256_loadu_ps(lr + 8), a, _mm256_add_ps(pv[1], pv[3])));
    m[r] = m_new;
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(p + r * kKeyBlock + 8 * v, pv[v]);
  }
}

// o_r = o_r * alpha[r] + sum_c p[r][c] v_c for rows r0 .. r0 + MR - 1 and columns col0 ..
// col0 + 8 NV - 1 (MR x NV accumulators); the last vector's columns past D are not read.
template <int MR, int NV>
PS_ATTENTION_INLINE void pv_kernel(float* o, int64_t dp, const float* p, const float* alpha, const float* const* vrow,
                                   int kb, int r0, int64_t col0, __m256i last) {
  __m256 acc[MR][NV];
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r0 + r]);
    PS_ATTENTION_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_mul_ps(_mm256_loadu_ps(o + (r0 + r) * dp + col0 + 8 * v), a);
  }
  for (int c = 0; c < kb; ++c) {
    __m256 vv[NV];
    PS_ATTENTION_UNROLL
    for (int v = 0; v < NV; ++v)
      vv[v] = v == NV - 1 ? _mm256_maskload_ps(vrow[c] + col0 + 8 * v, last) : _mm256_loadu_ps(vrow[c] + col0 + 8 * v);
    PS_ATTENTION_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m256 pb = _mm256_set1_ps(p[(r0 + r) * kKeyBlock + c]);
      PS_ATTENTION_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(pb, vv[v], acc[r][v]);
    }
  }
  PS_ATTENTION_UNROLL
  for (int r = 0; r < MR; ++r) {
    PS_ATTENTION_UNROLL
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + (r0 + r) * dp + col0 + 8 * v, acc[r][v]);
  }
}

template <int MR>
inline void pv_rows(float* o, int64_t d, int64_t dp, const float* p, const float* alpha, const float* const* vrow,
                    int kb, int r0) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t col0 = 0; col0 < d; col0 += 32) {
    const int64_t left = d - col0;
    const int nv = int(std::min<int64_t>(4, (left + 7) / 8));
    const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(left - 8 * (nv - 1))), lanes);
    switch (nv) {
      case 1: pv_kernel<MR, 1>(o, dp, p, alpha, vrow, kb, r0, col0, last); break;
      case 2: pv_kernel<MR, 2>(o, dp, p, alpha, vrow, kb, r0, col0, last); break;
      case 3: pv_kernel<MR, 3>(o, dp, p, alpha, vrow, kb, r0, col0, last); break;
      default: pv_kernel<MR, 4>(o, dp, p, alpha, vrow, kb, r0, col0, last); break;
    }
  }
}

// P.V two rows at a time (2 x 4 accumulators + 4 V vectors + a broadcast of 16 registers).
inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, const float* const* vrow,
               int kb) {
  for (int r0 = 0; r0 < mr; r0 += 2) {
    if (mr - r0 >= 2) {
      pv_rows<2>(o, d, dp, p, alpha, vrow, kb, r0);
    } else {
      pv_rows<1>(o, d, dp, p, alpha, vrow, kb, r0);
    }
  }
}

#else  // portable fallback: the same contracts in plain loops

template <typename T>
inline void build_kt(const T* const* krow, int kb, int64_t d, float* kt) {
  for (int64_t e = 0; e < d; ++e)
    for (int c = 0; c < kKeyBlock; ++c) kt[e * kKeyBlock + c] = c < kb ? to_float(krow[c][e]) : 0.0f;
}

template <typename T>
inline void stage_v(const T* const* vsrc, int kb, int64_t d, int64_t dp, float* buf, const float** vrow) {
  for (int c = 0; c < kb; ++c) {
    for (int64_t e = 0; e < d; ++e) buf[c * dp + e] = to_float(vsrc[c][e]);
    vrow[c] = buf + c * dp;
  }
}

inline void qk(const float* q, int mr, int64_t d, const float* kt, float* s) {
  for (int r = 0; r < mr; ++r) {
    float acc[kKeyBlock] = {};
    for (int64_t e = 0; e < d; ++e)
      for (int c = 0; c < kKeyBlock; ++c) acc[c] += q[r * d + e] * kt[e * kKeyBlock + c];
    std::memcpy(s + r * kKeyBlock, acc, sizeof(acc));
  }
}

inline void softmax(const float* s, const uint32_t* bits, int mr, float* m, float* l, float* p, float* alpha) {
  for (int r = 0; r < mr; ++r) {
    float block_max = kNegInf;
    for (int c = 0; c < kKeyBlock; ++c)
      if ((bits[r] >> c) & 1u) block_max = std::max(block_max, s[r * kKeyBlock + c]);
    if (block_max == kNegInf) {
      alpha[r] = 1.0f;
      std::fill(p + r * kKeyBlock, p + (r + 1) * kKeyBlock, 0.0f);
      continue;
    }
    const float m_new = std::max(m[r], block_max);
    alpha[r] = std::exp2(m[r] - m_new);
    for (int c = 0; c < kSumLanes; ++c) l[r * kSumLanes + c] *= alpha[r];
    for (int c = 0; c < kKeyBlock; ++c) {
      const float e = ((bits[r] >> c) & 1u) ? std::exp2(s[r * kKeyBlock + c] - m_new) : 0.0f;
      p[r * kKeyBlock + c] = e;
      l[r * kSumLanes + c % kSumLanes] += e;
    }
    m[r] = m_new;
  }
}

inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, const float* const* vrow,
               int kb) {
  for (int r = 0; r < mr; ++r) {
    float* orow = o + r * dp;
    for (int64_t e = 0; e < d; ++e) orow[e] *= alpha[r];
    for (int c = 0; c < kb; ++c) {
      const float pc = p[r * kKeyBlock + c];
      for (int64_t e = 0; e < d; ++e) orow[e] += pc * vrow[c][e];
    }
  }
}

#endif  // PS_ATTENTION_AVX512 / PS_CPU_AVX2 / portable

// V rows as fp32: fp32 input is used in place, fp16/bf16 is converted into the block buffer.
inline void stage_v_rows(const float* const* vsrc, int kb, int64_t, int64_t, float*, const float** vrow) {
  std::copy(vsrc, vsrc + kb, vrow);
}
template <typename T>
inline void stage_v_rows(const T* const* vsrc, int kb, int64_t d, int64_t dp, float* buf, const float** vrow) {
  stage_v(vsrc, kb, d, dp, buf, vrow);
}

// Scores and P.V from bf16 pairs (vdpbf16ps) for bf16 storage where the CPU has it, else fp32.
template <typename T>
#if defined(PS_ATTENTION_BF16_DOT)
constexpr bool kBf16Dots = std::is_same_v<T, BFloat16>;
#else
constexpr bool kBf16Dots = false;
#endif

// ---------------------------------------------------------------------------------------
// One work item: sequence b, KV head g, query rows [rho0, rho1) of the group (rho = i * G + h).
// ---------------------------------------------------------------------------------------
template <typename T, typename Policy>
void attend_rows(const Problem<T>& a, const SeqRows& seq, const Policy& policy, int64_t b, int64_t g, int64_t rho0,
                 int64_t rho1, Workspace& ws) {
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dp = (D + 15) / 16 * 16;
  const int64_t rows = rho1 - rho0, prefix = a.cache_lens[b];
  if (rows <= 0) return;
  ws.reserve(rows, D, Dp);
  const float qscale = a.scale * kLog2e;
  const int64_t pairs = (D + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (rho0 + r) / G, h = (rho0 + r) % G;
    const T* src = a.q + ((b * a.q_heads + g * G + h) * a.rows + seq.row(i)) * D;
    if constexpr (kBf16Dots<T>) {  // raw bf16 pairs; the scale is applied to the scores
      for (int64_t e = 0; e < pairs; ++e) {
        const uint32_t hi = 2 * e + 1 < D ? src[2 * e + 1].bits : 0u;
        ws.q_pairs[r * pairs + e] = src[2 * e].bits | (hi << 16);
      }
    } else {
      for (int64_t e = 0; e < D; ++e) ws.q[r * D + e] = to_float(src[e]) * qscale;
    }
  }
  std::fill(ws.o.data(), ws.o.data() + rows * Dp, 0.0f);
  std::fill(ws.m.data(), ws.m.data() + rows, kNegInf);
  std::fill(ws.l.data(), ws.l.data() + rows * kSumLanes, 0.0f);

  const int64_t kv_base = (b * a.kv_heads + g);
  const T* kc = a.k_cache + kv_base * a.cache_rows * D;
  const T* vc = a.v_cache + kv_base * a.cache_rows * D;
  const T* kn = a.k_new + kv_base * a.rows * D;
  const T* vn = a.v_new + kv_base * a.rows * D;
  const T* krow[kKeyBlock];
  const T* vsrc[kKeyBlock];
  const float* vrow[kKeyBlock];
  uint32_t bits[kRowTile];

  // segment 0: the prefix (every query sees every row); segment 1: the n new keys (policy)
  for (int segment = 0; segment < 2; ++segment) {
    const int64_t count = segment == 0 ? prefix : seq.n;
    for (int64_t j0 = 0; j0 < count; j0 += kKeyBlock) {
      const int kb = int(std::min<int64_t>(kKeyBlock, count - j0));
      const uint32_t valid = kb == kKeyBlock ? 0xffffffffu : (1u << kb) - 1u;
      for (int c = 0; c < kb; ++c) {
        const int64_t row = segment == 0 ? j0 + c : seq.row(j0 + c);
        krow[c] = (segment == 0 ? kc : kn) + row * D;
        vsrc[c] = (segment == 0 ? vc : vn) + row * D;
      }
      bool staged = false;
      for (int64_t t0 = 0; t0 < rows; t0 += kRowTile) {
        const int mr = int(std::min<int64_t>(kRowTile, rows - t0));
        uint32_t any = 0;
        for (int r = 0; r < mr; ++r) {
          bits[r] = segment == 0 ? valid : policy.bits(b, (rho0 + t0 + r) / G, j0) & valid;
          any |= bits[r];
        }
        if (!any) continue;  // e.g. causal rows before this block
#if defined(PS_ATTENTION_BF16_DOT)  // the bf16-pair kernels exist only in this build
        if constexpr (kBf16Dots<T>) {
          if (!staged) {  // convert the block once, on first use
            build_kt_pairs(krow, kb, D, ws.kt_pairs.data());
            stage_v_pairs(vsrc, kb, D, Dp, ws.v_pairs.data());
            staged = true;
          }
          qk_pairs(ws.q_pairs.data() + t0 * pairs, mr, pairs, ws.kt_pairs.data(), qscale, ws.s.data());
          softmax(ws.s.data(), bits, mr, ws.m.data() + t0, ws.l.data() + t0 * kSumLanes, ws.p.data(), ws.alpha.data());
          pv(ws.o.data() + t0 * Dp, mr, D, Dp, ws.alpha.data(), Bf16PairsPV(ws.p.data(), mr, ws.v_pairs.data(), Dp, kb));
          continue;
        }
#endif
        if (!staged) {  // convert the block once, on first use
          build_kt(krow, kb, D, ws.kt.data());
          stage_v_rows(vsrc, kb, D, Dp, ws.v.data(), vrow);
          staged = true;
        }
        qk(ws.q.data() + t0 * D, mr, D, ws.kt.data(), ws.s.data());
        softmax(ws.s.data(), bits, mr, ws.m.data() + t0, ws.l.data() + t0 * kSumLanes, ws.p.data(), ws.alpha.data());
        pv(ws.o.data() + t0 * Dp, mr, D, Dp, ws.p.data(), ws.alpha.data(), vrow, kb);
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (rho0 + r) / G, h = (rho0 + r) % G;
    const int64_t out_row = (b * a.q_heads + g * G + h) * a.rows + seq.row(i);
    T* dst = a.out + out_row * D;
    float l = 0.0f;  // 0 only when nothing was allowed (an invalid mask, validate=False)
    for (int c = 0; c < kSumLanes; ++c) l += ws.l[r * kSumLanes + c];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t e = 0; e < D; ++e) store(dst + e, ws.o[r * Dp + e] * inv);
    a.lse[out_row] = l > 0.0f ? (ws.m[r] + std::log2(l)) * kLn2 : kNegInf;
  }
}

// Work that belongs to (b, g) once: append the new rows to the cache, fill padding rows.
template <typename T>
void write_cache_and_padding(const Problem<T>& a, const SeqRows& seq, int64_t b, int64_t g) {
  const int64_t D = a.head_dim, G = a.q_heads / a.kv_heads, kv_base = b * a.kv_heads + g;
  const int64_t dst = kv_base * a.cache_rows + a.cache_lens[b];
  std::memcpy(a.k_cache + dst * D, a.k_new + kv_base * a.rows * D, sizeof(T) * seq.written * D);
  std::memcpy(a.v_cache + dst * D, a.v_new + kv_base * a.rows * D, sizeof(T) * seq.written * D);
  for (int64_t h = 0; h < G; ++h) {
    const int64_t head_row = (b * a.q_heads + g * G + h) * a.rows;
    for (int64_t row = seq.split; row < seq.split + seq.skip; ++row) {
      T* out = a.out + (head_row + row) * D;
      for (int64_t e = 0; e < D; ++e) store(out + e, 0.0f);
      a.lse[head_row + row] = kNegInf;
    }
  }
}

// Work items [begin, end) of B * Hkv * chunks: item w = (b, g, chunk). seq_rows(b) -> SeqRows.
template <typename T, typename SeqRowsFn, typename Policy>
void attention_items(const Problem<T>& a, const SeqRowsFn& seq_rows, const Policy& policy, int64_t chunks,
                     int64_t begin, int64_t end) {
  Workspace ws;
  const int64_t G = a.q_heads / a.kv_heads;
  for (int64_t w = begin; w < end; ++w) {
    const int64_t chunk = w % chunks, bg = w / chunks, b = bg / a.kv_heads, g = bg % a.kv_heads;
    const SeqRows seq = seq_rows(b);
    const int64_t total = seq.n * G;
    if (chunk == 0) write_cache_and_padding(a, seq, b, g);
    attend_rows(a, seq, policy, b, g, total * chunk / chunks, total * (chunk + 1) / chunks, ws);
  }
}

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL::attention
