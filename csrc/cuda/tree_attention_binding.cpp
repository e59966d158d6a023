// Torch binding of the CUDA tree_attention kernel (built only with a CUDA toolkit and CUDA
// torch). Schema of tree_attention: csrc/cpu/tree_attention.cpp; tree_attention_planned (the
// same call run with a plan made once per step, attention_binding.h) is CUDA-only, defined here.
#include <torch/library.h>

#include "attention_binding.h"

namespace {

using namespace ps_kernels::cuda;

AttentionParams tree_params(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                            const std::optional<at::Tensor>& tree_mask, double scale, int64_t window, double softcap,
                            const std::optional<at::Tensor>& sinks, const at::Tensor& out, const at::Tensor& lse) {
  AttentionParams p = binding::attention_params("tree_attention", q, k_new, v_new, k_cache, v_cache, cache_lens,
                                                scale, window, softcap, sinks, out, lse);
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    const int64_t N = q.size(2), W = (N + 63) / 64;
    // [N, W] is shared by the batch; [B, N, W] may be an expanded view (batch stride 0)
    TORCH_CHECK(m.is_cuda() && m.device() == q.device() && m.scalar_type() == at::kLong &&
                    (m.dim() == 2 || (m.dim() == 3 && m.size(0) == q.size(0))) && m.size(-2) == N &&
                    m.size(-1) == W && m.stride(-1) == 1,
                "tree_attention: tree_mask: expected int64 CUDA words [B, ", N, ", ", W, "] or [", N, ", ", W,
                "] with a contiguous last dim, got ", m.sizes(), " ", m.scalar_type(), " strides ", m.strides());
    p.tree_mask = m.data_ptr<int64_t>();
    p.mask_stride[0] = m.dim() == 3 ? m.stride(0) : 0;
    p.mask_stride[1] = m.stride(-2);
  }
  return p;
}

void tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k_cache,
                         at::Tensor v_cache, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                         double scale, int64_t window, double softcap, const std::optional<at::Tensor>& sinks,
                         at::Tensor out, at::Tensor lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionParams p =
      tree_params(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window, softcap, sinks, out, lse);
  binding::plan_and_run_attention("tree_attention", p, q, &launch_tree_attention);
}

void tree_attention_planned_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& cache_lens,
                                 const std::optional<at::Tensor>& tree_mask, double scale, int64_t window,
                                 double softcap, const std::optional<at::Tensor>& sinks, at::Tensor out,
                                 at::Tensor lse, int64_t num_splits, int64_t split_rows, at::Tensor workspace) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionParams p =
      tree_params(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window, softcap, sinks, out, lse);
  binding::run_planned_attention("tree_attention", p, q, num_splits, split_rows, workspace, &launch_tree_attention);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("tree_attention_planned(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor? tree_mask, float scale, int window, float softcap, Tensor? sinks, "
        "Tensor(c!) out, Tensor(d!) lse, int num_splits, int split_rows, Tensor(e!) workspace) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) {
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("tree_attention_planned", &tree_attention_planned_cuda);
}
