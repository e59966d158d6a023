// Torch binding and schema of draft_attention (the CPU kernel is attention/driver.h; the CUDA one
// registers its impl for the same schema in csrc/cuda/draft_attention_binding.cpp).
#include <torch/library.h>

#include "attention_binding.h"

namespace {

namespace attn = ps_kernels::cpu::attention_binding;

void draft_attention_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k_cache,
                         at::Tensor v_cache, const at::Tensor& cache_lens, const at::Tensor& new_lens,
                         int64_t num_masks, double scale, int64_t window, double softcap,
                         const std::optional<at::Tensor>& sinks, at::Tensor out, at::Tensor lse) {
  attn::check_contract(q, k_new, v_new, k_cache, v_cache, cache_lens, out, lse);
  const int64_t T = q.size(2);
  TORCH_CHECK(num_masks >= 0 && num_masks <= T, "num_masks: expected 0..", T, ", got ", num_masks);
  TORCH_CHECK(new_lens.scalar_type() == at::kLong && new_lens.is_contiguous() && new_lens.numel() == q.size(0),
              "new_lens: expected contiguous int64 [", q.size(0), "], got ", new_lens.scalar_type(), " ",
              new_lens.sizes());
  const int64_t R = T - num_masks;
  const int64_t* lens = new_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= R, "new_lens: expected values in [0, ", R, "], got new_lens[", b, "] = ",
                lens[b]);
  }
  attn::check_rows_fit(cache_lens, k_cache.size(2), [lens](int64_t b) { return lens[b]; }, "new_lens[b]");
  auto args = attn::make_args(q, k_new, v_new, k_cache, v_cache, cache_lens, scale, window, softcap, sinks, out, lse);
  args.new_lens = lens;  // real rows 0..r-1 then the mask slots R..T-1: causal over that order
  args.num_masks = num_masks;
  attn::run_items(args);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("draft_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor new_lens, int num_masks, float scale, int window, float softcap, Tensor? sinks, "
        "Tensor(c!) out, Tensor(d!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CPU, m) { m.impl("draft_attention", &draft_attention_cpu); }
