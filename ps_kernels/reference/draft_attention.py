import math

import torch

from .tree_attention import _softmax_attend


def draft_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, cache_lens: torch.Tensor, new_lens: torch.Tensor, num_masks: int,
                    scale: float | None = None, return_lse: bool = False, *, window: int | None = None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None):
    """Fused mask-token attention of the parallel drafter (the specification).

    q:           [B, Hq, T, D]   T = R + M: rows [0, new_lens[b]) are new real tokens, rows
                                 [new_lens[b], R) padding (output 0, lse -inf), rows [R, R + M)
                                 the M = num_masks mask slots
    k_new/v_new: [B, Hkv, T, D]  same row layout
    k_cache/v_cache: [B, Hkv, S, D] the drafter's cache for this layer
    cache_lens:  [B] int64       committed rows (unchanged; the caller adds new_lens after)
    new_lens:    [B] int64       0..R real tokens per sequence

    Writes the real rows k_new[b, :, :new_lens[b]] to cache rows cache_lens[b]..; mask K/V are
    never written. Real token t attends the cache prefix and real tokens 0..t; mask slot j
    attends the prefix, every new real token and mask slots 0..j.

    window, softcap, sinks: as in tree_attention. Positions for the window: cache row c at c,
    real token t at P + t, mask slot j at P + r + j (P = cache_lens[b], r = new_lens[b]); a
    query at p_q sees an otherwise allowed key at p_k iff p_q - p_k < window.
    """
    B, Hq, T, D = q.shape
    Hkv = k_new.shape[1]
    group = Hq // Hkv
    M = num_masks
    R = T - M
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # compute (and lse) dtype: fp32; fp64 for fp64 inputs, the tests' truth
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=acc, device=q.device)
    for b in range(B):
        P, r = int(cache_lens[b]), int(new_lens[b])
        k_cache[b, :, P:P + r] = k_new[b, :, :r]
        v_cache[b, :, P:P + r] = v_new[b, :, :r]
        rows = list(range(r)) + list(range(R, T))
        keys = torch.cat([k_cache[b, :, :P + r], k_new[b, :, R:]], dim=1).to(acc).repeat_interleave(group, 0)
        vals = torch.cat([v_cache[b, :, :P + r], v_new[b, :, R:]], dim=1).to(acc).repeat_interleave(group, 0)
        n_q = len(rows)
        # key columns: prefix P, real r, masks M
        allowed = torch.zeros(n_q, P + r + M, dtype=torch.bool, device=q.device)
        allowed[:, :P] = True
        allowed[:r, P:P + r] = torch.ones(r, r, dtype=torch.bool, device=q.device).tril()
        allowed[r:, P:P + r] = True
        allowed[r:, P + r:] = torch.ones(M, M, dtype=torch.bool, device=q.device).tril()
        if window is not None:  # key column c sits at position c, query n (reals, then slots) at P + n
            q_pos = P + torch.arange(n_q, device=q.device)
            k_pos = torch.arange(P + r + M, device=q.device)
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        qb = q[b, :, rows].to(acc)
        scores = torch.einsum("hnd,hsd->hns", qb, keys) * scale
        out[b, :, rows], lse[b, :, rows] = _softmax_attend(scores, allowed, vals, softcap, sinks, q.dtype)
    return (out, lse) if return_lse else out
