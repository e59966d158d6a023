// What the torch bindings of tree_attention and draft_attention share: the raw-pointer
// contract checks (inputs are validated in Python, ps_kernels/ops/_attention.py; these guard
// memory safety), the dtype dispatch, and the parallel loop over work items.
#pragma once
#include <ATen/Parallel.h>
#include <torch/types.h>

#include "attention.h"

namespace ps_kernels::cpu::attention {

inline void check_contract(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                           const at::Tensor& out, const at::Tensor& lse) {
  const std::pair<const char*, const at::Tensor*> tensors[] = {{"q", &q}, {"k_new", &k_new}, {"v_new", &v_new},
                                                              {"k_cache", &k_cache}, {"v_cache", &v_cache},
                                                              {"out", &out}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->is_contiguous() && t->scalar_type() == q.scalar_type(),
                name, ": expected a contiguous 4-d CPU tensor of q's dtype ", q.scalar_type(), ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  const int64_t B = q.size(0), Hq = q.size(1), rows = q.size(2), D = q.size(3), Hkv = k_new.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "k_new: expected a number of KV heads dividing ", Hq, ", got ", Hkv);
  TORCH_CHECK(k_new.sizes() == at::IntArrayRef({B, Hkv, rows, D}) && v_new.sizes() == k_new.sizes(),
              "k_new, v_new: expected [", B, ", ", Hkv, ", ", rows, ", ", D, "], got ", k_new.sizes(), " and ",
              v_new.sizes());
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(1) == Hkv && k_cache.size(3) == D &&
                  v_cache.sizes() == k_cache.sizes(),
              "k_cache, v_cache: expected [", B, ", ", Hkv, ", S, ", D, "], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == at::IntArrayRef({B, Hq, rows}),
              "lse: expected contiguous float32 [", B, ", ", Hq, ", ", rows, "], got ", lse.scalar_type(), " ",
              lse.sizes());
  TORCH_CHECK(cache_lens.scalar_type() == at::kLong && cache_lens.is_contiguous() && cache_lens.numel() == B,
              "cache_lens: expected contiguous int64 [", B, "], got ", cache_lens.scalar_type(), " ", cache_lens.sizes());
}

// Memory safety of the rows the kernel writes and reads: 0 <= cache_lens[b] and
// cache_lens[b] + rows(b) <= S for every sequence (the lengths live on the CPU: no sync to pay).
template <typename RowsFn>
inline void check_rows_fit(const at::Tensor& cache_lens, int64_t S, const RowsFn& rows, const char* rows_what) {
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < cache_lens.numel(); ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] + rows(b) <= S, "cache_lens: expected 0 <= cache_lens[b] and cache_lens[b] + ",
                rows_what, " <= ", S, " (the cache capacity S), got cache_lens[", b, "] = ", lens[b], " with ",
                rows(b), " rows");
  }
}

// Calls fn(Problem<T>) with T = float / Half / BFloat16 per q's dtype.
template <typename Fn>
void with_problem(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                  at::Tensor& v_cache, const at::Tensor& cache_lens, double scale, at::Tensor& out, at::Tensor& lse,
                  const Fn& fn) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Problem<T> p{static_cast<const T*>(q.data_ptr()),
                 static_cast<const T*>(k_new.data_ptr()),
                 static_cast<const T*>(v_new.data_ptr()),
                 static_cast<T*>(k_cache.data_ptr()),
                 static_cast<T*>(v_cache.data_ptr()),
                 cache_lens.data_ptr<int64_t>(),
                 static_cast<T*>(out.data_ptr()),
                 lse.data_ptr<float>(),
                 q.size(0), q.size(1), k_new.size(1), q.size(2), q.size(3), k_cache.size(2),
                 static_cast<float>(scale)};
    fn(p);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(Half{}); break;
    case at::kBFloat16: run(BFloat16{}); break;
    default: TORCH_CHECK(false, "q: expected float32/float16/bfloat16, got ", q.scalar_type());
  }
}

// Runs every (b, g, chunk) work item of `p` on ATen's thread pool.
template <typename T, typename SeqRowsFn, typename Policy>
void run_items(const Problem<T>& p, const SeqRowsFn& seq_rows, const Policy& policy) {
  const int64_t groups = p.batch * p.kv_heads;
  const bool inline_call = total_macs(p) < kInlineMacs;
  const int64_t chunks = inline_call ? 1 : query_chunks(groups, p.rows * (p.q_heads / p.kv_heads), at::get_num_threads());
  const int64_t grain = inline_call ? std::max<int64_t>(1, groups) : 1;  // grain >= range: the calling thread
  at::parallel_for(0, groups * chunks, grain, [&](int64_t begin, int64_t end) {
    attention_items(p, seq_rows, policy, chunks, begin, end);
  });
}

}  // namespace ps_kernels::cpu::attention
