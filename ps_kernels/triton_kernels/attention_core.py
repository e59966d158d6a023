"""Flash-decoding core shared by tree_attention and draft_attention (Triton).

Both ops attend N new query rows of a sequence to the committed cache prefix plus the N new
keys, under a mask over the new keys that the kernel computes itself:

    MASK_CAUSAL  new key j visible to row i iff j <= i               (tree_mask=None)
    MASK_TREE    bit j % 64 of word j // 64 of tree_mask[b, i]       (packed int64 words)
    MASK_DRAFT   real row t < new_lens: real keys 0..t; mask slot t >= R = N - num_masks:
                 every real key and mask slots R..t; padding rows see nothing (out 0, lse -inf)

Attention features (each a compile-time switch, so calls without them run the plain kernel):
    window   a query at position p_q sees a key at p_k only if p_q - p_k < window. Positions:
             cache row c at c; after the prefix P, causal row i at P + i, tree node i at
             P + depth(i) (depth = popcount of its mask row - 1), draft real row t at P + t and
             mask slot s at P + new_lens + s. Prefix tiles before the earliest row's window are
             never loaded, and the splits cover only the rows a window shows.
    softcap  s = softcap * tanh(scale * q.k / softcap), before masking and softmax.
    sinks    one fp32 logit per query head joins the softmax denominator (not the output).

Work layout (GQA): the query heads of one KV head times the N rows form the M dimension of
one tile, row r = node * group + head-in-group, so one program loads each K/V tile once for
all query heads that share it. The grid is (B * Hkv, M tiles, splits): the prefix rows a
program reads ([0, P), or from its earliest row's window on) are cut into runs of split_rows,
split s taking run s and the last split also the rest of the prefix and the new keys, which
are read from k_new/v_new (not from the cache rows this launch writes, so no program depends
on another's write). Any split count gives the right result; a plan only balances the work.
With one split the program normalises and writes out/lse itself (the sink folded in); with
several it writes fp32 partials (out / l, lse) that _combine_splits_kernel merges with the
usual log-sum-exp weights and the sink. Scores are fp32 (exp2 with log2(e) folded in); fp32
inputs use IEEE dot products, fp16/bf16 tensor cores with fp32 accumulation.

The program of the last M tile and last split also copies the new rows that belong in the
cache (all N tree nodes; the new_lens real draft rows) to cache rows cache_lens[b].., from the
K/V tiles it loads anyway: its new-key loop always covers every new key.
"""
import functools

import torch
import triton
import triton.language as tl

from . import on_device

MASK_CAUSAL, MASK_TREE, MASK_DRAFT = 0, 1, 2
# A split should at least stream this many prefix rows, or the combine pass costs more than
# the parallelism gains.
MIN_SPLIT_ROWS = 256
LOG2E = 1.4426950408889634
# a row that does not exist: its first visible key lies past any cache (rows < 2^30 assumed)
_NO_ROW = tl.constexpr(1 << 30)


# Sizes vary call to call (a tree's N, the drafter's rows, the split length, the window): one
# compiled kernel per (dtype, mask kind, features, blocks), not per divisibility pattern of each
# size. Strides keep their specialisation (alignment of the rows: vector loads).
@triton.jit(do_not_specialize=["n_rows", "num_masks", "n_kv_heads", "group", "split_rows", "window"])
def _attention_fwd_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, cache_lens_ptr, aux_ptr, sinks_ptr, out_ptr,
                          lse_ptr, part_out_ptr, part_lse_ptr, qk_scale, softcap, n_rows, num_masks, n_kv_heads,
                          group, split_rows, window,
                          sq_b, sq_h, sq_n, skn_b, skn_h, skn_n, svn_b, svn_h, svn_n,
                          skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, so_b, so_h, so_n, sa_b, sa_n,
                          D: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr, WINDOW: tl.constexpr,
                          SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    m_total = n_rows * group
    prefix = tl.load(cache_lens_ptr + b).to(tl.int32)

    # stage: the tile's rows, which exist, and their scaled queries
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    node = r // group
    head = kvh * group + r % group
    row_in = r < m_total
    n_real = 0
    first_mask = n_rows - num_masks
    if MASK == 2:
        n_real = tl.load(aux_ptr + b).to(tl.int32)
        row_ok = row_in & ((node < n_real) | (node >= first_mask))
    else:
        row_ok = row_in
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + node[:, None] * sq_n + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # stage: each row's first visible key, as a position relative to the prefix length (prefix
    # row c is at c - P); the program's prefix rows start at its earliest row's first key
    if WINDOW:
        pos = _node_position(aux_ptr, b, node, row_ok, n_rows, n_real, first_mask, sa_b, sa_n, MASK)
        first_key = tl.where(row_ok, pos - window + 1, _NO_ROW)
        first = tl.maximum(prefix + tl.min(first_key, 0), 0)
    else:
        first = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # committed prefix: this split's run of it (the last split takes the rest)
    kc_base = kc_ptr + b * skc_b + kvh * skc_h
    vc_base = vc_ptr + b * svc_b + kvh * svc_h
    lo = first + split * split_rows
    hi = tl.where(split == n_splits - 1, prefix, tl.minimum(prefix, lo + split_rows))
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        key_ok = j < hi
        kt = tl.load(kc_base + j[None, :] * skc_s + d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(vc_base + j[:, None] * svc_s + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        visible = row_ok[:, None] & key_ok[None, :]
        if WINDOW:
            visible = visible & ((j - prefix)[None, :] >= first_key[:, None])
        m_i, l_i, acc = _online_softmax_step(q, kt, v, visible, qk_scale, softcap, m_i, l_i, acc, SOFTCAP)

    if split == n_splits - 1:
        # new keys, straight from k_new/v_new; rows never see a key past their own node except
        # through an explicit tree bit, so causal and draft tiles stop at the last node here
        if MASK == 1:
            key_end = n_rows
        else:
            key_end = tl.minimum(n_rows, (tl.minimum(pid_m * BLOCK_M + BLOCK_M, m_total) - 1) // group + 1)
        if MASK == 2:
            n_write = n_real
        else:
            n_write = n_rows
        writes = pid_m == tl.num_programs(1) - 1
        kn_base = kn_ptr + b * skn_b + kvh * skn_h
        vn_base = vn_ptr + b * svn_b + kvh * svn_h
        for start in range(0, key_end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            key_ok = j < key_end
            kt = tl.load(kn_base + j[None, :] * skn_n + d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(vn_base + j[:, None] * svn_n + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            if MASK == 0:
                allowed = j[None, :] <= node[:, None]
            elif MASK == 1:
                # BLOCK_N divides 64: the whole key tile lies in word start // 64 of each row
                word = tl.load(aux_ptr + b * sa_b + node * sa_n + start // 64, mask=row_in, other=0)
                allowed = ((word[:, None] >> (j[None, :] % 64).to(tl.int64)) & 1) != 0
            else:
                real_key = (j[None, :] < n_real) & ((j[None, :] <= node[:, None]) | (node[:, None] >= first_mask))
                allowed = real_key | ((j[None, :] >= first_mask) & (j[None, :] <= node[:, None]))
            visible = row_ok[:, None] & key_ok[None, :] & allowed
            if WINDOW:
                key_pos = _node_position(aux_ptr, b, j, key_ok, n_rows, n_real, first_mask, sa_b, sa_n, MASK)
                visible = visible & (key_pos[None, :] >= first_key[:, None])
            m_i, l_i, acc = _online_softmax_step(q, kt, v, visible, qk_scale, softcap, m_i, l_i, acc, SOFTCAP)
            if writes:
                dst = (prefix + j).to(tl.int64)
                w_ok = j < n_write
                tl.store(kc_base + dst[None, :] * skc_s + d[:, None], kt, mask=w_ok[None, :] & d_ok[:, None])
                tl.store(vc_base + dst[:, None] * svc_s + d[None, :], v, mask=w_ok[:, None] & d_ok[None, :])

    # stage: write. Rows that saw no key (draft padding) get out 0 and lse -inf; the sink joins
    # the denominator of the others here when unsplit, in the combine pass when split.
    seen = l_i > 0
    if SINKS and not SPLIT:
        sink = tl.load(sinks_ptr + head, mask=row_in, other=0.0).to(tl.float32) * 1.4426950408889634
        m_all = tl.where(seen, tl.maximum(m_i, sink), 0.0)
        alpha = tl.math.exp2(m_i - m_all)
        l_i = tl.where(seen, l_i * alpha + tl.math.exp2(sink - m_all), 0.0)
        acc = acc * alpha[:, None]
        m_i = m_all
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if SPLIT:
        part = (pid_bh * n_splits + split).to(tl.int64) * m_total + r
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], o, mask=row_in[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_in)
    else:
        tl.store(out_ptr + b * so_b + head[:, None] * so_h + node[:, None] * so_n + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
        tl.store(lse_ptr + (b * n_kv_heads * group + head) * n_rows + node, lse, mask=row_in)


@triton.jit
def _popcount64(x):
    # SWAR bit count of int64 words; the arithmetic shifts' sign bits are masked off at each step
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return (x & 0x7F).to(tl.int32)


@triton.jit
def _node_position(aux_ptr, b, node, ok, n_rows, n_real, first_mask, sa_b, sa_n, MASK: tl.constexpr):
    """Position after the prefix of new rows `node` (queries or keys): the causal index, the
    tree depth (bits of the node's mask row - 1), or the draft real index / n_real + slot."""
    if MASK == 0:
        pos = node
    elif MASK == 1:
        bits = tl.zeros_like(node)
        for w in range(0, (n_rows + 63) // 64):
            word = tl.load(aux_ptr + b * sa_b + node * sa_n + w, mask=ok, other=0)
            bits += _popcount64(word)
        pos = bits - 1
    else:
        pos = tl.where(node < n_real, node, n_real + node - first_mask)
    return pos


@triton.jit
def _online_softmax_step(q, kt, v, visible, qk_scale, softcap, m_i, l_i, acc, SOFTCAP: tl.constexpr):
    # compute_qk: scores in the log2 domain, soft-capped (qk_scale = scale / softcap and softcap
    # = softcap * log2(e) then) or not (qk_scale = scale * log2(e))
    if q.dtype == tl.float32:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = s * qk_scale
    if SOFTCAP:
        # tanh from exp2 (the interpreter has no tanh): sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)
        e = tl.math.exp2(tl.abs(s) * (-2.0 * 1.4426950408889634))
        t = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(s < 0, -t, t)
    # update_mdo_states: running max, denominator and accumulator rescale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 gives 0, not nan
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # compute_sfm_v: acc += P . V
    if v.dtype == tl.float32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _combine_splits_kernel(part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr, lse_ptr, n_rows, n_q_heads, n_kv_heads,
                           group, n_splits, so_b, so_h, so_n,
                           D: tl.constexpr, SINKS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # one program per output row (b, query head, node); partials are laid out per
    # (b * Hkv + kv head, split, tile row) with tile row = node * group + head % group
    row = tl.program_id(0).to(tl.int64)
    node = row % n_rows
    bh = row // n_rows
    b = bh // n_q_heads
    head = bh % n_q_heads
    r = node * group + head % group
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    part = ((b * n_kv_heads + head // group) * n_splits + s) * (n_rows * group) + r
    lse_s = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    # every split empty (a draft padding row): weights 0, out 0, lse -inf, and no sink
    seen = m > float("-inf")
    if SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m = tl.where(seen, tl.maximum(m, sink), m)
    m_safe = tl.where(seen, m, 0.0)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    if SINKS:
        total += tl.where(seen, tl.exp(sink - m_safe), 0.0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    o_s = tl.load(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(out_ptr + b * so_b + head * so_h + node * so_n + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, lse)


def tiles(m_total: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for m_total = query heads per KV head x rows."""
    block_m = 16 if m_total <= 16 else (32 if m_total <= 32 else 64)
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_m, 64 if block_d <= 128 else 32, block_d


def prefix_span(max_prefix: int, window: int) -> int:
    """The most prefix rows one program reads: max_prefix, or window - 1 rows with a window."""
    return window - 1 if 0 < window and window - 1 < max_prefix else max_prefix


def plan_splits(batch: int, q_heads: int, kv_heads: int, rows: int, head_dim: int, max_prefix: int, window: int,
                num_sms: int) -> tuple[int, int, int]:
    """The Triton kernel's plan(): (num_splits, split_rows, workspace_floats).

    Splits the prefix when (batch x KV heads x M tiles) leaves num_sms SMs idle, keeping at
    least MIN_SPLIT_ROWS rows per split, over prefix_span(max_prefix, window) rows (an upper
    bound of cache_lens: reading them would need a host sync; any bound gives the right
    result, the last split takes what is left). workspace_floats: the fp32 partials
    [B * Hq * N * splits, BLOCK_D] and their lse, 0 when unsplit."""
    m_total = rows * (q_heads // kv_heads)
    block_m, block_n, block_d = tiles(m_total, head_dim)
    ctas = batch * kv_heads * triton.cdiv(m_total, block_m)
    span = prefix_span(max_prefix, window)
    splits = max(1, min(triton.cdiv(2 * num_sms, max(ctas, 1)), span // MIN_SPLIT_ROWS))
    split_rows = triton.cdiv(triton.cdiv(max(span, 1), splits), block_n) * block_n
    floats = batch * q_heads * rows * splits * (block_d + 1) if splits > 1 else 0
    return splits, split_rows, floats


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """The SM count of a CUDA device (asked once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention_forward(q, k_new, v_new, k_cache, v_cache, cache_lens, aux, mask_kind: int, num_masks: int,
                      scale: float, window: int, softcap: float, sinks, out, lse, num_splits: int | None = None,
                      split_rows: int | None = None, workspace=None) -> None:
    """Launch the flash-decoding kernel (and the combine pass when split).

    aux is the packed tree mask [B, N, W] (MASK_TREE), new_lens [B] (MASK_DRAFT) or None.
    window 0 / softcap 0.0 / sinks None: the feature is off; sinks is fp32 [Hq].
    num_splits=None plans the splits here (plan_splits over the cache capacity on a GPU, one
    split in the interpreter); a plan made once per step (ps_kernels.attention_plan) passes
    num_splits, split_rows and its fp32 workspace (at least plan_splits' workspace_floats),
    which the partials then use instead of fresh buffers. The last dim of every tensor must be
    contiguous and lse contiguous.
    """
    B, Hq, N, D = q.shape
    Hkv = k_new.shape[1]
    group = Hq // Hkv
    if B == 0 or N == 0 or Hq == 0:
        return
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("out", out)):
        assert t.stride(-1) == 1, f"{name}: the head dim must be contiguous"
    assert lse.is_contiguous(), "lse must be contiguous"
    S = k_cache.shape[2]
    window = int(window or 0)
    window = window if window < S else 0  # positions stay below S: such a window hides nothing
    softcap = float(softcap or 0.0)
    m_total = group * N
    BLOCK_M, BLOCK_N, BLOCK_D = tiles(m_total, D)
    m_tiles = triton.cdiv(m_total, BLOCK_M)
    if num_splits is None:
        num_splits = plan_splits(B, Hq, Hkv, N, D, S, window, num_sms(q.device))[0] if q.device.type == "cuda" else 1
    if split_rows is None:
        span = prefix_span(S, window)
        split_rows = triton.cdiv(triton.cdiv(max(span, 1), num_splits), BLOCK_N) * BLOCK_N
    if aux is None:
        aux, aux_strides = cache_lens, (0, 0)
    elif mask_kind == MASK_TREE:
        assert aux.dtype == torch.int64 and aux.stride(-1) == 1, "tree_mask: int64 words, contiguous last dim"
        aux_strides = (aux.stride(0), aux.stride(1))
    else:
        aux, aux_strides = aux.to(torch.int64).contiguous(), (0, 0)
    split = num_splits > 1
    if split:
        part_rows = B * Hq * N * num_splits
        need = part_rows * (BLOCK_D + 1)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        assert workspace.dtype == torch.float32 and workspace.device == q.device and workspace.is_contiguous() \
            and workspace.numel() >= need, f"workspace: expected {need} contiguous fp32 elements on {q.device}"
        part_out = workspace[:part_rows * BLOCK_D].view(part_rows, BLOCK_D)
        part_lse = workspace[part_rows * BLOCK_D:need]
    else:
        part_out, part_lse = out, lse
    if softcap > 0:
        qk_scale, cap = scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap = scale * LOG2E, 0.0
    sinks_arg = lse if sinks is None else sinks  # an unread fp32 pointer when off
    with on_device(q):
        _attention_fwd_kernel[(B * Hkv, m_tiles, num_splits)](
            q, k_new, v_new, k_cache, v_cache, cache_lens, aux, sinks_arg, out, lse, part_out, part_lse,
            qk_scale, cap, N, num_masks, Hkv, group, split_rows, window,
            q.stride(0), q.stride(1), q.stride(2), k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2), *aux_strides,
            D=D, MASK=mask_kind, SPLIT=split, WINDOW=window > 0, SOFTCAP=softcap > 0, SINKS=sinks is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
        if split:
            _combine_splits_kernel[(B * Hq * N,)](
                part_out, part_lse, sinks_arg, out, lse, N, Hq, Hkv, group, num_splits,
                out.stride(0), out.stride(1), out.stride(2),
                D=D, SINKS=sinks is not None, BLOCK_D=BLOCK_D, BLOCK_S=triton.next_power_of_2(num_splits))


def _fwd_signature(dtype: str) -> dict:
    ptr = "*" + dtype
    sig = {"q_ptr": ptr, "kn_ptr": ptr, "vn_ptr": ptr, "kc_ptr": ptr, "vc_ptr": ptr, "cache_lens_ptr": "*i64",
           "aux_ptr": "*i64", "sinks_ptr": "*fp32", "out_ptr": ptr, "lse_ptr": "*fp32", "part_out_ptr": "*fp32",
           "part_lse_ptr": "*fp32", "qk_scale": "fp32", "softcap": "fp32"}
    for name in ("n_rows", "num_masks", "n_kv_heads", "group", "split_rows", "window", "sq_b", "sq_h", "sq_n",
                 "skn_b", "skn_h", "skn_n", "svn_b", "svn_h", "svn_n", "skc_b", "skc_h", "skc_s",
                 "svc_b", "svc_h", "svc_s", "so_b", "so_h", "so_n", "sa_b", "sa_n"):
        sig[name] = "i32"
    for name in ("D", "MASK", "SPLIT", "WINDOW", "SOFTCAP", "SINKS", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
        sig[name] = "constexpr"
    return sig


def _combine_spec(dtype: str, D: int, sinks: bool) -> tuple:
    block_d = max(16, triton.next_power_of_2(D))
    return (_combine_splits_kernel,
            {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "sinks_ptr": "*fp32", "out_ptr": "*" + dtype,
             "lse_ptr": "*fp32", "n_rows": "i32", "n_q_heads": "i32", "n_kv_heads": "i32", "group": "i32",
             "n_splits": "i32", "so_b": "i32", "so_h": "i32", "so_n": "i32",
             "D": "constexpr", "SINKS": "constexpr", "BLOCK_D": "constexpr", "BLOCK_S": "constexpr"},
            {"D": D, "SINKS": sinks, "BLOCK_D": block_d, "BLOCK_S": 8})


def aot_specs(mask_kind: int, features: bool = True) -> list:
    """AOT compile specs for one mask kind: the dtypes, head dims (incl. a padded odd one),
    tile shapes and both the split and the direct epilogue, without the attention features;
    with `features` also window / softcap / sinks, alone and together, split and direct."""
    specs = []
    plain = [("fp16", 128, 64, False, ()), ("bf16", 64, 16, True, ()), ("fp32", 80, 32, True, ()),
             ("fp16", 96, 64, True, ()), ("bf16", 200, 16, False, ())]
    with_features = [("bf16", 128, 64, True, ("WINDOW",)), ("fp16", 64, 16, False, ("SOFTCAP",)),
                     ("bf16", 80, 32, False, ("SINKS",)), ("fp16", 128, 32, True, ("WINDOW", "SOFTCAP", "SINKS")),
                     ("fp32", 64, 16, False, ("WINDOW", "SOFTCAP", "SINKS"))]
    for dtype, D, block_m, split, on in plain + (with_features if features else []):
        _, block_n, block_d = tiles(block_m, D)
        constexprs = {"D": D, "MASK": mask_kind, "SPLIT": split, "BLOCK_M": block_m, "BLOCK_N": block_n,
                      "BLOCK_D": block_d}
        constexprs.update({flag: flag in on for flag in ("WINDOW", "SOFTCAP", "SINKS")})
        specs.append((_attention_fwd_kernel, _fwd_signature(dtype), constexprs))
    specs += [_combine_spec("fp16", 128, False), _combine_spec("fp32", 80, False)]
    if features:
        specs.append(_combine_spec("bf16", 128, True))
    return specs
