// What the torch bindings of tree_attention and draft_attention share: the raw-pointer
// contract checks (inputs are validated in Python, ps_kernels/ops/_attention.py; these guard
// memory safety), the raw arguments, and the parallel loop over work items, each range run by
// the active capability level's kernel (attention/driver.h, compiled per level; dispatch.h).
#pragma once
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "dispatch.h"

namespace ps_kernels::cpu::attention_binding {

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

// The optional features: window >= 0 (0 = none), softcap finite >= 0 (0 = off), sinks None or
// a contiguous float32 CPU tensor [Hq].
inline void check_features(const at::Tensor& q, int64_t window, double softcap, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(window >= 0, "window: expected >= 0 (0 = no window), got ", window);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap: expected a finite value >= 0 (0 = off), got ", softcap);
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->device().is_cpu() && sinks->scalar_type() == at::kFloat && sinks->is_contiguous() &&
                    sinks->dim() == 1 && sinks->size(0) == q.size(1),
                "sinks: expected a contiguous float32 CPU tensor [", q.size(1), "] (one per query head), got ",
                sinks->scalar_type(), " ", sinks->sizes(), " on ", sinks->device());
  }
}

// The raw-pointer arguments of one call; the caller sets the pattern (tree_words / new_lens).
inline AttentionArgs make_args(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                               at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_lens, double scale,
                               int64_t window, double softcap, const std::optional<at::Tensor>& sinks,
                               at::Tensor& out, at::Tensor& lse) {
  check_features(q, window, softcap, sinks);
  DType dtype = DType::kFloat;
  switch (q.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat; break;
    case at::kHalf: dtype = DType::kHalf; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "q: expected float32/float16/bfloat16, got ", q.scalar_type());
  }
  return AttentionArgs{q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                       cache_lens.data_ptr<int64_t>(), out.data_ptr(), lse.data_ptr<float>(),
                       q.size(0), q.size(1), k_new.size(1), q.size(2), q.size(3), k_cache.size(2),
                       static_cast<float>(scale), dtype, nullptr, 0, nullptr, 0,
                       window, static_cast<float>(softcap), sinks.has_value() ? sinks->data_ptr<float>() : nullptr};
}

// Query rows per score tile of the kernels (attention/common.h's kRowTile): no chunk is thinner.
constexpr int64_t kRowTile = 8;

// How many chunks to cut each (b, g) group's query rows into: enough items to keep every
// thread busy (2 per thread), never chunks thinner than one score tile.
inline int64_t query_chunks(int64_t groups, int64_t rows_per_group, int threads) {
  if (groups <= 0) return 1;
  const int64_t want = (2 * int64_t(threads) + groups - 1) / groups;
  return std::max<int64_t>(1, std::min<int64_t>(want, rows_per_group / kRowTile));
}

// Below this many multiply-adds in a call, waking the thread pool costs more than it saves
// (a decode step of a small model: ~75k per head); the call then runs on the calling thread.
constexpr double kInlineMacs = 5e5;

inline double total_macs(const AttentionArgs& p) {
  double keys = 0;  // a window reads at most about `window` prefix rows
  for (int64_t b = 0; b < p.batch; ++b)
    keys += double((p.window > 0 ? std::min(p.cache_lens[b], p.window) : p.cache_lens[b]) + p.rows);
  return 2.0 * keys * double(p.q_heads * p.rows * p.head_dim);  // QK^T and PV
}

// Runs every (b, g, chunk) work item on ATen's thread pool, with the active level's kernel.
inline void run_items(const AttentionArgs& p) {
  const LevelKernels& kernels = active_kernels();
  const int64_t groups = p.batch * p.kv_heads;
  const bool inline_call = total_macs(p) < kInlineMacs;
  const int64_t chunks = inline_call ? 1 : query_chunks(groups, p.rows * (p.q_heads / p.kv_heads), at::get_num_threads());
  const int64_t grain = inline_call ? std::max<int64_t>(1, groups) : 1;  // grain >= range: the calling thread
  at::parallel_for(0, groups * chunks, grain, [&](int64_t begin, int64_t end) {
    kernels.attention(p, chunks, begin, end);
  });
}

}  // namespace ps_kernels::cpu::attention_binding
