// Torch binding of the CUDA kv_rollback kernel (built only with a CUDA toolkit and CUDA torch).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kv_rollback.cuh"

namespace {

void kv_rollback_cuda(at::Tensor kv_cache, at::Tensor cache_lens, const at::Tensor& accept_index,
                      const at::Tensor& accept_lens) {
  TORCH_CHECK(kv_cache.is_cuda() && kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(),
              "kv_cache: expected a contiguous CUDA tensor [L, 2, B, H, S, D], got ", kv_cache.sizes());
  TORCH_CHECK(cache_lens.scalar_type() == at::kLong && cache_lens.is_contiguous(), "cache_lens: expected contiguous int64");
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const auto idx = accept_index.to(at::kLong).contiguous();
  const auto lens = accept_lens.to(at::kLong).contiguous();
  ps_kernels::cuda::KvRollbackParams p{kv_cache.data_ptr(),
                                       kv_cache.size(0) * 2 * kv_cache.size(2) * kv_cache.size(3),
                                       kv_cache.size(2),
                                       kv_cache.size(3),
                                       kv_cache.size(4),
                                       kv_cache.size(5) * static_cast<int64_t>(kv_cache.element_size()),
                                       cache_lens.data_ptr<int64_t>(),
                                       idx.data_ptr<int64_t>(),
                                       idx.size(1),
                                       lens.data_ptr<int64_t>()};
  const cudaError_t err = ps_kernels::cuda::launch_kv_rollback(p, cache_lens.data_ptr<int64_t>(),
                                                               at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "kv_rollback CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) { m.impl("kv_rollback", &kv_rollback_cuda); }
