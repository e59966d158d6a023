// Torch binding of the CPU kv_rollback kernel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/kv_rollback_binding.h"
#include "kv_rollback.h"

namespace {

void kv_rollback_cpu(at::Tensor kv_cache, at::Tensor cache_lens, const at::Tensor& accept_index,
                     const at::Tensor& accept_lens) {
  const auto idx = accept_index.to(at::kLong).contiguous();
  const auto lens = accept_lens.to(at::kLong).contiguous();
  const auto p = ps_kernels::make_kv_rollback_params(kv_cache, cache_lens, idx, lens);
  // A slab moves at most A rows: keep >= ~256 KiB per task so small rollbacks stay on one
  // thread (waking a thread pool costs more than copying a few KiB).
  const int64_t per_item = std::max<int64_t>(1, p.accept_stride * p.row_bytes);
  const int64_t grain = std::max<int64_t>(16, (int64_t{256} << 10) / per_item);
  at::parallel_for(0, p.slabs, grain, [&](int64_t begin, int64_t end) { ps_kernels::cpu::kv_rollback_items(p, begin, end); });
  ps_kernels::cpu::kv_rollback_advance_lens(cache_lens.data_ptr<int64_t>(), p.accept_lens, p.batch);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("kv_rollback(Tensor(a!) kv_cache, Tensor(b!) cache_lens, Tensor accept_index, Tensor accept_lens) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CPU, m) { m.impl("kv_rollback", &kv_rollback_cpu); }
