// Shared part of the tree_attention / draft_attention torch bindings: tensor checks, the
// AttentionParams they describe, split planning with its scratch buffers, and the launch.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "attention.cuh"

namespace ps_kernels::cuda::binding {

inline void check_rank4(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), op, ": ", name, ": expected a CUDA tensor on ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, ": expected a rank-4 tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, ": expected dtype ", q.scalar_type(), " (q's), got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) == q.size(3) && (t.stride(3) == 1 || t.size(3) == 1), op, ": ", name,
              ": expected a contiguous head dim of size ", q.size(3), ", got shape ", t.sizes(), " strides ",
              t.strides());
}

inline void copy_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int k = 0; k < 3; ++k) dst[k] = t.stride(k);
}

// Checks the tensors every attention op shares and describes them. `index` tensors that the
// caller converted (cache_lens) must outlive the launch.
inline AttentionParams attention_params(const char* op, const at::Tensor& q, const at::Tensor& k_new,
                                        const at::Tensor& v_new, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& cache_lens, double scale,
                                        const at::Tensor& out, const at::Tensor& lse) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": q: expected float32/float16/bfloat16, got ", dtype);
  check_rank4(op, "q", q, q);
  check_rank4(op, "k_new", k_new, q);
  check_rank4(op, "v_new", v_new, q);
  check_rank4(op, "k_cache", k_cache, q);
  check_rank4(op, "v_cache", v_cache, q);
  check_rank4(op, "out", out, q);
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3), Hkv = k_new.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": k_new: expected a KV head count dividing Hq = ", Hq, ", got ", Hkv);
  TORCH_CHECK(k_new.sizes() == v_new.sizes() && k_new.size(0) == B && k_new.size(2) == N, op,
              ": k_new/v_new: expected shape [", B, ", Hkv, ", N, ", ", D, "], got ", k_new.sizes(), " and ",
              v_new.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(1) == Hkv, op,
              ": k_cache/v_cache: expected shape [", B, ", ", Hkv, ", S, ", D, "], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out: expected q's shape ", q.sizes(), ", got ", out.sizes());
  // Cache room, checked on the host with what the host knows without a device sync (the lengths
  // live on the GPU): the rows of one call fit the cache at all. The kernels clamp each
  // sequence's prefix to capacity - rows (attention.cuh, clamp_prefix), so an invalid
  // cache_lens never reads or writes outside the cache, validate=False or not.
  TORCH_CHECK(N <= k_cache.size(2), op, ": cache_lens: expected room for the ", N, " new rows in a cache of S = ",
              k_cache.size(2), " rows (k_cache.shape[2]), got N = ", N, " > S");
  TORCH_CHECK(D <= kAttnMaxHeadDim, op, ": q: expected a head dim of at most ", kAttnMaxHeadDim, ", got ", D);
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == N,
              op, ": lse: expected a contiguous float32 CUDA tensor [", B, ", ", Hq, ", ", N, "], got ", lse.sizes(),
              " ", lse.scalar_type());
  TORCH_CHECK(cache_lens.is_cuda() && cache_lens.device() == q.device() && cache_lens.scalar_type() == at::kLong &&
                  cache_lens.is_contiguous() && cache_lens.dim() == 1 && cache_lens.size(0) == B,
              op, ": cache_lens: expected a contiguous int64 CUDA tensor [", B, "], got ", cache_lens.sizes(), " ",
              cache_lens.scalar_type());
  AttentionParams p{};
  p.dtype = dtype == at::kFloat ? AttnDtype::kFloat32 : (dtype == at::kHalf ? AttnDtype::kFloat16 : AttnDtype::kBFloat16);
  p.q = q.data_ptr();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cache_lens = cache_lens.data_ptr<int64_t>();
  p.batch = B;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.rows = N;
  p.head_dim = D;
  p.capacity = k_cache.size(2);
  p.scale = static_cast<float>(scale);
  copy_strides(p.q_stride, q);
  copy_strides(p.k_new_stride, k_new);
  copy_strides(p.v_new_stride, v_new);
  copy_strides(p.k_cache_stride, k_cache);
  copy_strides(p.v_cache_stride, v_cache);
  copy_strides(p.out_stride, out);
  return p;
}

// Plans the splits, allocates their fp32 partials (freed after the launch: the caching
// allocator reuses them only for work queued after it on this stream), launches. The caller
// holds a CUDAGuard for q's device.
inline void run_attention(const char* op, AttentionParams p, const at::Tensor& q,
                          cudaError_t (*launch)(const AttentionParams&, cudaStream_t)) {
  const int64_t partial_rows = plan_attention_splits(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor partial_out, partial_lse;
  if (partial_rows > 0) {
    partial_out = at::empty({partial_rows, p.head_dim}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({partial_rows}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace ps_kernels::cuda::binding
