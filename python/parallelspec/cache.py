"""The target's static KV cache: one preallocated tensor in the layout every ps_kernels op uses.

    kv[L, 2, B, H_kv, S, D]   K of layer l = kv[l, 0], V = kv[l, 1]
    lens[B] int64             committed rows per sequence (sequences start at row 0)

Rows past ``lens[b]`` are scratch: a verification pass writes its tree there and
``commit`` (ps_kernels.kv_rollback) keeps the accepted path, so "rolling back" the rejected
branches costs nothing but not advancing ``lens``.
"""
from __future__ import annotations

import torch

import ps_kernels


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_capacity: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity: expected at least 1 row, got {capacity}")
        if max_capacity is not None and capacity > max_capacity:
            raise ValueError(f"capacity: {capacity} rows exceed max_capacity = {max_capacity}")
        self.max_capacity = max_capacity
        self.kv = torch.zeros(num_layers, 2, batch_size, num_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.lens = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.reallocations = 0   # reserve() growths (the decoding loop's test checks it stays 0)
        self._layers = self._views()

    def _views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv[i, 0], self.kv[i, 1]) for i in range(self.kv.shape[0])]  # once, not per layer call

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of one layer, each [B, H_kv, S, D]."""
        return self._layers[index]

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows per sequence: grow to exactly that (reallocate, copy the rows
        in use) when needed, or fail clearly past max_capacity. The decoding loop sizes the cache
        once for a whole generation (prompt + new tokens + the largest tree its builder may
        emit), so this is a no-op there unless a builder cannot tell its largest tree."""
        if rows <= self.capacity:
            return
        if self.max_capacity is not None and rows > self.max_capacity:
            raise ValueError(f"KV cache: {rows} rows per sequence are needed but the cache is limited to "
                             f"{self.max_capacity} rows (max_capacity)")
        self.reallocations += 1
        kv = self.kv.new_zeros(*self.kv.shape[:4], rows, self.kv.shape[5])
        kv[..., :self.capacity, :] = self.kv
        self.kv = kv
        self._layers = self._views()

    def commit(self, accept_index: torch.Tensor, accept_lens: torch.Tensor) -> None:
        """Keep each sequence's accepted tree rows (path order, relative to lens) right after its
        prefix, in every layer, and advance lens by accept_lens (0 leaves a sequence as it is)."""
        # indices come from tree_accept: the value checks' host sync would be pure cost
        ps_kernels.kv_rollback(self.kv, self.lens, accept_index, accept_lens, validate=False)
