// kv_rollback, CPU kernel: framework-free (raw pointers, sizes). The torch binding is in
// kv_rollback.cpp. Layout: cache[L, 2, B, H, S, D] contiguous; see ps_kernels/ops/kv_rollback.py.
#pragma once
#include <cstdint>
#include <cstring>

#include "../common/kv_rollback_params.h"

namespace ps_kernels::cpu {

// Work item w in [0, slabs) is one (plane, b, h) slab of S rows. Rows move in increasing i;
// since accept_index is strictly increasing, src >= dst, so a forward walk never overwrites a
// row that a later i still reads (the memmove argument).
inline void kv_rollback_items(const KvRollbackParams& a, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; ++w) {
    const int64_t b = (w / a.heads) % a.batch;
    const int64_t n = a.accept_lens[b];
    if (n <= 0) continue;
    const int64_t base = a.cache_lens[b];
    char* slab = static_cast<char*>(a.cache) + w * a.seq * a.row_bytes;
    const int64_t* idx = a.accept_index + b * a.accept_stride;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t src = base + idx[i], dst = base + i;
      if (src != dst) std::memcpy(slab + dst * a.row_bytes, slab + src * a.row_bytes, a.row_bytes);
    }
  }
}

inline void kv_rollback_advance_lens(int64_t* cache_lens, const int64_t* accept_lens, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) cache_lens[b] += accept_lens[b];
}

}  // namespace ps_kernels::cpu
