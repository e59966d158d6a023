// The attention stages with AVX-512 F/BW/VL/DQ (common.h's contracts): 16 lanes, 32
// registers; on the avx512_bf16 level also over bf16 pairs (vdpbf16ps) for bf16 storage.
#pragma once
#include "common.h"

#if !defined(PS_CPU_AVX512)
#error "attention/avx512.h needs the avx512 level's flags (-mavx512f -mavx512bw -mavx512vl -mavx512dq)"
#endif
#if defined(__AVX512BF16__)
#define PS_ATTENTION_BF16_DOT 1  // vdpbf16ps: bf16 dot products at twice the fp32 FMA rate
#endif

namespace ps_kernels::cpu::PS_CPU_LEVEL::attention {

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

inline void qk(QRows q, int mr, KCols k, float* s) {
  switch (mr) {
    case 1: qk_kernel<1>(q.q, q.d, k.kt, s); break;
    case 2: qk_kernel<2>(q.q, q.d, k.kt, s); break;
    case 3: qk_kernel<3>(q.q, q.d, k.kt, s); break;
    case 4: qk_kernel<4>(q.q, q.d, k.kt, s); break;
    case 5: qk_kernel<5>(q.q, q.d, k.kt, s); break;
    case 6: qk_kernel<6>(q.q, q.d, k.kt, s); break;
    case 7: qk_kernel<7>(q.q, q.d, k.kt, s); break;
    default: qk_kernel<8>(q.q, q.d, k.kt, s); break;
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

inline void qk(QPairs q, int mr, KPairs k, float* s) {
  switch (mr) {
    case 1: qk_pairs_kernel<1>(q.q, q.pairs, k.kt, q.scale, s); break;
    case 2: qk_pairs_kernel<2>(q.q, q.pairs, k.kt, q.scale, s); break;
    case 3: qk_pairs_kernel<3>(q.q, q.pairs, k.kt, q.scale, s); break;
    case 4: qk_pairs_kernel<4>(q.q, q.pairs, k.kt, q.scale, s); break;
    case 5: qk_pairs_kernel<5>(q.q, q.pairs, k.kt, q.scale, s); break;
    case 6: qk_pairs_kernel<6>(q.q, q.pairs, k.kt, q.scale, s); break;
    case 7: qk_pairs_kernel<7>(q.q, q.pairs, k.kt, q.scale, s); break;
    default: qk_pairs_kernel<8>(q.q, q.pairs, k.kt, q.scale, s); break;
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

// tanh, within 3 ulp: x + x^3 P(x^2) below |x| = 0.5 (P fitted to the relative error), else
// (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.37 (no cancellation), the sign copied back.
PS_ATTENTION_INLINE __m512 tanh16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x), u = _mm512_mul_ps(a, a);
  __m512 poly = _mm512_set1_ps(-0.0066478378139436245f);
  poly = _mm512_fmadd_ps(poly, u, _mm512_set1_ps(0.021298186853528023f));
  poly = _mm512_fmadd_ps(poly, u, _mm512_set1_ps(-0.05389922857284546f));
  poly = _mm512_fmadd_ps(poly, u, _mm512_set1_ps(0.13332964479923248f));
  poly = _mm512_fmadd_ps(poly, u, _mm512_set1_ps(-0.333333283662796f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(a, u), poly, a);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp2_nonpositive(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f * kLog2e)));
  const __m512 large = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.5f), _CMP_LT_OQ), large, small);
  return _mm512_or_ps(t, _mm512_and_ps(x, _mm512_set1_ps(-0.0f)));
}

inline void softcap(float* s, int mr, float cap) {
  const __m512 c = _mm512_set1_ps(cap), inv = _mm512_set1_ps(1.0f / cap);
  for (int v = 0; v < mr * (kKeyBlock / 16); ++v)
    _mm512_storeu_ps(s + 16 * v, _mm512_mul_ps(c, tanh16(_mm512_mul_ps(_mm512_loadu_ps(s + 16 * v), inv))));
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
inline void pv_tiles(float* o, int mr, int64_t d, int64_t dp, const float* alpha, const Src& src) {
  for (int r0 = 0; r0 < mr; r0 += kPvRows) {
    switch (std::min(kPvRows, mr - r0)) {
      case 1: pv_rows<1>(o, d, dp, alpha, src, r0); break;
      case 2: pv_rows<2>(o, d, dp, alpha, src, r0); break;
      case 3: pv_rows<3>(o, d, dp, alpha, src, r0); break;
      default: pv_rows<4>(o, d, dp, alpha, src, r0); break;
    }
  }
}

inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, VRows v) {
  pv_tiles(o, mr, d, dp, alpha, F32RowsPV{p, v.rows, v.kb});
}

#if defined(PS_ATTENTION_BF16_DOT)
inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, VPairs v) {
  pv_tiles(o, mr, d, dp, alpha, Bf16PairsPV(p, mr, v.vp, dp, v.kb));
}
#endif

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL::attention
