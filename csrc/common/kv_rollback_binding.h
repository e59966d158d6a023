// Torch side of kv_rollback shared by the CPU and CUDA bindings: the contract checks and the
// raw-pointer parameters. Inputs are validated in Python (ps_kernels/ops/kv_rollback.py); these
// checks guard the raw-pointer contract.
#pragma once
#include <torch/types.h>

#include "kv_rollback_params.h"

namespace ps_kernels {

// idx64 / lens64 must outlive the returned params (int64 contiguous copies of the inputs).
inline KvRollbackParams make_kv_rollback_params(const at::Tensor& kv_cache, const at::Tensor& cache_lens,
                                                const at::Tensor& idx64, const at::Tensor& lens64) {
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(),
              "kv_cache: expected a contiguous [L, 2, B, H, S, D] tensor, got ", kv_cache.sizes());
  TORCH_CHECK(cache_lens.scalar_type() == at::kLong && cache_lens.is_contiguous(), "cache_lens: expected contiguous int64");
  const int64_t B = kv_cache.size(2);
  TORCH_CHECK(cache_lens.numel() == B && lens64.numel() == B && idx64.size(0) == B,
              "cache_lens, accept_index, accept_lens: expected batch ", B);
  return KvRollbackParams{kv_cache.data_ptr(),
                          kv_cache.size(0) * 2 * B * kv_cache.size(3),
                          B,
                          kv_cache.size(3),
                          kv_cache.size(4),
                          kv_cache.size(5) * static_cast<int64_t>(kv_cache.element_size()),
                          cache_lens.data_ptr<int64_t>(),
                          idx64.data_ptr<int64_t>(),
                          idx64.size(1),
                          lens64.data_ptr<int64_t>()};
}

}  // namespace ps_kernels
