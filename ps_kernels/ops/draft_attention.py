"""draft_attention: the parallel drafter's attention, new real tokens and mask slots in one
call, the pattern generated in the kernel (no mask tensor).

Row layout of q / k_new / v_new (``T = R + M`` rows, ``M = num_masks``): rows
``[0, new_lens[b])`` are the sequence's new real tokens, rows ``[new_lens[b], R)`` padding
(output 0, lse -inf), rows ``[R, T)`` the mask slots. Real token t attends the cache prefix
and real tokens 0..t; mask slot j attends the prefix, every new real token and slots 0..j.
The real rows' K/V are appended to the cache at ``cache_lens[b]``; the slots' K/V are scratch
and never written. ``cache_lens`` is left alone (the caller adds ``new_lens``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _checks
from .. import reference as _ref
from . import _attention
from . import attention_plan as _plan

OP = "draft_attention"


def _run(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
         cache_lens: torch.Tensor, new_lens: torch.Tensor, num_masks: int, scale: float, window: int,
         softcap: float, sinks: Optional[torch.Tensor], backend: str, num_splits: int = 0, split_rows: int = 0,
         workspace: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """num_splits, split_rows, workspace: an AttentionPlan's (num_splits 0: none), as in tree_attention."""
    if backend == "reference":
        return _ref.draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale,
                                    return_lse=True, window=window or None, softcap=softcap or None, sinks=sinks)
    out, lse = _attention.empty_outputs(q)
    if backend == "cuda" and num_splits > 0:
        torch.ops.ps_kernels_C.draft_attention_planned(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens,
                                                       num_masks, scale, window, softcap, sinks, out, lse, num_splits,
                                                       split_rows, workspace)
    elif backend in ("cpu", "cuda"):
        torch.ops.ps_kernels_C.draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks,
                                               scale, window, softcap, sinks, out, lse)
    elif backend == "triton":
        from ..triton_kernels.draft_attention import draft_attention as _triton
        _triton(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale, window, softcap, sinks,
                out, lse, *((num_splits, split_rows, workspace) if num_splits > 0 else ()))
    else:  # resolved by _backend.select; anything else is a bug
        raise AssertionError(backend)
    return out, lse


_draft_attention_op = torch.library.custom_op("ps_kernels::draft_attention", _run,
                                              mutates_args=("k_cache", "v_cache", "workspace"))


@_draft_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale, window, softcap, sinks, backend,
      num_splits=0, split_rows=0, workspace=None):
    return _attention.empty_outputs(q)


def _validate(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, check_values: bool):
    B, _, _, T, _, S = _attention.check_inputs(q, k_new, v_new, k_cache, v_cache, cache_lens, rows="T")
    _checks.tensor("new_lens", new_lens, ndim=1, dtypes=_checks.INDEX_DTYPES, device=q.device)
    _checks.shape("new_lens", new_lens, (B,), "(one per sequence of q)")
    if isinstance(num_masks, bool) or not isinstance(num_masks, int):
        raise TypeError(f"num_masks: expected an int, got {type(num_masks).__name__}")
    if not 0 <= num_masks <= T:
        raise ValueError(f"num_masks: expected 0 <= num_masks <= T = {T} (q.shape[2], real rows then mask "
                         f"slots), got {num_masks}")
    if not check_values or B == 0:
        return
    host = torch.cat([cache_lens, new_lens.to(torch.int64)]).cpu()  # the one host sync
    base, lens = host[:B], host[B:]
    R = T - num_masks
    bad = ((lens < 0) | (lens > R)).nonzero()
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"new_lens: expected values in [0, {R}] (R = T - num_masks real rows), "
                         f"got new_lens[{b}] = {int(lens[b])}")
    msg = _attention.cache_room_error(base, lens, S, "new_lens[b]")
    if msg:
        raise ValueError(msg)


def draft_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, cache_lens: torch.Tensor, new_lens: torch.Tensor, num_masks: int, *,
                    scale: float | None = None, window: int | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None, return_lse: bool = False, backend: str | None = None,
                    validate: bool = True, plan: _plan.AttentionPlan | None = None):
    """The drafter's attention: new real tokens (causal) and mask slots over the drafter cache.

    Args:
        q: ``[B, Hq, T, D]`` fp32/fp16/bf16, ``T = R + num_masks`` rows (module docstring).
        k_new, v_new: ``[B, Hkv, T, D]``, same rows, ``Hq % Hkv == 0``; the real rows are
            written to the cache after the prefix, the mask slots' rows are not.
        k_cache, v_cache: ``[B, Hkv, S, D]`` contiguous, the drafter's cache for this layer.
        cache_lens: ``[B]`` int64 committed rows, ``cache_lens[b] + new_lens[b] <= S``.
        new_lens: ``[B]`` int32/int64 real tokens per sequence, ``0 <= new_lens[b] <= R``.
        num_masks: M, the number of mask slots (the last M rows), ``0 <= M <= T``.
        scale: score scale, default ``1 / sqrt(D)``.
        window: sliding window, an int >= 1, or None (tree_attention's rule): cache row c sits at
            position c, real token t at ``cache_lens[b] + t``, mask slot j at
            ``cache_lens[b] + new_lens[b] + j``; a query at p_q sees an otherwise allowed key at
            p_k iff ``p_q - p_k < window``.
        softcap: logit soft-capping, a float > 0, or None (as in tree_attention).
        sinks: fp32 ``[Hq]`` attention sinks on q's device, or None (as in tree_attention).
        return_lse: also return the log-sum-exp of the scaled scores (-inf on padding rows).
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
        validate: check values (lengths, cache room; one host sync); pass False in hot loops
            (the native backends then also skip the Python shape checks, as in tree_attention).
        plan: ``ps_kernels.attention_plan("draft_attention", ...)`` made once per step (rows =
            T), as in tree_attention.

    Returns:
        ``out [B, Hq, T, D]`` in q's dtype (0 on padding rows), and with ``return_lse`` also
        ``lse [B, Hq, T]`` fp32.

    Example::

        >>> B, Hq, Hkv, S, D, R, M = 2, 9, 3, 256, 64, 4, 3
        >>> k_cache, v_cache = torch.zeros(B, Hkv, S, D), torch.zeros(B, Hkv, S, D)
        >>> q, k, v = torch.randn(B, Hq, R + M, D), torch.randn(B, Hkv, R + M, D), torch.randn(B, Hkv, R + M, D)
        >>> out = draft_attention(q, k, v, k_cache, v_cache, torch.tensor([10, 0]), torch.tensor([4, 1]), M)
        >>> out[1, :, 1:4].abs().max()                      # sequence 1 has one real token: padding
        tensor(0.)
    """
    if validate:
        _validate(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, True)
    name = _backend.select(OP, q.device, backend) if plan is None else getattr(plan, "backend", None)
    if not validate and name not in _attention.NATIVE:
        _validate(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, False)
    name, scale, window, softcap, sinks, launch = _attention.resolve(OP, name, q, k_new.shape[1], scale, window, softcap,
                                                                    sinks, plan, backend, validate)
    q, k_new, v_new = _attention.contiguous(q, k_new, v_new)
    new_lens = new_lens.to(torch.int64).contiguous()
    run = _draft_attention_op if torch.compiler.is_compiling() and name not in _attention.NATIVE else _run
    # (as in tree_attention)
    out, lse = run(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale, window, softcap, sinks,
                   name, *launch)
    return (out, lse) if return_lse else out
