// The attention stages in plain loops (common.h's contracts): the default level, and any CPU
// without AVX2. The compiler vectorises what it can for the baseline target.
#pragma once
#include "common.h"

namespace ps_kernels::cpu::PS_CPU_LEVEL::attention {

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

inline void qk(QRows q, int mr, KCols k, float* s) {
  for (int r = 0; r < mr; ++r) {
    float acc[kKeyBlock] = {};
    for (int64_t e = 0; e < q.d; ++e)
      for (int c = 0; c < kKeyBlock; ++c) acc[c] += q.q[r * q.d + e] * k.kt[e * kKeyBlock + c];
    std::memcpy(s + r * kKeyBlock, acc, sizeof(acc));
  }
}

inline void softcap(float* s, int mr, float cap) {
  for (int c = 0; c < mr * kKeyBlock; ++c) s[c] = cap * std::tanh(s[c] / cap);
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

inline void pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, VRows v) {
  for (int r = 0; r < mr; ++r) {
    float* orow = o + r * dp;
    for (int64_t e = 0; e < d; ++e) orow[e] *= alpha[r];
    for (int c = 0; c < v.kb; ++c) {
      const float pc = p[r * kKeyBlock + c];
      for (int64_t e = 0; e < d; ++e) orow[e] += pc * v.rows[c][e];
    }
  }
}

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL::attention
