// The staged attention driver, written once over common.h's stage contracts: this level's
// instruction set supplies the stages (avx512.h, avx2.h or portable.h, chosen by the flags
// the level is compiled with).
#pragma once
#include "common.h"

#if defined(PS_CPU_AVX512)
#include "avx512.h"
#elif defined(PS_CPU_AVX2)
#include "avx2.h"
#else
#include "portable.h"
#endif

namespace ps_kernels::cpu::PS_CPU_LEVEL::attention {

// V rows as fp32: fp32 input is used in place, fp16/bf16 is converted into the block buffer.
inline void stage_v_rows(const float* const* vsrc, int kb, int64_t, int64_t, float*, const float** vrow) {
  std::copy(vsrc, vsrc + kb, vrow);
}
template <typename T>
inline void stage_v_rows(const T* const* vsrc, int kb, int64_t d, int64_t dp, float* buf, const float** vrow) {
  stage_v(vsrc, kb, d, dp, buf, vrow);
}

// The fp32 operands (common.h) of storage type T in one thread's workspace.
template <typename T>
struct F32Operands {
  Workspace& ws;
  int64_t d, dp;
  float qscale;  // scale * log2(e)
  void load_q(int64_t r, const T* src) {
    for (int64_t e = 0; e < d; ++e) ws.q[r * d + e] = to_float(src[e]) * qscale;
  }
  void stage(const T* const* krow, const T* const* vsrc, int kb) {
    build_kt(krow, kb, d, ws.kt.data());
    stage_v_rows(vsrc, kb, d, dp, ws.v.data(), ws.vrow);
  }
  QRows q(int64_t t0) { return {ws.q.data() + t0 * d, d}; }
  KCols k() { return {ws.kt.data(), d}; }
  VRows v(int kb) { return {ws.vrow, kb}; }
};

#if defined(PS_ATTENTION_BF16_DOT)
// The bf16-pair operands (common.h) of bf16 storage: raw bf16 pairs, the scale on the scores.
struct PairOperands {
  Workspace& ws;
  int64_t d, dp;
  float qscale;
  int64_t pairs() const { return (d + 1) / 2; }
  void load_q(int64_t r, const BFloat16* src) {
    for (int64_t e = 0; e < pairs(); ++e) {
      const uint32_t hi = 2 * e + 1 < d ? src[2 * e + 1].bits : 0u;
      ws.q_pairs[r * pairs() + e] = src[2 * e].bits | (hi << 16);
    }
  }
  void stage(const BFloat16* const* krow, const BFloat16* const* vsrc, int kb) {
    build_kt_pairs(krow, kb, d, ws.kt_pairs.data());
    stage_v_pairs(vsrc, kb, d, dp, ws.v_pairs.data());
  }
  QPairs q(int64_t t0) { return {ws.q_pairs.data() + t0 * pairs(), pairs(), qscale}; }
  KPairs k() { return {ws.kt_pairs.data(), pairs()}; }
  VPairs v(int kb) { return {ws.v_pairs.data(), kb}; }
};

// Scores and P.V from bf16 pairs for bf16 storage where the CPU has vdpbf16ps, else fp32.
template <typename T>
using Operands = std::conditional_t<std::is_same_v<T, BFloat16>, PairOperands, F32Operands<T>>;
#else
template <typename T>
using Operands = F32Operands<T>;
#endif

// Bits c >= from of a 32-key block (from <= 0: all, >= 32: none).
inline uint32_t bits_from(int64_t from) { return from <= 0 ? 0xffffffffu : from >= 32 ? 0u : 0xffffffffu << from; }

// The sliding window of one work item: each new key's depth (ws.depth[j], j < n) and each query
// row's first visible prefix row (ws.first[r], r < rows; = prefix when it sees none). Returns the
// first prefix row any of the rows sees.
template <typename Policy>
int64_t window_bounds(const SeqRows& seq, const Policy& policy, int64_t b, int64_t G, int64_t rho0, int64_t rows,
                      int64_t prefix, int64_t window, Workspace& ws) {
  ws.depth.resize(seq.n);
  ws.first.resize(rows);
  for (int64_t j = 0; j < seq.n; ++j) ws.depth[j] = policy.depth(b, j);
  int64_t first = prefix;
  for (int64_t r = 0; r < rows; ++r) {  // position prefix + depth sees rows > prefix + depth - window
    ws.first[r] = std::clamp<int64_t>(prefix + ws.depth[(rho0 + r) / G] - window + 1, 0, prefix);
    first = std::min(first, ws.first[r]);
  }
  return first;
}

// New keys j0 .. j0 + kb - 1 within the window of a query at depth d (their depth > d - window).
inline uint32_t window_bits(const Workspace& ws, int64_t j0, int kb, int64_t d, int64_t window) {
  uint32_t bits = 0;
  for (int c = 0; c < kb; ++c) bits |= uint32_t(ws.depth.ptr[j0 + c] > d - window) << c;
  return bits;
}

// ---------------------------------------------------------------------------------------
// One work item: sequence b, KV head g, query rows [rho0, rho1) of the group (rho = i * G + h).
// ---------------------------------------------------------------------------------------
template <typename T, typename Policy>
void attend_rows(const Problem<T>& a, const SeqRows& seq, const Policy& policy, int64_t b, int64_t g, int64_t rho0,
                 int64_t rho1, Workspace& ws) {
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim, Dp = (D + 15) / 16 * 16;
  const int64_t rows = rho1 - rho0, prefix = a.cache_lens[b], window = a.window;
  if (rows <= 0) return;
  ws.reserve(rows, D, Dp);
  Operands<T> ops{ws, D, Dp, a.scale * kLog2e};
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (rho0 + r) / G, h = (rho0 + r) % G;
    ops.load_q(r, a.q + ((b * a.q_heads + g * G + h) * a.rows + seq.row(i)) * D);
  }
  std::fill(ws.o.data(), ws.o.data() + rows * Dp, 0.0f);
  std::fill(ws.m.data(), ws.m.data() + rows, kNegInf);
  std::fill(ws.l.data(), ws.l.data() + rows * kSumLanes, 0.0f);
  const int64_t first = window > 0 ? window_bounds(seq, policy, b, G, rho0, rows, prefix, window, ws) : 0;
  const float cap = a.softcap * kLog2e;  // the soft-cap in the scores' log2 domain

  const int64_t kv_base = (b * a.kv_heads + g);
  const T* kc = a.k_cache + kv_base * a.cache_rows * D;
  const T* vc = a.v_cache + kv_base * a.cache_rows * D;
  const T* kn = a.k_new + kv_base * a.rows * D;
  const T* vn = a.v_new + kv_base * a.rows * D;
  const T* krow[kKeyBlock];
  const T* vsrc[kKeyBlock];
  uint32_t bits[kRowTile];

  // segment 0: the prefix rows from `first` (every row without a window); segment 1: the n new
  // keys (policy), in blocks from key 0 (TreeBitsPolicy reads whole 32-bit halves of its words)
  for (int segment = 0; segment < 2; ++segment) {
    const int64_t begin = segment == 0 ? first : 0, end = segment == 0 ? prefix : seq.n;
    for (int64_t j0 = begin; j0 < end; j0 += kKeyBlock) {
      const int kb = int(std::min<int64_t>(kKeyBlock, end - j0));
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
          const int64_t i = (rho0 + t0 + r) / G;
          if (segment == 0) {
            bits[r] = window > 0 ? valid & bits_from(ws.first[t0 + r] - j0) : valid;
          } else {
            bits[r] = policy.bits(b, i, j0) & valid;
            if (window > 0 && bits[r]) bits[r] &= window_bits(ws, j0, kb, ws.depth[i], window);
          }
          any |= bits[r];
        }
        if (!any) continue;  // e.g. causal rows before this block, or rows whose window ends before it
        if (!staged) {       // convert the block once, on first use
          ops.stage(krow, vsrc, kb);
          staged = true;
        }
        qk(ops.q(t0), mr, ops.k(), ws.s.data());
        if (cap > 0.0f) softcap(ws.s.data(), mr, cap);
        softmax(ws.s.data(), bits, mr, ws.m.data() + t0, ws.l.data() + t0 * kSumLanes, ws.p.data(), ws.alpha.data());
        pv(ws.o.data() + t0 * Dp, mr, D, Dp, ws.p.data(), ws.alpha.data(), ops.v(kb));
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (rho0 + r) / G, h = (rho0 + r) % G;
    const int64_t out_row = (b * a.q_heads + g * G + h) * a.rows + seq.row(i);
    T* dst = a.out + out_row * D;
    float m = ws.m[r], l = 0.0f;  // l = 0 only when nothing was allowed (an invalid mask, validate=False)
    for (int c = 0; c < kSumLanes; ++c) l += ws.l[r * kSumLanes + c];
    float o_scale = 1.0f;
    if (a.sinks != nullptr && l > 0.0f) {  // the sink joins the denominator: rescale to the larger max
      const float sink = a.sinks[g * G + h] * kLog2e, m_new = std::max(m, sink);
      o_scale = std::exp2(m - m_new);
      l = l * o_scale + std::exp2(sink - m_new);
      m = m_new;
    }
    const float inv = l > 0.0f ? o_scale / l : 0.0f;
    for (int64_t e = 0; e < D; ++e) store(dst + e, ws.o[r * Dp + e] * inv);
    a.lse[out_row] = l > 0.0f ? (m + std::log2(l)) * kLn2 : kNegInf;
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
