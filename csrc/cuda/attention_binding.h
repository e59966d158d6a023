// Shared part of the tree_attention / draft_attention torch bindings: tensor checks, the
// AttentionParams they describe, and FlashInfer-style plan() / run():
//   plan  the split plan (AttentionSplitPlan, attention_plan.h) for a step's shapes on a device,
//         with the SM count looked up once per device; the ps_kernels_C::attention_split_plan op
//         (registered in every build, csrc/cpu/attention_plan.cpp) returns it to Python
//         (ps_kernels/ops/attention_plan.py), which keeps one fp32 workspace per step
//   run   the launch with a plan and a workspace: the *_planned ops, called once per layer
// The ops without a plan argument plan inside the call and allocate their scratch there.
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers), so
// the bindings compile against a CPU torch's headers plus the CUDA runtime headers.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cmath>
#include <optional>

#include "attention.cuh"

namespace ps_kernels::cuda::binding {

using LaunchFn = cudaError_t (*)(const AttentionParams&, cudaStream_t);

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

// window (0 = none), softcap (0 = none) and sinks (fp32 [Hq] or none), as the schema passes them.
inline void set_features(const char* op, AttentionParams& p, const at::Tensor& q, int64_t window, double softcap,
                         const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(window >= 0, op, ": window: expected 0 (no window) or a positive number of positions, got ", window);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              ": softcap: expected 0 (no soft-cap) or a positive finite float, got ", softcap);
  // positions stay below the capacity S, so a window of S or more hides nothing
  p.window = window < p.capacity ? window : 0;
  p.softcap = static_cast<float>(softcap);
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    TORCH_CHECK(s.is_cuda() && s.device() == q.device() && s.scalar_type() == at::kFloat && s.dim() == 1 &&
                    s.size(0) == q.size(1) && s.is_contiguous(),
                op, ": sinks: expected a contiguous float32 CUDA tensor [", q.size(1), "] (one logit per query head) on ",
                q.device(), ", got ", s.sizes(), " ", s.scalar_type(), " on ", s.device());
    p.sinks = s.data_ptr<float>();
  }
}

// Checks the tensors every attention op shares and describes them. `index` tensors that the
// caller converted (cache_lens) must outlive the launch.
inline AttentionParams attention_params(const char* op, const at::Tensor& q, const at::Tensor& k_new,
                                        const at::Tensor& v_new, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& cache_lens, double scale,
                                        int64_t window, double softcap, const std::optional<at::Tensor>& sinks,
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
  set_features(op, p, q, window, softcap, sinks);
  return p;
}

// The SM count of a CUDA device, asked of the driver once per device.
inline int device_sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "attention: CUDA device index ", device, " out of range");
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    TORCH_CHECK(err == cudaSuccess, "attention: cannot read the SM count of cuda:", device, ": ",
                cudaGetErrorString(err));
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// run(): points the params at the plan's partials in `workspace` (fp32, at least
// plan.workspace_floats(D) elements when split) and launches on the current stream. The
// caller holds a CUDAGuard for q's device.
inline void run_attention(const char* op, AttentionParams p, const AttentionSplitPlan& plan, float* workspace,
                          LaunchFn launch) {
  p.num_splits = plan.num_splits;
  p.split_rows = plan.split_rows;
  if (plan.num_splits > 1) {
    p.partial_out = workspace;
    p.partial_lse = workspace + plan.partial_rows * p.head_dim;
  }
  const cudaError_t err = launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

// plan() and run() in one call (no plan given): the split plan of these shapes over the whole
// capacity, partials allocated here (freed after the launch: the caching allocator reuses them
// only for work queued after it on this stream).
inline void plan_and_run_attention(const char* op, const AttentionParams& p, const at::Tensor& q, LaunchFn launch) {
  const AttentionSplitPlan plan =
      plan_attention_splits(p.batch, p.q_heads, p.kv_heads, p.rows, attention_prefix_span(p.capacity, p.window),
                            device_sm_count(q.get_device()));
  at::Tensor workspace;
  if (plan.num_splits > 1) workspace = at::empty({plan.workspace_floats(p.head_dim)}, q.options().dtype(at::kFloat));
  run_attention(op, p, plan, plan.num_splits > 1 ? workspace.data_ptr<float>() : nullptr, launch);
}

// run() with a plan made earlier (ps_kernels.attention_plan): checks that the plan fits these
// shapes and its workspace holds the partials, then launches.
inline void run_planned_attention(const char* op, const AttentionParams& p, const at::Tensor& q, int64_t num_splits,
                                  int64_t split_rows, const at::Tensor& workspace, LaunchFn launch) {
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65535, op, ": num_splits: expected 1..65535, got ", num_splits);
  TORCH_CHECK(split_rows >= 0, op, ": split_rows: expected a non-negative row count, got ", split_rows);
  AttentionSplitPlan plan;
  plan.num_splits = num_splits;
  plan.split_rows = split_rows;
  plan.partial_rows = num_splits > 1 ? p.batch * p.q_heads * p.rows * num_splits : 0;
  const int64_t need = plan.workspace_floats(p.head_dim);
  TORCH_CHECK(workspace.is_cuda() && workspace.device() == q.device() && workspace.scalar_type() == at::kFloat &&
                  workspace.is_contiguous() && workspace.numel() >= need,
              op, ": workspace: expected a contiguous float32 CUDA tensor on ", q.device(), " of at least ", need,
              " elements (", num_splits, " splits of these shapes; a plan made for other shapes?), got ",
              workspace.numel(), " ", workspace.scalar_type(), " on ", workspace.device());
  run_attention(op, p, plan, need > 0 ? workspace.data_ptr<float>() : nullptr, launch);
}

}  // namespace ps_kernels::cuda::binding
