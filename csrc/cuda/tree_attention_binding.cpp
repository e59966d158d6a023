// Torch binding of the CUDA tree_attention kernel (built only with a CUDA toolkit and CUDA
// torch). Schema: csrc/cpu/tree_attention.cpp.
#include <torch/library.h>

#include "attention_binding.h"

namespace {

void tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k_cache,
                         at::Tensor v_cache, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                         double scale, at::Tensor out, at::Tensor lse) {
  using namespace ps_kernels::cuda;
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionParams p = binding::attention_params("tree_attention", q, k_new, v_new, k_cache, v_cache, cache_lens,
                                                scale, out, lse);
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
  binding::run_attention("tree_attention", p, q, &launch_tree_attention);
}

}  // namespace

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }
