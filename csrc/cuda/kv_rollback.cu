#include "kv_rollback.cuh"

namespace ps_kernels::cuda {

__global__ void kv_rollback_advance_lens_kernel(int64_t* cache_lens, const int64_t* accept_lens, int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) cache_lens[b] += accept_lens[b];
}

template <typename Vec>
static cudaError_t launch_moves(const KvRollbackParams& p, cudaStream_t stream) {
  const int64_t threads = p.slabs * (p.row_bytes / static_cast<int64_t>(sizeof(Vec)));
  if (threads == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  kv_rollback_kernel<Vec><<<static_cast<unsigned>(ceil_div(threads, kBlock)), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_kv_rollback(const KvRollbackParams& p, int64_t* cache_lens_mut, cudaStream_t stream) {
  const auto addr = reinterpret_cast<uintptr_t>(p.cache);
  cudaError_t err;
  if (p.row_bytes % 16 == 0 && addr % 16 == 0) err = launch_moves<uint4>(p, stream);
  else if (p.row_bytes % 8 == 0 && addr % 8 == 0) err = launch_moves<uint2>(p, stream);
  else if (p.row_bytes % 4 == 0 && addr % 4 == 0) err = launch_moves<uint32_t>(p, stream);
  else err = launch_moves<uint16_t>(p, stream);
  if (err != cudaSuccess) return err;
  if (p.batch > 0) {
    kv_rollback_advance_lens_kernel<<<static_cast<unsigned>(ceil_div(p.batch, 128)), 128, 0, stream>>>(
        cache_lens_mut, p.accept_lens, p.batch);
  }
  return cudaGetLastError();
}

}  // namespace ps_kernels::cuda
