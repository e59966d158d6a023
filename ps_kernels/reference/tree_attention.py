import math

import torch


def tree_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cache_lens: torch.Tensor, tree_mask: torch.Tensor | None,
                   scale: float | None = None, return_lse: bool = False, *, window: int | None = None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None):
    """Tree-verification attention (the specification).

    q:          [B, Hq, N, D]   queries of the N tree nodes (rotary already applied)
    k_new/v_new:[B, Hkv, N, D]  the nodes' keys/values; written to the cache at rows
                                cache_lens[b] .. cache_lens[b] + N - 1 (cache_lens unchanged)
    k_cache/v_cache: [B, Hkv, S, D] one layer's cache (a view of the [L, 2, B, H, S, D] tensor)
    cache_lens: [B] int64       committed prefix length per sequence (0 allowed)
    tree_mask:  [N, W] or [B, N, W] int64 packed bits, W = ceil(N / 64): bit j % 64 of word
                j // 64 of row i set <=> node i attends node j. None = causal over the nodes.
    Node i attends every prefix row and the nodes its mask allows. Hq % Hkv == 0 (GQA: query
    head h uses KV head h // (Hq // Hkv)). Returns out [B, Hq, N, D] in q's dtype and, with
    return_lse, lse [B, Hq, N] fp32 (natural log of the softmax denominator, scaled scores).

    Optional features (each off when None):
    window:  sliding window (transformers' ``sliding_window``): a query at absolute position
             p_q sees an otherwise allowed key at position p_k iff p_q - p_k < window. Prefix
             row r sits at position r; node i at P + depth(i), depth(i) = popcount(mask row i) - 1
             (its ancestors; i for the causal chain). So node i sees prefix row r iff
             P + depth(i) - r < window, and ancestor j iff depth(i) - depth(j) < window.
    softcap: logit soft-capping (Gemma 2): the scaled score s becomes softcap * tanh(s / softcap)
             before masking and softmax.
    sinks:   fp32 [Hq], one learned logit per query head (gpt-oss), in the softmax denominator
             only: p_k = exp(s_k) / (exp(sink_h) + sum_k' exp(s_k')); lse includes it.
    """
    B, Hq, N, D = q.shape
    Hkv = k_new.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # compute (and lse) dtype: fp32; fp64 for fp64 inputs, the tests' truth
    allowed_tree = unpack_tree_mask(tree_mask, N, B, q.device)  # [B, N, N] bool
    depth = allowed_tree.sum(-1) - 1                            # [B, N]: ancestors of each node
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, N, dtype=acc, device=q.device)
    for b in range(B):
        P = int(cache_lens[b])
        k_cache[b, :, P:P + N] = k_new[b]
        v_cache[b, :, P:P + N] = v_new[b]
        keys = k_cache[b, :, :P + N].to(acc).repeat_interleave(group, dim=0)    # [Hq, P+N, D]
        vals = v_cache[b, :, :P + N].to(acc).repeat_interleave(group, dim=0)
        scores = torch.einsum("hnd,hsd->hns", q[b].to(acc), keys) * scale       # [Hq, N, P+N]
        allowed = torch.cat([torch.ones(N, P, dtype=torch.bool, device=q.device), allowed_tree[b]], dim=1)
        if window is not None:
            q_pos = P + depth[b]                                                 # [N]
            k_pos = torch.cat([torch.arange(P, device=q.device), P + depth[b]])  # [P+N]
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        out[b], lse[b] = _softmax_attend(scores, allowed, vals, softcap, sinks, q.dtype)
    return (out, lse) if return_lse else out


def _softmax_attend(scores: torch.Tensor, allowed: torch.Tensor, vals: torch.Tensor, softcap: float | None,
                    sinks: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [Hq, n, K] (scaled), allowed [n, K] bool, vals [Hq, K, D] -> (out [Hq, n, D] in
    out_dtype, lse [Hq, n]): soft-capping, masking, softmax with the optional sink logit per head
    in the denominator, and the weighted values. What both attention references share."""
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more column per head: in the denominator, with no value
        sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(-1, scores.shape[1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("hns,hsd->hnd", probs, vals).to(out_dtype), lse


def unpack_tree_mask(tree_mask: torch.Tensor | None, n: int, batch: int, device) -> torch.Tensor:
    """[N, W] / [B, N, W] packed int64 bits (or None = causal) -> [B, N, N] bool."""
    if tree_mask is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)
    words = tree_mask if tree_mask.dim() == 3 else tree_mask.unsqueeze(0).expand(batch, -1, -1)
    j = torch.arange(n, device=device)
    bits = (words[..., j // 64] >> (j % 64)) & 1     # [B, N, N]
    return bits.bool()


def pack_tree_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[..., N, N] bool -> [..., N, ceil(N/64)] int64 packed bits (bit j%64 of word j//64)."""
    n = allowed.shape[-1]
    w = (n + 63) // 64
    padded = torch.zeros(*allowed.shape[:-1], w * 64, dtype=torch.int64, device=allowed.device)
    padded[..., :n] = allowed.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64, device=allowed.device)
    # bit 63 lands on the sign bit: int64 wrap-around is what we want for a bit pattern
    return (padded.view(*allowed.shape[:-1], w, 64) << shifts).sum(-1)


def tree_mask_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """parents [N] or [B, N] (parents[..., 0] = -1, parents[i] < i) -> packed ancestor-or-self
    mask [.., N, W]."""
    squeeze = parents.dim() == 1
    p = parents.unsqueeze(0) if squeeze else parents
    B, N = p.shape
    allowed = torch.zeros(B, N, N, dtype=torch.bool, device=p.device)
    idx = torch.arange(N, device=p.device)
    allowed[:, idx, idx] = True
    for i in range(1, N):  # topological order: a parent's row is complete before its children
        par = p[:, i]
        allowed[:, i] |= allowed[torch.arange(B, device=p.device), par.clamp(min=0)] & (par >= 0).unsqueeze(1)
    packed = pack_tree_mask(allowed)
    return packed[0] if squeeze else packed
