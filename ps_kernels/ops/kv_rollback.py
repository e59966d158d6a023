"""kv_rollback: KV-cache compaction after tree verification, all layers in one call.

Cache layout (shared by every op and the decoding loop)::

    kv_cache[L, 2, B, H_kv, S_max, D]   one tensor for the whole model, contiguous

K is ``kv_cache[l, 0]``, V is ``kv_cache[l, 1]``; each is ``[B, H_kv, S_max, D]`` with the
rows of one (sequence, head) contiguous, so a row is ``D * itemsize`` bytes (16-byte
aligned for the usual head dims in fp16/bf16/fp32). One tensor makes "all layers in one
launch" a single grid over (L * 2 * B * H_kv) and lets a layer's K or V be a plain view.
"""
from __future__ import annotations

import torch

from .. import _backend, _checks
from .. import reference as _ref

OP = "kv_rollback"


@torch.library.custom_op("ps_kernels::kv_rollback", mutates_args=("kv_cache", "cache_lens"))
def _kv_rollback_op(kv_cache: torch.Tensor, cache_lens: torch.Tensor, accept_index: torch.Tensor,
                    accept_lens: torch.Tensor, backend: str) -> None:
    if backend == "reference":
        _ref.kv_rollback(kv_cache, cache_lens, accept_index, accept_lens)
    elif backend in ("cpu", "cuda"):
        torch.ops.ps_kernels_C.kv_rollback(kv_cache, cache_lens, accept_index, accept_lens)
    elif backend == "triton":
        from ..triton_kernels.kv_rollback import kv_rollback as _triton
        _triton(kv_cache, cache_lens, accept_index, accept_lens)
    else:  # resolved by _backend.select; anything else is a bug
        raise AssertionError(backend)


@_kv_rollback_op.register_fake
def _(kv_cache, cache_lens, accept_index, accept_lens, backend):
    return None


def _validate(kv_cache, cache_lens, accept_index, accept_lens, check_values: bool):
    _checks.tensor("kv_cache", kv_cache, ndim=6, dtypes=_checks.FLOAT_DTYPES, contiguous=True)
    dev = kv_cache.device
    _checks.tensor("cache_lens", cache_lens, ndim=1, dtypes=(torch.int64,), device=dev, contiguous=True)
    _checks.tensor("accept_index", accept_index, ndim=2, dtypes=_checks.INDEX_DTYPES, device=dev)
    _checks.tensor("accept_lens", accept_lens, ndim=1, dtypes=_checks.INDEX_DTYPES, device=dev)
    L, two, B, H, S, D = kv_cache.shape
    if two != 2:
        raise ValueError(f"kv_cache: expected shape (L, 2, B, H, S, D) with K and V at dim 1, "
                         f"got {tuple(kv_cache.shape)}")
    _checks.shape("cache_lens", cache_lens, (B,), "(one per sequence of kv_cache)")
    _checks.shape("accept_index", accept_index, (B, None), "(B, max accepted)")
    _checks.shape("accept_lens", accept_lens, (B,), "(one per sequence of kv_cache)")
    if not check_values:
        return
    A = accept_index.shape[1]
    lens = accept_lens.to(torch.int64).cpu()
    base = cache_lens.cpu()
    idx = accept_index.to(torch.int64).cpu()
    if (base < 0).any() or (base > S).any():
        b = int(((base < 0) | (base > S)).nonzero()[0])
        raise ValueError(f"cache_lens: expected values in [0, {S}] (the cache capacity), "
                         f"got cache_lens[{b}] = {int(base[b])}")
    if (lens < 0).any() or (lens > A).any():
        b = int(((lens < 0) | (lens > A)).nonzero()[0])
        raise ValueError(f"accept_lens: expected values in [0, {A}] (accept_index has {A} columns), "
                         f"got accept_lens[{b}] = {int(lens[b])}")
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        row = idx[b, :n]
        if int(row[0]) < 0:
            raise ValueError(f"accept_index: expected non-negative tree rows, got accept_index[{b}, 0] = {int(row[0])}")
        if n > 1 and not bool((row[1:] > row[:-1]).all()):
            raise ValueError(f"accept_index: expected strictly increasing rows in the first "
                             f"accept_lens[{b}] = {n} entries, got {row.tolist()} for sequence {b}")
        last = int(base[b]) + int(row[-1])
        if last >= S:
            raise ValueError(f"accept_index: row cache_lens[{b}] + accept_index[{b}, {n - 1}] = {last} "
                             f"is outside the cache (capacity S = {S})")


def kv_rollback(kv_cache: torch.Tensor, cache_lens: torch.Tensor, accept_index: torch.Tensor,
                accept_lens: torch.Tensor, *, backend: str | None = None, validate: bool = True) -> None:
    """Move each sequence's accepted tree rows right after its prefix, in every layer, in place.

    Args:
        kv_cache: ``[L, 2, B, H_kv, S, D]`` fp32/fp16/bf16, contiguous (module docstring).
        cache_lens: ``[B]`` int64, rows committed before the tree; incremented by accept_lens.
        accept_index: ``[B, A]`` int32/int64, accepted tree rows relative to ``cache_lens``,
            strictly increasing in the first ``accept_lens[b]`` entries (path order).
        accept_lens: ``[B]`` int32/int64, 0..A accepted rows per sequence.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
        validate: check index values (one host sync); pass False in hot loops whose indices
            come from ``tree_accept``.

    Example::

        >>> kv = torch.randn(30, 2, 1, 3, 512, 64)
        >>> lens = torch.tensor([100])
        >>> kv_rollback(kv, lens, torch.tensor([[0, 2, 5]]), torch.tensor([3]))
        >>> lens
        tensor([103])
    """
    _validate(kv_cache, cache_lens, accept_index, accept_lens, validate)
    name = _backend.select(OP, kv_cache.device, backend)
    _kv_rollback_op(kv_cache, cache_lens, accept_index, accept_lens, name)
