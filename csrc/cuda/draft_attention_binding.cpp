// Torch binding of the CUDA draft_attention kernel (built only with a CUDA toolkit and CUDA
// torch). Schema: csrc/cpu/draft_attention.cpp.
#include <torch/library.h>

#include "attention_binding.h"

namespace {

void draft_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k_cache,
                          at::Tensor v_cache, const at::Tensor& cache_lens, const at::Tensor& new_lens,
                          int64_t num_masks, double scale, at::Tensor out, at::Tensor lse) {
  using namespace ps_kernels::cuda;
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionParams p = binding::attention_params("draft_attention", q, k_new, v_new, k_cache, v_cache, cache_lens,
                                                scale, out, lse);
  TORCH_CHECK(new_lens.is_cuda() && new_lens.device() == q.device() && new_lens.dim() == 1 &&
                  new_lens.size(0) == q.size(0),
              "draft_attention: new_lens: expected a CUDA tensor [", q.size(0), "], got ", new_lens.sizes(), " on ",
              new_lens.device());
  TORCH_CHECK(num_masks >= 0 && num_masks <= q.size(2), "draft_attention: num_masks: expected 0..", q.size(2),
              " (rows of q), got ", num_masks);
  const at::Tensor lens = new_lens.to(at::kLong).contiguous();  // alive until after the launch
  p.new_lens = lens.data_ptr<int64_t>();
  p.num_masks = num_masks;
  binding::run_attention("draft_attention", p, q, &launch_draft_attention);
}

}  // namespace

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) { m.impl("draft_attention", &draft_attention_cuda); }
