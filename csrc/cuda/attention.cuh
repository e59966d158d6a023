// Flash-decoding core shared by the tree_attention and draft_attention CUDA kernels.
// Framework-free: raw pointers, element strides, sizes and a stream. The part above the
// __CUDACC__ guard (parameters, launcher declarations; the split plan in attention_plan.h) is
// plain host C++ so the torch bindings, compiled by the host compiler, can include it.
//
// Both ops attend the N new query rows of each sequence to its committed cache prefix plus
// the N new keys, under a mask over the new keys that the kernel computes:
//   kCausal  key j visible to row i iff j <= i                         (tree_mask = nullptr)
//   kTree    bit j % 64 of word j / 64 of tree_mask[b, i]               (packed int64 words)
//   kDraft   real row t < new_lens[b]: real keys 0..t; mask slot t >= R = N - num_masks:
//            all real keys and slots R..t; padding rows see nothing (out 0, lse -inf)
// Every valid row sees the whole prefix, or with a sliding window only the keys less than
// `window` positions behind it. Positions (relative to the prefix length P): causal row i at
// P + i; tree node i at P + depth(i), depth = popcount(mask row i) - 1; draft real row t at
// P + t and mask slot s (0-based) at P + new_lens[b] + s; cache row c at c. New keys are read
// from k_new/v_new, never from the cache rows this call writes, so the attention and the cache
// append don't race.
//
// Scores: s = scale * q.k, soft-capped to softcap * tanh(s / softcap) when softcap > 0. A
// per-query-head sink logit (sinks) joins the softmax denominator only: out = sum_k p_k v_k
// with p_k = exp(s_k) / (exp(sink) + sum exp(s)), lse = log(exp(sink) + sum exp(s)).
//
// Work layout: one CTA per (sequence, KV head, tile of kRowsPerCta rows, split). The M rows
// of a (sequence, KV head) are its query heads x N nodes, row r = node * group + head-in-group
// (GQA: each K/V tile is loaded once for every query head that shares it). A warp owns
// kRowsPerWarp rows; a key tile of 32 rows is staged in shared memory as fp32 (K transposed,
// V row-major), lane j scores key j for the warp's rows, and for P.V lane l accumulates head
// columns l, l + 32, ... Online softmax in fp32 with exp2 (log2(e) folded into the scores).
//
// The kernel is a sequence of named stages (FlashInfer's compute_qk / update_mdo_states /
// compute_sfm_v): load_rows (scaled q, row positions), for each key tile stage_kv_tile ->
// compute_qk -> visibility -> update_mdo_states -> compute_sfm_v, then write_rows (out/lse,
// the sink folded in) or write_partials; merge_splits_kernel combines the splits.
//
// Split-KV: the prefix rows a CTA reads ([0, P), or with a window from the first row its
// earliest row sees) are cut into num_splits runs of split_rows; the last split also takes
// whatever is left of the prefix and the new keys, so any plan gives the right result and a
// plan only balances the work. With several splits each CTA writes fp32 partials (normalised
// out, lse) and merge_splits_kernel merges them with log-sum-exp weights (and the sink).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "attention_plan.h"
#include "common.cuh"

namespace ps_kernels::cuda {

enum class AttnDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct AttentionParams {
  AttnDtype dtype;
  const void* q;            // [B, Hq, N, D]
  const void* k_new;        // [B, Hkv, N, D]
  const void* v_new;        // [B, Hkv, N, D]
  void* k_cache;            // [B, Hkv, S, D]
  void* v_cache;            // [B, Hkv, S, D]
  void* out;                // [B, Hq, N, D], q's dtype
  float* lse;               // [B, Hq, N], contiguous
  const int64_t* cache_lens;  // [B]
  const int64_t* tree_mask;   // [B, N, W] words (tree_attention; nullptr = causal)
  const int64_t* new_lens;    // [B] (draft_attention)
  int64_t batch, q_heads, kv_heads, rows, head_dim, capacity;  // rows = N, capacity = S
  int64_t num_masks;          // draft_attention: mask slots at the end of the N rows
  float scale;
  int64_t window = 0;         // sliding window in positions; 0 = none
  float softcap = 0.f;        // logit soft-cap; 0 = none
  const float* sinks = nullptr;  // [Hq] fp32 sink logits; nullptr = none
  // element strides of dims 0..2 (dim 3, the head dim, must be contiguous)
  int64_t q_stride[3], k_new_stride[3], v_new_stride[3], k_cache_stride[3], v_cache_stride[3], out_stride[3];
  int64_t mask_stride[2];     // tree_mask strides of dims 0..1 (0 for a broadcast batch)
  // split-KV (an AttentionSplitPlan); partials needed only when num_splits > 1
  int64_t num_splits = 1, split_rows = 0;
  float* partial_out = nullptr;  // [partial_rows, D]
  float* partial_lse = nullptr;  // [partial_rows]
};

// Launchers (tree_attention.cu, draft_attention.cu): the attention kernel, the merge pass
// when split, and the cache append (tree: all N rows; draft: the new_lens[b] real rows), all
// on `stream`. Head dims 64/80/96/128 have specialised kernels, others up to 256 a generic
// one. Returns the first CUDA error; cudaErrorInvalidValue for an unsupported shape.
cudaError_t launch_tree_attention(const AttentionParams& p, cudaStream_t stream);
cudaError_t launch_draft_attention(const AttentionParams& p, cudaStream_t stream);

}  // namespace ps_kernels::cuda

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ps_kernels::cuda {
namespace attn {

enum Mask : int { kCausal = 0, kTree = 1, kDraft = 2 };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// first_key thresholds (relative positions, attention.cuh's load_rows): a row that does not
// exist sees nothing, a row without a window every key (cache rows below 2^30 assumed)
constexpr int kNoRow = 0x3fffffff;
constexpr int kAllKeys = -0x3fffffff;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// cache_lens[b] brought into [0, capacity - rows]: the rows written and read stay in the cache
// whatever cache_lens holds (valid lengths are unchanged).
__device__ __forceinline__ int64_t clamp_prefix(int64_t len, int64_t capacity, int64_t rows) {
  const int64_t most = capacity - rows;
  return len < 0 ? 0 : (len > most ? (most < 0 ? 0 : most) : len);
}

// Where a CTA works: its sequence, KV head, row tile and split, and the sequence's lengths.
struct CtaCoords {
  int64_t bh, b, kvh;
  int split, group, n_rows, m_total, m0, warp, lane;
  int n_real, first_mask;  // draft_attention: real rows, first mask slot
  int64_t prefix;
};

template <int kMask>
__device__ __forceinline__ CtaCoords cta_coords(const AttentionParams& p) {
  CtaCoords c;
  c.bh = blockIdx.x;
  c.b = c.bh / p.kv_heads;
  c.kvh = c.bh % p.kv_heads;
  c.split = blockIdx.z;
  c.n_rows = static_cast<int>(p.rows);
  c.group = static_cast<int>(p.q_heads / p.kv_heads);
  c.m_total = c.n_rows * c.group;
  c.m0 = blockIdx.y * kAttnRowsPerCta;
  c.warp = threadIdx.x / 32;
  c.lane = threadIdx.x % 32;
  c.n_real = kMask == kDraft ? static_cast<int>(p.new_lens[c.b]) : 0;
  c.first_mask = c.n_rows - static_cast<int>(p.num_masks);
  // cache room is checked on the host only for what the host knows (rows <= capacity, the
  // bindings); a prefix past capacity - rows (an invalid cache_lens, read here without a host
  // sync) is clamped: never a read or write outside the cache, the result unspecified
  c.prefix = clamp_prefix(p.cache_lens[c.b], p.capacity, kMask == kDraft ? c.n_real : p.rows);
  return c;
}

// Whether row r of the tile space exists (draft padding rows do not).
template <int kMask>
__device__ __forceinline__ bool row_exists(const CtaCoords& c, int r) {
  if (r >= c.m_total) return false;
  if constexpr (kMask == kDraft) {
    const int node = r / c.group;
    return node < c.n_real || node >= c.first_mask;
  }
  return true;
}

// Position of new row `node` (query or key) after the prefix: P + node_position.
template <int kMask>
__device__ __forceinline__ int node_position(const AttentionParams& p, const CtaCoords& c, int node) {
  if constexpr (kMask == kCausal) {
    return node;
  } else if constexpr (kMask == kTree) {
    // depth = ancestors-or-self - 1: the bits of the node's mask row
    const int64_t* row = p.tree_mask + c.b * p.mask_stride[0] + node * p.mask_stride[1];
    const int words = static_cast<int>(ceil_div(p.rows, 64));
    int bits = 0;
    for (int w = 0; w < words; ++w) bits += __popcll(static_cast<unsigned long long>(row[w]));
    return bits - 1;
  } else {
    return node < c.n_real ? node : c.n_real + (node - c.first_mask);
  }
}

// Stage load_rows: the CTA's q rows, scaled (and folded with log2(e), or divided by the
// soft-cap), into fp32 shared memory, and into first_s each row's first visible key as a
// position relative to the prefix length (key at relative position x visible iff x >=
// first_s[row]; prefix row c is at c - P): node_position - window + 1 with a window, kAllKeys
// without, kNoRow where the row does not exist. The caller syncs before reading either.
template <typename T, int kMask>
__device__ __forceinline__ void load_rows(float* q_s, int* first_s, const AttentionParams& p, const CtaCoords& c,
                                          int D) {
  const float q_scale = p.softcap > 0.f ? p.scale / p.softcap : p.scale * kLog2e;
  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < kAttnRowsPerCta * D; idx += blockDim.x) {
    const int r = c.m0 + idx / D, d = idx % D;
    float x = 0.f;
    if (row_exists<kMask>(c, r)) {
      const int64_t head = c.kvh * c.group + r % c.group;
      x = to_float(q[c.b * p.q_stride[0] + head * p.q_stride[1] + (r / c.group) * p.q_stride[2] + d]) * q_scale;
    }
    q_s[idx] = x;
  }
  for (int t = threadIdx.x; t < kAttnRowsPerCta; t += blockDim.x) {
    const int r = c.m0 + t;
    int first = kNoRow;
    if (row_exists<kMask>(c, r)) {
      const int64_t x = p.window > 0 ? node_position<kMask>(p, c, r / c.group) - p.window + 1 : kAllKeys;
      first = static_cast<int>(x > kAllKeys ? x : kAllKeys);
    }
    first_s[t] = first;
  }
}

// The rows one warp owns: each one's first visible key (load_rows; kNoRow: no such row).
struct WarpRows {
  int first_key[kAttnRowsPerWarp];
  bool any;
};

__device__ __forceinline__ WarpRows warp_rows(const CtaCoords& c, const int* first_s) {
  WarpRows w;
  w.any = false;
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    w.first_key[rr] = first_s[c.warp * kAttnRowsPerWarp + rr];
    w.any |= w.first_key[rr] != kNoRow;
  }
  return w;
}

// The first prefix row any row of the CTA sees: 0, or with a window the first row within
// `window` positions of the CTA's earliest row (whole tiles before it are never loaded).
__device__ __forceinline__ int64_t window_start(const CtaCoords& c, const int* first_s) {
  int earliest = kNoRow;
  for (int t = 0; t < kAttnRowsPerCta; ++t) earliest = min(earliest, first_s[t]);
  if (earliest == kNoRow) return c.prefix;  // no row: nothing to read
  const int64_t first = c.prefix + earliest;
  return first > 0 ? first : 0;
}

// Stage stage_kv_tile: `valid` rows (of kAttnKeys) of a [rows, D] source into fp32 shared
// memory, K transposed (dst[d * kAttnKeys + row]) or V row-major (dst[row * D + d]).
// Consecutive threads take consecutive rows for K and consecutive columns for V, so neither
// store conflicts. `vec16`: the source rows start 16-byte aligned and D fills whole 16-byte
// vectors.
template <typename T, bool kTransposed>
__device__ __forceinline__ void stage_tile(float* dst, const T* src, int64_t row_stride, int valid, int D,
                                           bool vec16) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (vec16) {
    const int vecs = D / kVec;
    for (int idx = threadIdx.x; idx < valid * vecs; idx += blockDim.x) {
      const int row = kTransposed ? idx % valid : idx / vecs;
      const int col = (kTransposed ? idx / valid : idx % vecs) * kVec;
      alignas(16) T vals[kVec];
      *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(src + row * row_stride + col);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dst[kTransposed ? (col + e) * kAttnKeys + row : row * D + col + e] = to_float(vals[e]);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < valid * D; idx += blockDim.x) {
      const int row = kTransposed ? idx % valid : idx / D;
      const int col = kTransposed ? idx / valid : idx % D;
      dst[kTransposed ? col * kAttnKeys + row : row * D + col] = to_float(src[row * row_stride + col]);
    }
  }
}

template <typename T>
__device__ __forceinline__ void stage_kv_tile(float* k_t, float* v_s, const T* k, int64_t k_stride, const T* v,
                                              int64_t v_stride, int valid, int D, bool vec16) {
  __syncthreads();  // the previous tile is consumed
  stage_tile<T, true>(k_t, k, k_stride, valid, D, vec16);
  stage_tile<T, false>(v_s, v, v_stride, valid, D, vec16);
  __syncthreads();
}

// Per-warp online-softmax state for kAttnRowsPerWarp rows (log2 domain); lane l holds
// columns l + 32 c.
template <int kCols>
struct RowState {
  float m[kAttnRowsPerWarp], l[kAttnRowsPerWarp], acc[kAttnRowsPerWarp][kCols];
};

template <int kCols>
__device__ __forceinline__ void init_state(RowState<kCols>& st) {
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    st.m[rr] = -INFINITY;
    st.l[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) st.acc[rr][c] = 0.f;
  }
}

// Stage compute_qk: the lane's key (of the staged tile) against the warp's rows, in the log2
// domain: q.k (q carries scale * log2(e)), or softcap * log2(e) * tanh(q.k) (q carries
// scale / softcap).
__device__ __forceinline__ void compute_qk(float (&s)[kAttnRowsPerWarp], const float* q_rows, const float* k_t,
                                           int valid, int D, int lane, float softcap) {
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) s[rr] = 0.f;
  if (lane < valid) {
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      const float k = k_t[d * kAttnKeys + lane];
#pragma unroll
      for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) s[rr] = fmaf(q_rows[rr * D + d], k, s[rr]);
    }
  }
  if (softcap > 0.f) {
    const float cap = softcap * kLog2e;
#pragma unroll
    for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) s[rr] = cap * tanhf(s[rr]);
  }
}

// Stage update_mdo_states: folds the tile's scores (invisible ones to -inf) into the running
// max m and denominator l, rescales the accumulator, and leaves the lane's probabilities in p.
template <int kCols>
__device__ __forceinline__ void update_mdo_states(RowState<kCols>& st, float (&p)[kAttnRowsPerWarp],
                                                  const float (&s)[kAttnRowsPerWarp],
                                                  const bool (&visible)[kAttnRowsPerWarp]) {
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    const float score = visible[rr] ? s[rr] : -INFINITY;
    const float m_new = fmaxf(st.m[rr], warp_max(score));
    // a row with nothing visible yet keeps m = -inf: shift by 0 so exp2 gives 0, not nan
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;
    p[rr] = exp2f(score - m_safe);
    const float alpha = exp2f(st.m[rr] - m_safe);
    st.l[rr] = st.l[rr] * alpha + warp_sum(p[rr]);
    st.m[rr] = m_new;
#pragma unroll
    for (int c = 0; c < kCols; ++c) st.acc[rr][c] *= alpha;
  }
}

// Stage compute_sfm_v: acc += P . V over the staged tile (lane j's probabilities broadcast).
template <int kCols>
__device__ __forceinline__ void compute_sfm_v(RowState<kCols>& st, const float (&p)[kAttnRowsPerWarp],
                                              const float* v_s, int valid, int D, int lane) {
  for (int j = 0; j < valid; ++j) {
    float pj[kAttnRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) pj[rr] = __shfl_sync(0xffffffffu, p[rr], j);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < D) {
        const float v = v_s[j * D + d];
#pragma unroll
        for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) st.acc[rr][c] = fmaf(pj[rr], v, st.acc[rr][c]);
      }
    }
  }
}

// One staged tile through the three stages.
template <int kCols>
__device__ __forceinline__ void attend_tile(RowState<kCols>& st, const float* q_rows, const float* k_t,
                                            const float* v_s, const bool (&visible)[kAttnRowsPerWarp], int valid,
                                            int D, int lane, float softcap) {
  float s[kAttnRowsPerWarp], prob[kAttnRowsPerWarp];
  compute_qk(s, q_rows, k_t, valid, D, lane, softcap);
  update_mdo_states(st, prob, s, visible);
  compute_sfm_v(st, prob, v_s, valid, D, lane);
}

// Prefix rows [lo, hi) of the cache: every existing row sees each one inside its window.
template <typename T, int kCols>
__device__ __forceinline__ void attend_prefix(RowState<kCols>& st, float* k_t, float* v_s, const float* q_rows,
                                              const AttentionParams& p, const CtaCoords& c, const WarpRows& w,
                                              int64_t lo, int64_t hi, int D, bool vec16) {
  const T* kc = static_cast<const T*>(p.k_cache) + c.b * p.k_cache_stride[0] + c.kvh * p.k_cache_stride[1];
  const T* vc = static_cast<const T*>(p.v_cache) + c.b * p.v_cache_stride[0] + c.kvh * p.v_cache_stride[1];
  for (int64_t j0 = lo; j0 < hi; j0 += kAttnKeys) {
    const int valid = static_cast<int>(hi - j0 < kAttnKeys ? hi - j0 : kAttnKeys);
    stage_kv_tile<T>(k_t, v_s, kc + j0 * p.k_cache_stride[2], p.k_cache_stride[2], vc + j0 * p.v_cache_stride[2],
                     p.v_cache_stride[2], valid, D, vec16);
    if (!w.any) continue;
    const int64_t key = j0 + c.lane - c.prefix;  // relative position
    bool visible[kAttnRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) visible[rr] = c.lane < valid && key >= w.first_key[rr];
    attend_tile(st, q_rows, k_t, v_s, visible, valid, D, c.lane, p.softcap);
  }
}

// Whether new key j is visible to the row of `node` (positions only used with a window).
template <int kMask>
__device__ __forceinline__ bool new_key_allowed(const AttentionParams& p, const CtaCoords& c, int node, int j,
                                                int j0) {
  if constexpr (kMask == kCausal) {
    return j <= node;
  } else if constexpr (kMask == kTree) {
    // j0 is a multiple of 32, so the tile's keys share word j0 / 64 of each row
    return (p.tree_mask[c.b * p.mask_stride[0] + node * p.mask_stride[1] + j0 / 64] >> (j % 64)) & 1;
  } else {
    return (j < c.n_real && (j <= node || node >= c.first_mask)) || (j >= c.first_mask && j <= node);
  }
}

// The N new keys, from k_new/v_new, under the op's mask (and the window). Causal and draft
// rows never see a key past their own node, so the CTA stops at its last node; tree rows
// follow their bits.
template <typename T, int kMask, int kCols>
__device__ __forceinline__ void attend_new_keys(RowState<kCols>& st, float* k_t, float* v_s, const float* q_rows,
                                                const AttentionParams& p, const CtaCoords& c, const WarpRows& w,
                                                int D, bool vec16) {
  int key_end = c.n_rows;
  if constexpr (kMask != kTree) {
    const int last_row = (c.m0 + kAttnRowsPerCta < c.m_total ? c.m0 + kAttnRowsPerCta : c.m_total) - 1;
    key_end = last_row / c.group + 1;
  }
  const T* kn = static_cast<const T*>(p.k_new) + c.b * p.k_new_stride[0] + c.kvh * p.k_new_stride[1];
  const T* vn = static_cast<const T*>(p.v_new) + c.b * p.v_new_stride[0] + c.kvh * p.v_new_stride[1];
  for (int j0 = 0; j0 < key_end; j0 += kAttnKeys) {
    const int valid = key_end - j0 < kAttnKeys ? key_end - j0 : kAttnKeys;
    stage_kv_tile<T>(k_t, v_s, kn + j0 * p.k_new_stride[2], p.k_new_stride[2], vn + j0 * p.v_new_stride[2],
                     p.v_new_stride[2], valid, D, vec16);
    if (!w.any) continue;
    const int j = j0 + c.lane;
    const int key_pos = p.window > 0 && c.lane < valid ? node_position<kMask>(p, c, j) : 0;
    bool visible[kAttnRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
      const int node = (c.m0 + c.warp * kAttnRowsPerWarp + rr) / c.group;
      visible[rr] = w.first_key[rr] != kNoRow && c.lane < valid && key_pos >= w.first_key[rr] &&
                    new_key_allowed<kMask>(p, c, node, j, j0);
    }
    attend_tile(st, q_rows, k_t, v_s, visible, valid, D, c.lane, p.softcap);
  }
}

// Stage write_rows (one split): normalises the warp's rows into out, lse (natural log), with
// the head's sink logit joining the denominator. Rows that saw no key (draft padding) get
// out 0 and lse -inf.
template <typename T, int kCols>
__device__ __forceinline__ void write_rows(const RowState<kCols>& st, const AttentionParams& p, const CtaCoords& c,
                                           int D) {
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    const int r = c.m0 + c.warp * kAttnRowsPerWarp + rr;
    if (r >= c.m_total) continue;
    const int64_t head = c.kvh * c.group + r % c.group;
    const int node = r / c.group;
    const bool seen = st.l[rr] > 0.f;
    float m = st.m[rr], l = st.l[rr], acc_scale = 1.f;
    if (seen && p.sinks != nullptr) {
      const float sink = p.sinks[head] * kLog2e;
      const float m_all = fmaxf(m, sink);
      acc_scale = exp2f(m - m_all);
      l = l * acc_scale + exp2f(sink - m_all);
      m = m_all;
    }
    const float inv_l = seen ? acc_scale / l : 0.f;
    const float lse = seen ? (m + log2f(l)) * kLn2 : -INFINITY;
    T* out = static_cast<T*>(p.out) + c.b * p.out_stride[0] + head * p.out_stride[1] + node * p.out_stride[2];
#pragma unroll
    for (int col = 0; col < kCols; ++col) {
      const int d = c.lane + 32 * col;
      if (d < D) out[d] = from_float<T>(st.acc[rr][col] * inv_l);
    }
    if (c.lane == 0) p.lse[(c.b * p.q_heads + head) * c.n_rows + node] = lse;
  }
}

// Stage write_partials (several splits): the split's normalised out and lse, without the sink
// (merge_splits_kernel adds it once).
template <int kCols>
__device__ __forceinline__ void write_partials(const RowState<kCols>& st, const AttentionParams& p,
                                               const CtaCoords& c, int D) {
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    const int r = c.m0 + c.warp * kAttnRowsPerWarp + rr;
    if (r >= c.m_total) continue;
    const bool seen = st.l[rr] > 0.f;
    const float inv_l = seen ? 1.f / st.l[rr] : 0.f;
    const int64_t part = (c.bh * p.num_splits + c.split) * c.m_total + r;
#pragma unroll
    for (int col = 0; col < kCols; ++col) {
      const int d = c.lane + 32 * col;
      if (d < D) p.partial_out[part * D + d] = st.acc[rr][col] * inv_l;
    }
    if (c.lane == 0) p.partial_lse[part] = seen ? (st.m[rr] + log2f(st.l[rr])) * kLn2 : -INFINITY;
  }
}

inline size_t attention_smem_bytes(int D) {
  // q rows (scaled) + K tile (transposed) + V tile, all fp32
  return sizeof(float) * static_cast<size_t>(kAttnRowsPerCta * D + 2 * kAttnKeys * D);
}

// kHeadDim > 0: that head dim exactly; 0: any head dim up to kAttnMaxHeadDim (p.head_dim).
template <typename T, int kHeadDim, int kMask>
__global__ void __launch_bounds__(kAttnWarps * 32) attention_fwd_kernel(AttentionParams p, bool vec16) {
  constexpr int kMaxD = kHeadDim > 0 ? kHeadDim : kAttnMaxHeadDim;
  constexpr int kCols = (kMaxD + 31) / 32;
  const int D = kHeadDim > 0 ? kHeadDim : static_cast<int>(p.head_dim);
  extern __shared__ float smem[];
  float* q_s = smem;
  float* k_t = q_s + kAttnRowsPerCta * D;
  float* v_s = k_t + kAttnKeys * D;
  __shared__ int first_s[kAttnRowsPerCta];

  const CtaCoords c = cta_coords<kMask>(p);
  load_rows<T, kMask>(q_s, first_s, p, c, D);
  __syncthreads();
  const WarpRows w = warp_rows(c, first_s);
  const float* q_rows = q_s + c.warp * kAttnRowsPerWarp * D;
  RowState<kCols> st;
  init_state(st);

  // this split's run of the prefix rows the CTA sees; the last split takes the rest
  const int64_t first = window_start(c, first_s);
  const bool last_split = c.split == p.num_splits - 1;
  const int64_t lo = first + c.split * p.split_rows;
  const int64_t hi = last_split ? c.prefix : (c.prefix < lo + p.split_rows ? c.prefix : lo + p.split_rows);
  attend_prefix<T>(st, k_t, v_s, q_rows, p, c, w, lo, hi, D, vec16);
  if (last_split) attend_new_keys<T, kMask>(st, k_t, v_s, q_rows, p, c, w, D, vec16);

  if (p.num_splits > 1) {
    write_partials(st, p, c, D);
  } else {
    write_rows<T>(st, p, c, D);
  }
}

// Stage merge_splits: one warp per output row (b, query head, node) merges the splits'
// partials with log-sum-exp weights, the head's sink joining the denominator.
template <typename T>
__global__ void merge_splits_kernel(AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.q_heads * p.rows) return;
  const int64_t node = row % p.rows, bh = row / p.rows;
  const int64_t b = bh / p.q_heads, head = bh % p.q_heads;
  const int64_t group = p.q_heads / p.kv_heads, m_total = p.rows * group;
  const int64_t first = (b * p.kv_heads + head / group) * p.num_splits * m_total + node * group + head % group;
  float m = -INFINITY;
  for (int64_t s = 0; s < p.num_splits; ++s) m = fmaxf(m, p.partial_lse[first + s * m_total]);
  // every split empty (a draft padding row): weights 0, out 0, lse -inf, no sink
  const bool seen = m != -INFINITY;
  const float sink = seen && p.sinks != nullptr ? p.sinks[head] : -INFINITY;
  const float m_safe = seen ? fmaxf(m, sink) : 0.f;
  float total = seen ? __expf(sink - m_safe) : 0.f;
  for (int64_t s = 0; s < p.num_splits; ++s) total += __expf(p.partial_lse[first + s * m_total] - m_safe);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + head * p.out_stride[1] + node * p.out_stride[2];
  for (int64_t d = lane; d < p.head_dim; d += 32) {
    float o = 0.f;
    for (int64_t s = 0; s < p.num_splits; ++s) {
      const int64_t part = first + s * m_total;
      o += __expf(p.partial_lse[part] - m_safe) * p.partial_out[part * p.head_dim + d];
    }
    out[d] = from_float<T>(o * inv);
  }
  if (lane == 0) p.lse[row] = total > 0.f ? m_safe + __logf(total) : -INFINITY;
}

// Copies rows [0, n) of k_new/v_new (n = row_counts[b], or N without them) to cache rows
// cache_lens[b].. ; grid (B * Hkv * N, 2: K and V), threads over Vec-sized columns.
template <typename Vec>
__global__ void append_rows_kernel(AttentionParams p, const int64_t* row_counts, int64_t elem_bytes) {
  const int64_t row = blockIdx.x;
  const int64_t j = row % p.rows, bh = row / p.rows;
  const int64_t b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int64_t n = row_counts != nullptr ? row_counts[b] : p.rows;
  if (j >= n) return;
  const int64_t dst_row = clamp_prefix(p.cache_lens[b], p.capacity, n) + j;   // as the attention reads it
  const bool is_v = blockIdx.y == 1;
  const int64_t* ss = is_v ? p.v_new_stride : p.k_new_stride;
  const int64_t* ds = is_v ? p.v_cache_stride : p.k_cache_stride;
  const char* src = static_cast<const char*>(is_v ? p.v_new : p.k_new) + (b * ss[0] + h * ss[1] + j * ss[2]) * elem_bytes;
  char* dst = static_cast<char*>(is_v ? p.v_cache : p.k_cache) +
              (b * ds[0] + h * ds[1] + dst_row * ds[2]) * elem_bytes;
  const int64_t vecs = p.head_dim * elem_bytes / static_cast<int64_t>(sizeof(Vec));
  for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) {
    reinterpret_cast<Vec*>(dst)[c] = reinterpret_cast<const Vec*>(src)[c];
  }
}

// True when every K/V row (new and cached) starts on a `bytes` boundary and a row is a whole
// number of `bytes`.
inline bool kv_rows_aligned(const AttentionParams& p, int64_t bytes, int64_t elem_bytes) {
  const void* ptrs[] = {p.k_new, p.v_new, p.k_cache, p.v_cache};
  const int64_t* strides[] = {p.k_new_stride, p.v_new_stride, p.k_cache_stride, p.v_cache_stride};
  if ((p.head_dim * elem_bytes) % bytes != 0) return false;
  for (int t = 0; t < 4; ++t) {
    if (reinterpret_cast<uintptr_t>(ptrs[t]) % bytes != 0) return false;
    for (int k = 0; k < 3; ++k) {
      if ((strides[t][k] * elem_bytes) % bytes != 0) return false;
    }
  }
  return true;
}

template <typename Vec>
cudaError_t launch_append(const AttentionParams& p, const int64_t* row_counts, int64_t elem_bytes,
                          cudaStream_t stream) {
  const int64_t vecs = p.head_dim * elem_bytes / static_cast<int64_t>(sizeof(Vec));
  const unsigned threads = vecs >= 128 ? 128u : (vecs >= 64 ? 64u : 32u);
  append_rows_kernel<Vec><<<dim3(static_cast<unsigned>(p.batch * p.kv_heads * p.rows), 2), threads, 0, stream>>>(
      p, row_counts, elem_bytes);
  return cudaGetLastError();
}

template <typename T, int kHeadDim, int kMask>
cudaError_t launch_typed(const AttentionParams& p, cudaStream_t stream) {
  const int D = static_cast<int>(p.head_dim);
  const size_t smem = attention_smem_bytes(D);
  auto kernel = attention_fwd_kernel<T, kHeadDim, kMask>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const bool vec16 = kv_rows_aligned(p, 16, sizeof(T));
  const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads),
                  static_cast<unsigned>(attention_cta_tiles(p.rows, p.q_heads, p.kv_heads)),
                  static_cast<unsigned>(p.num_splits));
  kernel<<<grid, kAttnWarps * 32, smem, stream>>>(p, vec16);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = p.batch * p.q_heads * p.rows;
  constexpr int kMergeWarps = 4;
  merge_splits_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kMergeWarps)), kMergeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kMask>
cudaError_t launch_head_dim(const AttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_typed<T, 64, kMask>(p, stream);
    case 80: return launch_typed<T, 80, kMask>(p, stream);
    case 96: return launch_typed<T, 96, kMask>(p, stream);
    case 128: return launch_typed<T, 128, kMask>(p, stream);
    default: return launch_typed<T, 0, kMask>(p, stream);
  }
}

// Validates what the kernels assume, launches the cache append and the attention.
template <int kMask>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  if (p.head_dim < 1 || p.head_dim > kAttnMaxHeadDim || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0 ||
      p.num_splits < 1 || p.num_splits > 65535 || p.split_rows < 0 || p.window < 0 || !(p.softcap >= 0.f) ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) ||
      attention_cta_tiles(p.rows, p.q_heads, p.kv_heads) > 65535 ||
      (kMask == kDraft && (p.new_lens == nullptr || p.num_masks < 0 || p.num_masks > p.rows))) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.rows == 0 || p.q_heads == 0) return cudaSuccess;
  // tree nodes all go to the cache; of the draft rows only the new_lens[b] real ones
  const int64_t* row_counts = kMask == kDraft ? p.new_lens : nullptr;
  const int64_t elem = p.dtype == AttnDtype::kFloat32 ? 4 : 2;
  cudaError_t err;
  if (kv_rows_aligned(p, 16, elem)) err = launch_append<uint4>(p, row_counts, elem, stream);
  else if (kv_rows_aligned(p, 4, elem)) err = launch_append<uint32_t>(p, row_counts, elem, stream);
  else err = launch_append<uint16_t>(p, row_counts, elem, stream);
  if (err != cudaSuccess) return err;
  switch (p.dtype) {
    case AttnDtype::kFloat32: return launch_head_dim<float, kMask>(p, stream);
    case AttnDtype::kFloat16: return launch_head_dim<__half, kMask>(p, stream);
    case AttnDtype::kBFloat16: return launch_head_dim<__nv_bfloat16, kMask>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace attn
}  // namespace ps_kernels::cuda
#endif  // __CUDACC__
