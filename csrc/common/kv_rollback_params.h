// kv_rollback's arguments as raw pointers and sizes, shared by the CPU and CUDA kernels
// (framework-free: no torch, no CUDA). Layout: cache[L, 2, B, H, S, D] contiguous.
#pragma once
#include <cstdint>

namespace ps_kernels {

struct KvRollbackParams {
  void* cache;                  // base of [L, 2, B, H, S, D]
  int64_t slabs;                // L * 2 * B * H: one slab = the S rows of one (plane, b, h)
  int64_t batch, heads, seq;
  int64_t row_bytes;            // D * itemsize
  const int64_t* cache_lens;    // [B]
  const int64_t* accept_index;  // [B, A] int64
  int64_t accept_stride;        // A
  const int64_t* accept_lens;   // [B] int64
};

}  // namespace ps_kernels
