// Torch binding of the CUDA draft_attention kernel (built only with a CUDA toolkit and CUDA
// torch). Schema of draft_attention: csrc/cpu/draft_attention.cpp; draft_attention_planned (the
// same call run with a plan made once per step, attention_binding.h) is CUDA-only, defined here.
#include <torch/library.h>

#include "attention_binding.h"

namespace {

using namespace ps_kernels::cuda;

// new_lens as contiguous int64 (`lens` keeps a converted copy alive until after the launch).
AttentionParams draft_params(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                             const at::Tensor& new_lens, int64_t num_masks, double scale, int64_t window,
                             double softcap, const std::optional<at::Tensor>& sinks, const at::Tensor& out,
                             const at::Tensor& lse, at::Tensor& lens) {
  AttentionParams p = binding::attention_params("draft_attention", q, k_new, v_new, k_cache, v_cache, cache_lens,
                                                scale, window, softcap, sinks, out, lse);
  TORCH_CHECK(new_lens.is_cuda() && new_lens.device() == q.device() && new_lens.dim() == 1 &&
                  new_lens.size(0) == q.size(0),
              "draft_attention: new_lens: expected a CUDA tensor [", q.size(0), "], got ", new_lens.sizes(), " on ",
              new_lens.device());
  TORCH_CHECK(num_masks >= 0 && num_masks <= q.size(2), "draft_attention: num_masks: expected 0..", q.size(2),
              " (rows of q), got ", num_masks);
  lens = new_lens.to(at::kLong).contiguous();
  p.new_lens = lens.data_ptr<int64_t>();
  p.num_masks = num_masks;
  return p;
}

void draft_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k_cache,
                          at::Tensor v_cache, const at::Tensor& cache_lens, const at::Tensor& new_lens,
                          int64_t num_masks, double scale, int64_t window, double softcap,
                          const std::optional<at::Tensor>& sinks, at::Tensor out, at::Tensor lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor lens;
  const AttentionParams p = draft_params(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale,
                                         window, softcap, sinks, out, lse, lens);
  binding::plan_and_run_attention("draft_attention", p, q, &launch_draft_attention);
}

void draft_attention_planned_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                  at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& cache_lens,
                                  const at::Tensor& new_lens, int64_t num_masks, double scale, int64_t window,
                                  double softcap, const std::optional<at::Tensor>& sinks, at::Tensor out,
                                  at::Tensor lse, int64_t num_splits, int64_t split_rows, at::Tensor workspace) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor lens;
  const AttentionParams p = draft_params(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale,
                                         window, softcap, sinks, out, lse, lens);
  binding::run_planned_attention("draft_attention", p, q, num_splits, split_rows, workspace,
                                 &launch_draft_attention);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("draft_attention_planned(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor new_lens, int num_masks, float scale, int window, float softcap, Tensor? sinks, "
        "Tensor(c!) out, Tensor(d!) lse, int num_splits, int split_rows, Tensor(e!) workspace) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) {
  m.impl("draft_attention", &draft_attention_cuda);
  m.impl("draft_attention_planned", &draft_attention_planned_cuda);
}
