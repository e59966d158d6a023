// Flash-decoding core shared by the tree_attention and draft_attention CUDA kernels.
// Framework-free: raw pointers, element strides, sizes and a stream. The part above the
// __CUDACC__ guard (parameters, split planning, launcher declarations) is plain host C++ so
// the torch bindings, compiled by the host compiler, can include it.
//
// Both ops attend the N new query rows of each sequence to its committed cache prefix plus
// the N new keys, under a mask over the new keys that the kernel computes:
//   kCausal  key j visible to row i iff j <= i                         (tree_mask = nullptr)
//   kTree    bit j % 64 of word j / 64 of tree_mask[b, i]               (packed int64 words)
//   kDraft   real row t < new_lens[b]: real keys 0..t; mask slot t >= R = N - num_masks:
//            all real keys and slots R..t; padding rows see nothing (out 0, lse -inf)
// Every valid row sees the whole prefix. New keys are read from k_new/v_new, never from the
// cache rows this call writes, so the attention and the cache append don't race.
//
// Work layout: one CTA per (sequence, KV head, tile of kRowsPerCta rows, split). The M rows
// of a (sequence, KV head) are its query heads x N nodes, row r = node * group + head-in-group
// (GQA: each K/V tile is loaded once for every query head that shares it). A warp owns
// kRowsPerWarp rows; a key tile of 32 rows is staged in shared memory as fp32 (K transposed,
// V row-major), lane j scores key j for the warp's rows, and for P.V lane l accumulates head
// columns l, l + 32, ... Online softmax in fp32 with exp2 (log2(e) folded into q's scale).
// Split-KV: split s streams prefix rows [s * split_rows, (s + 1) * split_rows); the last split
// also takes the new keys. With several splits each CTA writes fp32 partials (normalised out,
// lse) and a combine kernel merges them with log-sum-exp weights.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

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
  // element strides of dims 0..2 (dim 3, the head dim, must be contiguous)
  int64_t q_stride[3], k_new_stride[3], v_new_stride[3], k_cache_stride[3], v_cache_stride[3], out_stride[3];
  int64_t mask_stride[2];     // tree_mask strides of dims 0..1 (0 for a broadcast batch)
  // split-KV, filled by plan_attention_splits; partials needed only when num_splits > 1
  int64_t num_splits = 1, split_rows = 0;
  float* partial_out = nullptr;  // [partial_rows, D]
  float* partial_lse = nullptr;  // [partial_rows]
};

constexpr int kAttnRowsPerWarp = 4;
constexpr int kAttnWarps = 4;
constexpr int kAttnRowsPerCta = kAttnRowsPerWarp * kAttnWarps;
constexpr int kAttnKeys = 32;       // key rows per shared-memory tile (one per lane)
constexpr int kAttnMaxHeadDim = 256;
// A split should stream at least this many prefix rows, or the combine costs more than
// the extra parallelism gains.
constexpr int64_t kAttnMinSplitRows = 256;

inline int64_t attention_cta_tiles(const AttentionParams& p) {
  return ceil_div(p.rows * (p.q_heads / p.kv_heads), kAttnRowsPerCta);
}

// Picks p.num_splits / p.split_rows from the grid size, the SM count and the capacity S (not
// cache_lens, which would need a host sync: splits past a sequence's prefix end at once).
// Returns the number of partial rows to allocate (0 when one split writes out/lse directly).
inline int64_t plan_attention_splits(AttentionParams& p, int num_sms) {
  const int64_t ctas = p.batch * p.kv_heads * attention_cta_tiles(p);
  int64_t splits = ctas > 0 ? ceil_div(2 * static_cast<int64_t>(num_sms), ctas) : 1;
  const int64_t most = p.capacity / kAttnMinSplitRows;
  splits = splits < most ? splits : most;
  p.num_splits = splits > 1 ? splits : 1;
  p.split_rows = ceil_div(ceil_div(p.capacity > 0 ? p.capacity : 1, p.num_splits), kAttnKeys) * kAttnKeys;
  return p.num_splits > 1 ? p.batch * p.q_heads * p.rows * p.num_splits : 0;
}

// Launchers (tree_attention.cu, draft_attention.cu): the attention kernel, the combine pass
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

// Stages `valid` rows (of kAttnKeys) of a [rows, D] source into fp32 shared memory, K
// transposed (dst[d * kAttnKeys + row]) or V row-major (dst[row * D + d]). Consecutive threads
// take consecutive rows for K and consecutive columns for V, so neither store conflicts.
// `vec16`: the source rows start 16-byte aligned and D fills whole 16-byte vectors.
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

// Per-warp online-softmax state for kAttnRowsPerWarp rows; lane l holds columns l + 32 c.
template <int kCols>
struct RowState {
  float m[kAttnRowsPerWarp], l[kAttnRowsPerWarp], acc[kAttnRowsPerWarp][kCols];
};

// Scores one staged key tile for the warp's rows and folds it into the state.
// visible[rr]: lane's key visible to row rr (already includes key validity).
template <int kCols>
__device__ __forceinline__ void attend_tile(RowState<kCols>& st, const float* q_rows, const float* k_t,
                                            const float* v_s, const bool (&visible)[kAttnRowsPerWarp], int valid,
                                            int D, int lane) {
  float s[kAttnRowsPerWarp];
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
  float p[kAttnRowsPerWarp];
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

inline size_t attention_smem_bytes(int D) {
  // q rows (scaled) + K tile (transposed) + V tile, all fp32
  return sizeof(float) * static_cast<size_t>(kAttnRowsPerCta * D + 2 * kAttnKeys * D);
}

// cache_lens[b] brought into [0, capacity - rows]: the rows written and read stay in the cache
// whatever cache_lens holds (valid lengths are unchanged).
__device__ __forceinline__ int64_t clamp_prefix(int64_t len, int64_t capacity, int64_t rows) {
  const int64_t most = capacity - rows;
  return len < 0 ? 0 : (len > most ? (most < 0 ? 0 : most) : len);
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

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.kv_heads, kvh = bh % p.kv_heads;
  const int split = blockIdx.z;
  const int n_rows = static_cast<int>(p.rows);
  const int group = static_cast<int>(p.q_heads / p.kv_heads);
  const int m_total = n_rows * group;
  const int m0 = blockIdx.y * kAttnRowsPerCta;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // cache room is checked on the host only for what the host knows (rows <= capacity, the
  // bindings); a prefix past capacity - rows (an invalid cache_lens, read here without a host
  // sync) is clamped: never a read or write outside the cache, the result unspecified
  const int n_real = kMask == kDraft ? static_cast<int>(p.new_lens[b]) : 0;
  const int64_t prefix = clamp_prefix(p.cache_lens[b], p.capacity, kMask == kDraft ? n_real : p.rows);
  const int first_mask = n_rows - static_cast<int>(p.num_masks);

  auto row_ok = [&](int r) {
    if (r >= m_total) return false;
    if constexpr (kMask == kDraft) {
      const int node = r / group;
      return node < n_real || node >= first_mask;
    }
    return true;
  };

  const float qk_scale = p.scale * 1.4426950408889634f;
  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < kAttnRowsPerCta * D; idx += blockDim.x) {
    const int r = m0 + idx / D, d = idx % D;
    float x = 0.f;
    if (row_ok(r)) {
      const int64_t head = kvh * group + r % group;
      x = to_float(q[b * p.q_stride[0] + head * p.q_stride[1] + (r / group) * p.q_stride[2] + d]) * qk_scale;
    }
    q_s[idx] = x;
  }

  RowState<kCols> st;
  bool warp_rows[kAttnRowsPerWarp];
  bool any_row = false;
#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    st.m[rr] = -INFINITY;
    st.l[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) st.acc[rr][c] = 0.f;
    warp_rows[rr] = row_ok(m0 + warp * kAttnRowsPerWarp + rr);
    any_row |= warp_rows[rr];
  }
  const float* q_rows = q_s + warp * kAttnRowsPerWarp * D;

  // committed prefix, from the cache
  const T* kc = static_cast<const T*>(p.k_cache) + b * p.k_cache_stride[0] + kvh * p.k_cache_stride[1];
  const T* vc = static_cast<const T*>(p.v_cache) + b * p.v_cache_stride[0] + kvh * p.v_cache_stride[1];
  const int64_t lo = split * p.split_rows;
  const int64_t hi = prefix < lo + p.split_rows ? prefix : lo + p.split_rows;
  for (int64_t j0 = lo; j0 < hi; j0 += kAttnKeys) {
    const int valid = static_cast<int>(hi - j0 < kAttnKeys ? hi - j0 : kAttnKeys);
    __syncthreads();  // the previous tile is consumed
    stage_tile<T, true>(k_t, kc + j0 * p.k_cache_stride[2], p.k_cache_stride[2], valid, D, vec16);
    stage_tile<T, false>(v_s, vc + j0 * p.v_cache_stride[2], p.v_cache_stride[2], valid, D, vec16);
    __syncthreads();
    if (any_row) {
      bool visible[kAttnRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) visible[rr] = warp_rows[rr] && lane < valid;
      attend_tile(st, q_rows, k_t, v_s, visible, valid, D, lane);
    }
  }

  if (split == p.num_splits - 1) {
    // new keys, from k_new/v_new. Causal and draft rows never see a key past their own node,
    // so the CTA stops at its last node; tree rows follow their bits.
    int key_end = n_rows;
    if constexpr (kMask != kTree) {
      const int last_row = (m0 + kAttnRowsPerCta < m_total ? m0 + kAttnRowsPerCta : m_total) - 1;
      key_end = last_row / group + 1;
    }
    const T* kn = static_cast<const T*>(p.k_new) + b * p.k_new_stride[0] + kvh * p.k_new_stride[1];
    const T* vn = static_cast<const T*>(p.v_new) + b * p.v_new_stride[0] + kvh * p.v_new_stride[1];
    for (int j0 = 0; j0 < key_end; j0 += kAttnKeys) {
      const int valid = key_end - j0 < kAttnKeys ? key_end - j0 : kAttnKeys;
      __syncthreads();
      stage_tile<T, true>(k_t, kn + j0 * p.k_new_stride[2], p.k_new_stride[2], valid, D, vec16);
      stage_tile<T, false>(v_s, vn + j0 * p.v_new_stride[2], p.v_new_stride[2], valid, D, vec16);
      __syncthreads();
      if (any_row) {
        const int j = j0 + lane;
        bool visible[kAttnRowsPerWarp];
#pragma unroll
        for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
          const int node = (m0 + warp * kAttnRowsPerWarp + rr) / group;
          bool allowed;
          if constexpr (kMask == kCausal) {
            allowed = j <= node;
          } else if constexpr (kMask == kTree) {
            // j0 is a multiple of 32, so the tile's keys share word j0 / 64 of each row
            allowed = warp_rows[rr] &&
                      ((p.tree_mask[b * p.mask_stride[0] + node * p.mask_stride[1] + j0 / 64] >> (j % 64)) & 1);
          } else {
            allowed = (j < n_real && (j <= node || node >= first_mask)) || (j >= first_mask && j <= node);
          }
          visible[rr] = warp_rows[rr] && lane < valid && allowed;
        }
        attend_tile(st, q_rows, k_t, v_s, visible, valid, D, lane);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kAttnRowsPerWarp; ++rr) {
    const int r = m0 + warp * kAttnRowsPerWarp + rr;
    if (r >= m_total) continue;
    // rows that saw no key (draft padding) get out 0 and lse -inf
    const bool seen = st.l[rr] > 0.f;
    const float inv_l = seen ? 1.f / st.l[rr] : 0.f;
    const float lse = seen ? (st.m[rr] + log2f(st.l[rr])) * 0.6931471805599453f : -INFINITY;
    const int64_t head = kvh * group + r % group;
    const int node = r / group;
    if (p.num_splits > 1) {
      const int64_t part = (bh * p.num_splits + split) * m_total + r;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < D) p.partial_out[part * D + d] = st.acc[rr][c] * inv_l;
      }
      if (lane == 0) p.partial_lse[part] = lse;
    } else {
      T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + head * p.out_stride[1] + node * p.out_stride[2];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < D) out[d] = from_float<T>(st.acc[rr][c] * inv_l);
      }
      if (lane == 0) p.lse[(b * p.q_heads + head) * n_rows + node] = lse;
    }
  }
}

// One warp per output row (b, query head, node): merges the splits' partials.
template <typename T>
__global__ void attention_combine_kernel(AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.q_heads * p.rows) return;
  const int64_t node = row % p.rows, bh = row / p.rows;
  const int64_t b = bh / p.q_heads, head = bh % p.q_heads;
  const int64_t group = p.q_heads / p.kv_heads, m_total = p.rows * group;
  const int64_t first = (b * p.kv_heads + head / group) * p.num_splits * m_total + node * group + head % group;
  float m = -INFINITY;
  for (int64_t s = 0; s < p.num_splits; ++s) m = fmaxf(m, p.partial_lse[first + s * m_total]);
  // every split empty (a draft padding row): weights 0, out 0, lse -inf
  const float m_safe = m == -INFINITY ? 0.f : m;
  float total = 0.f;
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
  if (lane == 0) p.lse[row] = total > 0.f ? m + __logf(total) : -INFINITY;
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
  const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads), static_cast<unsigned>(attention_cta_tiles(p)),
                  static_cast<unsigned>(p.num_splits));
  kernel<<<grid, kAttnWarps * 32, smem, stream>>>(p, vec16);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = p.batch * p.q_heads * p.rows;
  constexpr int kCombineWarps = 4;
  attention_combine_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kCombineWarps)), kCombineWarps * 32, 0,
                                stream>>>(p);
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
      p.num_splits < 1 || p.num_splits > 65535 || p.num_splits * p.split_rows < p.capacity ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) ||
      attention_cta_tiles(p) > 65535 || (kMask == kDraft && (p.new_lens == nullptr || p.num_masks < 0 ||
                                                             p.num_masks > p.rows))) {
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
