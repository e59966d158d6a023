// The CUDA attention kernels' split plan (FlashInfer's plan()): plain host C++ with no CUDA or
// torch header, so the kernels (attention.cuh), their torch bindings and the CPU build (which
// registers ps_kernels_C::attention_split_plan for ps_kernels/ops/attention_plan.py, made once
// per decoding step for all layers) share one planner.
#pragma once
#include <cstdint>

namespace ps_kernels::cuda {

constexpr int kAttnRowsPerWarp = 4;
constexpr int kAttnWarps = 4;
constexpr int kAttnRowsPerCta = kAttnRowsPerWarp * kAttnWarps;
constexpr int kAttnKeys = 32;       // key rows per shared-memory tile (one per lane)
constexpr int kAttnMaxHeadDim = 256;
// A split should stream at least this many prefix rows, or the combine costs more than
// the extra parallelism gains.
constexpr int64_t kAttnMinSplitRows = 256;

inline int64_t plan_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t attention_cta_tiles(int64_t rows, int64_t q_heads, int64_t kv_heads) {
  return plan_ceil_div(rows * (q_heads / kv_heads), kAttnRowsPerCta);
}

// The most prefix rows one CTA reads: the longest prefix (max_prefix; the capacity when the
// caller knows no better), or with a sliding window the window - 1 rows behind the CTA's
// earliest row.
inline int64_t attention_prefix_span(int64_t max_prefix, int64_t window) {
  return window > 0 && window - 1 < max_prefix ? window - 1 : max_prefix;
}

// plan(): how a step's attention calls split the prefix. The same for every layer of a step
// (they share the shapes), so the caller may make it once and pass it to each layer's run.
struct AttentionSplitPlan {
  int64_t num_splits = 1, split_rows = 0;
  int64_t partial_rows = 0;  // rows of fp32 partials needed (0 when one split writes out/lse)
  // fp32 scratch the partials take: partial_out [partial_rows, D] then partial_lse [partial_rows]
  int64_t workspace_floats(int64_t head_dim) const { return partial_rows * (head_dim + 1); }
};

// Splits the prefix when (batch x KV heads x row tiles) leaves the SMs idle, keeping at least
// kAttnMinSplitRows rows per split. `span` is attention_prefix_span (no cache_lens: reading
// them would need a host sync; splits past a sequence's prefix end at once).
inline AttentionSplitPlan plan_attention_splits(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t rows,
                                                int64_t span, int num_sms) {
  AttentionSplitPlan plan;
  const int64_t ctas = batch * kv_heads * attention_cta_tiles(rows, q_heads, kv_heads);
  int64_t splits = ctas > 0 ? plan_ceil_div(2 * static_cast<int64_t>(num_sms), ctas) : 1;
  const int64_t most = span / kAttnMinSplitRows;
  splits = splits < most ? splits : most;
  plan.num_splits = splits > 1 ? splits : 1;
  plan.split_rows = plan_ceil_div(plan_ceil_div(span > 0 ? span : 1, plan.num_splits), kAttnKeys) * kAttnKeys;
  plan.partial_rows = plan.num_splits > 1 ? batch * q_heads * rows * plan.num_splits : 0;
  return plan;
}

}  // namespace ps_kernels::cuda
