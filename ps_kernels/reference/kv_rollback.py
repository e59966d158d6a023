import torch


def kv_rollback(kv_cache: torch.Tensor, cache_lens: torch.Tensor, accept_index: torch.Tensor,
                accept_lens: torch.Tensor) -> None:
    """Compact the accepted tree rows of every layer's K and V, in place.

    kv_cache:     [L, 2, B, H, S, D]  all layers' K (index 0) and V (index 1)
    cache_lens:   [B] int64           committed rows per sequence; grows by accept_lens
    accept_index: [B, A]              accepted tree rows, relative to cache_lens, increasing
    accept_lens:  [B]                 how many entries of accept_index are used (0..A)

    For each b and i < accept_lens[b]: row cache_lens[b] + accept_index[b, i] moves to row
    cache_lens[b] + i. Rows past the new length are left as they were (they are garbage).
    """
    for b in range(kv_cache.shape[2]):
        n = int(accept_lens[b])
        if n == 0:
            continue
        base = int(cache_lens[b])
        src = base + accept_index[b, :n].to(torch.long)
        rows = kv_cache[:, :, b].index_select(3, src.to(kv_cache.device))  # gathered copy first
        kv_cache[:, :, b, :, base:base + n] = rows
    cache_lens += accept_lens.to(cache_lens.dtype)
