// Torch binding of the CUDA kv_rollback kernel (built only with a CUDA toolkit and CUDA torch).
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../common/kv_rollback_binding.h"
#include "kv_rollback.cuh"

namespace {

void kv_rollback_cuda(at::Tensor kv_cache, at::Tensor cache_lens, const at::Tensor& accept_index,
                      const at::Tensor& accept_lens) {
  TORCH_CHECK(kv_cache.is_cuda(), "kv_cache: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const auto idx = accept_index.to(at::kLong).contiguous();
  const auto lens = accept_lens.to(at::kLong).contiguous();
  const auto p = ps_kernels::make_kv_rollback_params(kv_cache, cache_lens, idx, lens);
  // cache room on the host with the lengths it knows (no device sync): the accepted rows fit the
  // cache; the kernel stops at the cache's bounds for values it reads on the device
  TORCH_CHECK(idx.size(1) <= kv_cache.size(4), "kv_rollback: accept_index: expected at most S = ", kv_cache.size(4),
              " columns (the cache capacity), got ", idx.size(1));
  const cudaError_t err = ps_kernels::cuda::launch_kv_rollback(p, cache_lens.data_ptr<int64_t>(),
                                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "kv_rollback CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) { m.impl("kv_rollback", &kv_rollback_cuda); }
