// ps_kernels_C::attention_split_plan: the CUDA attention kernels' plan() for Python
// (ps_kernels/ops/attention_plan.py), a host-only function of the shapes
// (csrc/cuda/attention_plan.h, no CUDA header), registered in every build: the Python plan and
// the kernels split the same way, and a CPU build can check the Python mirror against it.
#include <torch/library.h>

#include <vector>

#include "cuda/attention_plan.h"

namespace {

// -> [num_splits, split_rows, workspace_floats]: max_prefix bounds the prefix lengths (the
// capacity when unknown), window 0 = none, num_sms the device's SM count.
std::vector<int64_t> attention_split_plan(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t rows,
                                          int64_t head_dim, int64_t max_prefix, int64_t window, int64_t num_sms) {
  TORCH_CHECK(batch >= 0 && q_heads >= 0 && kv_heads > 0 && q_heads % kv_heads == 0 && rows >= 0 && head_dim > 0 &&
                  max_prefix >= 0 && window >= 0 && num_sms > 0,
              "attention_split_plan: expected batch, rows, max_prefix, window >= 0, kv_heads > 0 dividing q_heads, "
              "head_dim, num_sms > 0; got batch=", batch, " q_heads=", q_heads, " kv_heads=", kv_heads, " rows=", rows,
              " head_dim=", head_dim, " max_prefix=", max_prefix, " window=", window, " num_sms=", num_sms);
  using namespace ps_kernels::cuda;
  const AttentionSplitPlan plan = plan_attention_splits(batch, q_heads, kv_heads, rows,
                                                        attention_prefix_span(max_prefix, window),
                                                        static_cast<int>(num_sms));
  return {plan.num_splits, plan.split_rows, plan.workspace_floats(head_dim)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("attention_split_plan(int batch, int q_heads, int kv_heads, int rows, int head_dim, int max_prefix, "
        "int window, int num_sms) -> int[]",
        &attention_split_plan);
}
