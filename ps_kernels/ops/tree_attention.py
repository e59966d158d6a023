"""tree_attention: the target's verification attention over a token tree, with the tree's K/V
appended to the cache in the same call.

Each of the N tree nodes attends every committed prefix row of its sequence and the nodes its
packed mask allows (its ancestors and itself); ``tree_mask=None`` is the causal chain. The
nodes' K/V are written to cache rows ``cache_lens[b] .. cache_lens[b] + N - 1``;
``cache_lens`` is left alone (``kv_rollback`` advances it once the tree is accepted).

Mask format: ``[N, W]`` (shared by the batch) or ``[B, N, W]`` int64, ``W = ceil(N / 64)``;
bit ``j % 64`` of word ``j // 64`` of row ``i`` set <=> node ``i`` attends node ``j``. Build it
with ``tree_mask_from_parents(parents)`` once per tree shape. Backends receive it as a
contiguous ``[B, N, W]`` tensor (a shared mask is expanded and copied: ``B * N * W`` words,
negligible next to the attention) or None for causal; see ``_attention`` for the rest of the
backend contract.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _checks
from .. import reference as _ref
from . import _attention
from . import attention_plan as _plan

OP = "tree_attention"


def _run(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
         cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], scale: float, window: int, softcap: float,
         sinks: Optional[torch.Tensor], backend: str, num_splits: int = 0, split_rows: int = 0,
         workspace: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """num_splits, split_rows, workspace: an AttentionPlan's (num_splits 0: none; the GPU
    backends then plan inside the call)."""
    if backend == "reference":
        return _ref.tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, return_lse=True,
                                   window=window or None, softcap=softcap or None, sinks=sinks)
    out, lse = _attention.empty_outputs(q)
    if backend == "cuda" and num_splits > 0:
        torch.ops.ps_kernels_C.tree_attention_planned(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale,
                                                      window, softcap, sinks, out, lse, num_splits, split_rows,
                                                      workspace)
    elif backend in ("cpu", "cuda"):
        torch.ops.ps_kernels_C.tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window,
                                              softcap, sinks, out, lse)
    elif backend == "triton":
        from ..triton_kernels.tree_attention import tree_attention as _triton
        _triton(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window, softcap, sinks, out, lse,
                *((num_splits, split_rows, workspace) if num_splits > 0 else ()))
    else:  # resolved by _backend.select; anything else is a bug
        raise AssertionError(backend)
    return out, lse


_tree_attention_op = torch.library.custom_op("ps_kernels::tree_attention", _run,
                                             mutates_args=("k_cache", "v_cache", "workspace"))


@_tree_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window, softcap, sinks, backend, num_splits=0,
      split_rows=0, workspace=None):
    return _attention.empty_outputs(q)


def _bad_tree_rows(words: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """words [B', N, W] -> ([B', N] bool each) rows missing their own bit, rows with a bit
    j > i among the N nodes, rows with a bit beyond node N - 1 (the last word's padding)."""
    allowed = _ref.unpack_tree_mask(words, n, words.shape[0], words.device)  # [B', N, N]
    i = torch.arange(n, device=words.device)
    no_self = ~allowed[:, i, i]
    later = (allowed & (i.unsqueeze(0) > i.unsqueeze(1))).any(-1)
    if n % 64:  # arithmetic shift: any bit at or above n % 64 (the sign bit too) leaves a non-zero
        beyond = (words[..., -1] >> (n % 64)) != 0
    else:
        beyond = torch.zeros_like(no_self)
    return no_self, later, beyond


def _validate(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, check_values: bool):
    B, _, _, N, _, S = _attention.check_inputs(q, k_new, v_new, k_cache, v_cache, cache_lens, rows="N")
    if N == 0:
        raise ValueError(f"q: expected at least one tree node (N = q.shape[2] >= 1), got shape {tuple(q.shape)}")
    W = (N + 63) // 64
    if tree_mask is not None:
        _checks.tensor("tree_mask", tree_mask, ndim=(2, 3), dtypes=(torch.int64,), device=q.device)
        expected = (N, W) if tree_mask.dim() == 2 else (B, N, W)
        _checks.shape("tree_mask", tree_mask, expected,
                      f"(N, W) or (B, N, W) packed bits, N = {N} nodes, W = ceil(N / 64) = {W}")
    if not check_values or B == 0:
        return
    flags = []
    if tree_mask is not None:
        words = tree_mask if tree_mask.dim() == 3 else tree_mask.unsqueeze(0)
        flags = [f.flatten().to(torch.int64) for f in _bad_tree_rows(words, N)]
    host = torch.cat([cache_lens, *flags]).cpu()  # the one host sync
    msg = _attention.cache_room_error(host[:B], torch.full((B,), N), S, f"N ({N} tree nodes)")
    if msg:
        raise ValueError(msg)
    if flags:
        rows = words.shape[0] * N
        for k, what in enumerate(("its own bit i unset", "a bit j > i set (a later node)",
                                  f"a bit set beyond node {N - 1} (the last word's padding)")):
            bad = host[B + k * rows:B + (k + 1) * rows].nonzero()
            if len(bad):
                b, i = divmod(int(bad[0]), N)
                where = f"row {i}" + (f" of sequence {b}" if tree_mask.dim() == 3 else "")
                raise ValueError(f"tree_mask: expected a tree mask in topological order (row i sets bit i "
                                 f"and no bit j > i), got {where} with {what}")


# from 32 query rows per KV head the Triton kernel's tensor-core tiles win; see benchmarks/results/gpu/
_TRITON_FIRST_ROWS = 32


def auto_order(device: torch.device, rows: int, q_heads: int, kv_heads: int):
    """The automatic backend order for these shapes (None: the default order)."""
    if device.type != "cuda":
        return None
    return ("triton", "cuda", "reference") if rows * (q_heads // kv_heads) >= _TRITON_FIRST_ROWS else None


def _auto_order(q: torch.Tensor, kv_heads: int):
    return auto_order(q.device, q.shape[2], q.shape[1], kv_heads)


def tree_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cache_lens: torch.Tensor, tree_mask: torch.Tensor | None = None, *,
                   scale: float | None = None, window: int | None = None, softcap: float | None = None,
                   sinks: torch.Tensor | None = None, return_lse: bool = False, backend: str | None = None,
                   validate: bool = True, plan: _plan.AttentionPlan | None = None):
    """Attention of N tree nodes over each sequence's cache prefix and their tree ancestors.

    Args:
        q: ``[B, Hq, N, D]`` fp32/fp16/bf16, the nodes' queries (rotary already applied).
        k_new, v_new: ``[B, Hkv, N, D]`` the nodes' keys/values, ``Hq % Hkv == 0`` (query head
            ``h`` uses KV head ``h // (Hq // Hkv)``); written to the cache rows after the prefix.
        k_cache, v_cache: ``[B, Hkv, S, D]`` contiguous, one layer's cache (``kv[l, 0]``, ``kv[l, 1]``).
        cache_lens: ``[B]`` int64 committed prefix rows (0 allowed), ``cache_lens[b] + N <= S``.
        tree_mask: ``[N, W]`` / ``[B, N, W]`` int64 packed bits (module docstring), or None
            for causal. Row i must set bit i and no bit j > i.
        scale: score scale, default ``1 / sqrt(D)``.
        window: sliding window (transformers' ``sliding_window``), an int >= 1, or None: a
            query at position p_q sees an otherwise allowed key at p_k iff ``p_q - p_k < window``.
            Prefix row r sits at position r, node i at ``cache_lens[b] + depth(i)`` (depth: its
            number of ancestors, i for the causal chain), so a node sees the last rows of the
            prefix before it and its ancestors within the window.
        softcap: logit soft-capping (Gemma 2), a float > 0, or None: scaled scores s become
            ``softcap * tanh(s / softcap)`` before masking and softmax.
        sinks: attention sinks (gpt-oss), fp32 ``[Hq]`` on q's device, or None: one logit per
            query head added to the softmax denominator only (no value); lse includes it.
        return_lse: also return the log-sum-exp of the scaled scores.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
        validate: check values (cache room, mask is a tree; one host sync); pass False in hot
            loops whose masks come from ``tree_mask_from_parents``. With False the native
            backends also skip the Python shape checks (their bindings check the contract).
        plan: ``ps_kernels.attention_plan("tree_attention", ...)`` made once per step for these
            shapes and window: the GPU backends then split as planned into the plan's workspace
            instead of planning and allocating in every layer's call; the call runs the plan's
            backend. On the CPU it changes nothing. A plan made for another call is refused.

    Returns:
        ``out [B, Hq, N, D]`` in q's dtype, and with ``return_lse`` also ``lse [B, Hq, N]`` fp32.

    Example::

        >>> B, Hq, Hkv, S, D = 1, 9, 3, 512, 64
        >>> k_cache, v_cache = torch.zeros(B, Hkv, S, D), torch.zeros(B, Hkv, S, D)
        >>> parents = torch.tensor([-1, 0, 0, 1])            # root, two children, a grandchild
        >>> mask = tree_mask_from_parents(parents)           # [4, 1]
        >>> q, k, v = torch.randn(B, Hq, 4, D), torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 4, D)
        >>> out = tree_attention(q, k, v, k_cache, v_cache, torch.tensor([100]), mask)
        >>> out.shape
        torch.Size([1, 9, 4, 64])
    """
    if validate:
        _validate(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, True)
    name = _backend.select(OP, q.device, backend, _auto_order(q, k_new.shape[1])) if plan is None else \
        getattr(plan, "backend", None)
    if not validate and name not in _attention.NATIVE:
        _validate(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, False)
    name, scale, window, softcap, sinks, launch = _attention.resolve(OP, name, q, k_new.shape[1], scale, window, softcap,
                                                                    sinks, plan, backend, validate)
    if tree_mask is not None and tree_mask.dim() == 2:
        tree_mask = tree_mask.expand(q.shape[0], -1, -1)
    mask = None if tree_mask is None else tree_mask.contiguous()
    q, k_new, v_new = _attention.contiguous(q, k_new, v_new)
    # eager calls skip the custom-op dispatcher (~50 us of Python, more than a decode step's
    # kernel). torch.compile traces the native ops themselves (_backend._FAKES; the wrapper cost
    # ~100 us a call in a compiled step) and the registered op for the other backends.
    run = _tree_attention_op if torch.compiler.is_compiling() and name not in _attention.NATIVE else _run
    out, lse = run(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale, window, softcap, sinks, name, *launch)
    return (out, lse) if return_lse else out


def pack_tree_mask(allowed: torch.Tensor) -> torch.Tensor:
    """``[..., N, N]`` bool (row i: the nodes node i attends) -> ``[..., N, ceil(N / 64)]`` int64
    packed bits, the ``tree_mask`` format."""
    _checks.tensor("allowed", allowed, ndim=(2, 3), dtypes=(torch.bool,))
    if allowed.shape[-1] != allowed.shape[-2]:
        raise ValueError(f"allowed: expected a square [..., N, N] mask, got shape {tuple(allowed.shape)}")
    return _ref.pack_tree_mask(allowed)


def tree_mask_from_parents(parents: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """``parents [N]`` or ``[B, N]`` (``parents[..., 0] = -1``, ``0 <= parents[i] < i``) -> the
    packed ancestor-or-self mask ``[N, W]`` / ``[B, N, W]``, built on the parents' device.

    By pointer doubling over depth: after round r every node holds its ancestors closer than 2^r
    and a pointer to the one 2^r up, so ``ceil(log2 N)`` rounds of one gather each finish any tree
    (a number fixed by N: no host sync, whatever the parents). The reference
    (``ps_kernels.reference.tree_mask_from_parents``, a walk over the nodes) is the specification.

    validate: check the parents form a tree in topological order (one host sync); the decoding
    loop passes False for parents it built itself (out-of-range parents are clamped, never read
    out of bounds, and give an unspecified mask).

    Example::

        >>> tree_mask_from_parents(torch.tensor([-1, 0, 0, 1]))
        tensor([[ 1],
                [ 3],
                [ 5],
                [11]])
    """
    _checks.tensor("parents", parents, ndim=(1, 2), dtypes=_checks.INDEX_DTYPES)
    n = parents.shape[-1]
    if n == 0:
        raise ValueError("parents: expected at least the root (N >= 1), got an empty tensor")
    if validate:
        p = parents.to(torch.int64).cpu().reshape(-1, n)
        i = torch.arange(n)
        bad = torch.where(i == 0, p != -1, (p < 0) | (p >= i)).nonzero()
        if len(bad):
            b, j = (int(x) for x in bad[0])
            where = f"parents[{b}, {j}]" if parents.dim() == 2 else f"parents[{j}]"
            raise ValueError(f"parents: expected parents[..., 0] = -1 and 0 <= parents[..., i] < i (topological "
                             f"order), got {where} = {int(p[b, j])}")
    packed = _ref.pack_tree_mask(ancestor_matrix(parents.reshape(-1, n)))
    return packed[0] if parents.dim() == 1 else packed


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """``parents [B, N]`` -> ``[B, N, N]`` bool, row i = node i and its ancestors (pointer doubling)."""
    B, n = parents.shape
    node = torch.arange(n, device=parents.device)
    allowed = (node[:, None] == node[None, :]).expand(B, n, n)
    up = torch.where(node == 0, 0, parents.to(torch.int64).clamp(0, n - 1))   # the root points at itself
    for _ in range((n - 1).bit_length()):
        allowed = allowed | allowed.gather(1, up[:, :, None].expand(B, n, n))
        up = up.gather(1, up)
    return allowed
