// kv_rollback, CUDA kernel: framework-free (raw pointers, sizes, a stream). The torch
// binding is kv_rollback_binding.cpp. Layout: cache[L, 2, B, H, S, D] contiguous.
#pragma once
#include "../common/kv_rollback_params.h"
#include "common.cuh"

namespace ps_kernels::cuda {

using ps_kernels::KvRollbackParams;  // ../common/kv_rollback_params.h

#if defined(__CUDACC__)  // kernel bodies: nvcc only; the torch binding (host C++) sees declarations
// One thread owns one vector-sized column of one (plane, b, h) slab and walks the accepted
// rows in increasing order. accept_index is strictly increasing, so src >= dst and a column's
// forward walk never overwrites a row it still has to read; no two threads share a column,
// so there is no race between overlapping source and destination rows.
template <typename Vec>
__global__ void kv_rollback_kernel(KvRollbackParams p) {
  const int64_t vecs = p.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.slabs * vecs) return;
  const int64_t slab = g / vecs, col = g % vecs;
  const int64_t b = (slab / p.heads) % p.batch;
  // values are read on the device (no host sync): out-of-range ones stop the move at the cache's
  // and accept_index's bounds instead of writing outside them
  const int64_t n = p.accept_lens[b] < p.accept_stride ? p.accept_lens[b] : p.accept_stride;
  if (n <= 0) return;
  const int64_t base = p.cache_lens[b];
  if (base < 0 || base + n > p.seq) return;
  Vec* rows = reinterpret_cast<Vec*>(static_cast<char*>(p.cache) + slab * p.seq * p.row_bytes);
  const int64_t* idx = p.accept_index + b * p.accept_stride;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t src = base + idx[i], dst = base + i;
    if (src < 0 || src >= p.seq) break;
    if (src != dst) rows[dst * vecs + col] = rows[src * vecs + col];
  }
}

// Runs after the move kernel (stream order): every move block has read cache_lens first.
__global__ void kv_rollback_advance_lens_kernel(int64_t* cache_lens, const int64_t* accept_lens, int64_t batch);
#endif

// Host launcher: picks the widest vector that divides a row, launches the move and the
// length update on `stream`. Returns the first CUDA error (cudaSuccess when fine).
cudaError_t launch_kv_rollback(const KvRollbackParams& p, int64_t* cache_lens_mut, cudaStream_t stream);

}  // namespace ps_kernels::cuda
