// Torch binding and schema of tree_attention (the CPU kernel is attention/driver.h; the CUDA one
// registers its impl for the same schema in csrc/cuda/tree_attention_binding.cpp).
#include <torch/library.h>

#include "attention_binding.h"

namespace {

namespace attn = ps_kernels::cpu::attention_binding;

// tree_mask: None (causal) or contiguous int64 [B, N, ceil(N / 64)] (a shared [N, W] mask is
// expanded by the Python op).
void tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor k_cache,
                        at::Tensor v_cache, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                        double scale, int64_t window, double softcap, const std::optional<at::Tensor>& sinks,
                        at::Tensor out, at::Tensor lse) {
  attn::check_contract(q, k_new, v_new, k_cache, v_cache, cache_lens, out, lse);
  const int64_t B = q.size(0), N = q.size(2), W = (N + 63) / 64;
  attn::check_rows_fit(cache_lens, k_cache.size(2), [N](int64_t) { return N; }, "N (tree nodes)");
  if (tree_mask.has_value()) {
    TORCH_CHECK(tree_mask->scalar_type() == at::kLong && tree_mask->is_contiguous() &&
                    tree_mask->sizes() == at::IntArrayRef({B, N, W}),
                "tree_mask: expected contiguous int64 [", B, ", ", N, ", ", W, "], got ", tree_mask->scalar_type(),
                " ", tree_mask->sizes());
  }
  auto args = attn::make_args(q, k_new, v_new, k_cache, v_cache, cache_lens, scale, window, softcap, sinks, out, lse);
  if (tree_mask.has_value()) {
    args.tree_words = tree_mask->data_ptr<int64_t>();
    args.words_per_row = W;
  }
  attn::run_items(args);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("tree_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor? tree_mask, float scale, int window, float softcap, Tensor? sinks, "
        "Tensor(c!) out, Tensor(d!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }
