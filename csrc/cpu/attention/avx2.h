// The attention stages with AVX2 + FMA + F16C (common.h's contracts): 8 lanes, 16 registers.
#pragma once
#include "common.h"

#if !defined(PS_CPU_AVX2)
#error "attention/avx2.h needs the avx2 level's flags (-mavx2 -mfma -mf16c)"
#endif

namespace ps_kernels::cpu::PS_CPU_LEVEL::attention {

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

inline void qk(QRows q, int mr, KCols k, float* s) {
  const int64_t d = q.d;
  for (int r0 = 0; r0 < mr; r0 += 3) {
    switch (std::min(3, mr - r0)) {
      case 1: qk_kernel<1>(q.q + r0 * d, d, k.kt, s + r0 * kKeyBlock); break;
      case 2: qk_kernel<2>(q.q + r0 * d, d, k.kt, s + r0 * kKeyBlock); break;
      default: qk_kernel<3>(q.q + r0 * d, d, k.kt, s + r0 * kKeyBlock); break;
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

// tanh, within 3 ulp (the AVX-512 path's method): x + x^3 P(x^2) below |x| = 0.5, else
// (1 - e) / (1 + e) with e = exp(-2|x|), the sign copied back.
PS_ATTENTION_INLINE __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, x), u = _mm256_mul_ps(a, a);
  __m256 poly = _mm256_set1_ps(-0.0066478378139436245f);
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(0.021298186853528023f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(-0.05389922857284546f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(0.13332964479923248f));
  poly = _mm256_fmadd_ps(poly, u, _mm256_set1_ps(-0.333333283662796f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(a, u), poly, a);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp2_nonpositive(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f * kLog2e)));
  const __m256 large = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 t = _mm256_blendv_ps(large, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.5f), _CMP_LT_OQ));
  return _mm256_or_ps(t, _mm256_and_ps(x, sign));
}

inline void softcap(float* s, int mr, float cap) {
  const __m256 c = _mm256_set1_ps(cap), inv = _mm256_set1_ps(1.0f / cap);
  for (int v = 0; v < mr * (kKeyBlock / 8); ++v)
    _mm256_storeu_ps(s + 8 * v, _mm256_mul_ps(c, tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + 8 * v), inv))));
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
inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, VRows v) {
  for (int r0 = 0; r0 < mr; r0 += 2) {
    if (mr - r0 >= 2) {
      pv_rows<2>(o, d, dp, p, alpha, v.rows, v.kb, r0);
    } else {
      pv_rows<1>(o, d, dp, p, alpha, v.rows, v.kb, r0);
    }
  }
}

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL::attention
