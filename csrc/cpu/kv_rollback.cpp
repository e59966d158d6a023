// Torch binding of the CPU kv_rollback kernel. Inputs are validated in Python
// (ps_kernels/ops/kv_rollback.py); the checks here guard the raw-pointer contract.
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>
#include <torch/types.h>

#include "kv_rollback.h"

namespace {

void kv_rollback_cpu(at::Tensor kv_cache, at::Tensor cache_lens, const at::Tensor& accept_index,
                     const at::Tensor& accept_lens) {
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2, "kv_cache: expected [L, 2, B, H, S, D], got ",
              kv_cache.sizes());
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache: expected a contiguous tensor");
  TORCH_CHECK(cache_lens.scalar_type() == at::kLong && cache_lens.is_contiguous(),
              "cache_lens: expected contiguous int64");
  const auto idx = accept_index.to(at::kLong).contiguous();
  const auto lens = accept_lens.to(at::kLong).contiguous();
  const int64_t B = kv_cache.size(2), H = kv_cache.size(3);
  TORCH_CHECK(cache_lens.numel() == B && lens.numel() == B && idx.size(0) == B,
              "cache_lens, accept_index, accept_lens: expected batch ", B);
  ps_kernels::cpu::KvRollbackArgs a{static_cast<char*>(kv_cache.data_ptr()),
                                    kv_cache.size(0) * 2,
                                    B,
                                    H,
                                    kv_cache.size(4),
                                    kv_cache.size(5) * static_cast<int64_t>(kv_cache.element_size()),
                                    cache_lens.data_ptr<int64_t>(),
                                    idx.data_ptr<int64_t>(),
                                    idx.size(1),
                                    lens.data_ptr<int64_t>()};
  const int64_t items = a.planes * B * H;
  // A slab moves at most A rows: keep >= ~256 KiB per task so small rollbacks stay on one
  // thread (waking a thread pool costs more than copying a few KiB).
  const int64_t per_item = std::max<int64_t>(1, idx.size(1) * a.row_bytes);
  const int64_t grain = std::max<int64_t>(16, (int64_t{256} << 10) / per_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { ps_kernels::cpu::kv_rollback_items(a, begin, end); });
  ps_kernels::cpu::kv_rollback_advance_lens(cache_lens.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), B);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("kv_rollback(Tensor(a!) kv_cache, Tensor(b!) cache_lens, Tensor accept_index, Tensor accept_lens) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CPU, m) { m.impl("kv_rollback", &kv_rollback_cpu); }
