"""Flash-decoding core shared by tree_attention and draft_attention (Triton).

Both ops attend N new query rows of a sequence to the committed cache prefix plus the N new
keys, under a mask over the new keys that the kernel computes itself:

    MASK_CAUSAL  new key j visible to row i iff j <= i               (tree_mask=None)
    MASK_TREE    bit j % 64 of word j // 64 of tree_mask[b, i]       (packed int64 words)
    MASK_DRAFT   real row t < new_lens: real keys 0..t; mask slot t >= R = N - num_masks:
                 every real key and mask slots R..t; padding rows see nothing (out 0, lse -inf)

Work layout (GQA): the query heads of one KV head times the N rows form the M dimension of
one tile, row r = node * group + head-in-group, so one program loads each K/V tile once for
all query heads that share it. The grid is (B * Hkv, M tiles, splits): split s covers prefix
rows [s * split_rows, (s + 1) * split_rows) of the cache and the last split also the new keys,
which are read from k_new/v_new (not from the cache rows this launch writes, so no program
depends on another's write). With one split the program normalises and writes out/lse
itself; with several it writes fp32 partials (out / l, lse) that _combine_splits_kernel merges
with the usual log-sum-exp weights. Scores are fp32 (exp2 with log2(e) folded into the scale);
fp32 inputs use IEEE dot products, fp16/bf16 tensor cores with fp32 accumulation.

The program of the last M tile and last split also copies the new rows that belong in the
cache (all N tree nodes; the new_lens real draft rows) to cache rows cache_lens[b].., from the
K/V tiles it loads anyway: its new-key loop always covers every new key.
"""
import torch
import triton
import triton.language as tl

from . import on_device

MASK_CAUSAL, MASK_TREE, MASK_DRAFT = 0, 1, 2
# A split should at least stream this many prefix rows, or the combine pass costs more than
# the parallelism gains.
MIN_SPLIT_ROWS = 256


# Sizes vary call to call (a tree's N, the drafter's rows, the split length): one compiled kernel per
# (dtype, mask kind, blocks), not per divisibility pattern of each size. Strides keep their
# specialisation (alignment of the rows: vector loads).
@triton.jit(do_not_specialize=["n_rows", "num_masks", "n_kv_heads", "group", "split_rows"])
def _attention_fwd_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, cache_lens_ptr, aux_ptr, out_ptr, lse_ptr,
                          part_out_ptr, part_lse_ptr, qk_scale, n_rows, num_masks, n_kv_heads, group,
                          split_rows,
                          sq_b, sq_h, sq_n, skn_b, skn_h, skn_n, svn_b, svn_h, svn_n,
                          skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, so_b, so_h, so_n, sa_b, sa_n,
                          D: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    m_total = n_rows * group
    prefix = tl.load(cache_lens_ptr + b).to(tl.int32)

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    node = r // group
    head = kvh * group + r % group
    row_in = r < m_total
    if MASK == 2:
        n_real = tl.load(aux_ptr + b).to(tl.int32)
        first_mask = n_rows - num_masks
        row_ok = row_in & ((node < n_real) | (node >= first_mask))
    else:
        row_ok = row_in
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + node[:, None] * sq_n + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # committed prefix: every valid row sees every row of it
    kc_base = kc_ptr + b * skc_b + kvh * skc_h
    vc_base = vc_ptr + b * svc_b + kvh * svc_h
    lo = split * split_rows
    hi = tl.minimum(prefix, lo + split_rows)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        key_ok = j < hi
        kt = tl.load(kc_base + j[None, :] * skc_s + d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(vc_base + j[:, None] * svc_s + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        visible = row_ok[:, None] & key_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(q, kt, v, visible, qk_scale, m_i, l_i, acc)

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
            m_i, l_i, acc = _online_softmax_step(q, kt, v, visible, qk_scale, m_i, l_i, acc)
            if writes:
                dst = (prefix + j).to(tl.int64)
                w_ok = j < n_write
                tl.store(kc_base + dst[None, :] * skc_s + d[:, None], kt, mask=w_ok[None, :] & d_ok[:, None])
                tl.store(vc_base + dst[:, None] * svc_s + d[None, :], v, mask=w_ok[:, None] & d_ok[None, :])

    # rows that saw no key (draft padding) get out 0 and lse -inf
    seen = l_i > 0
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
def _online_softmax_step(q, kt, v, visible, qk_scale, m_i, l_i, acc):
    if q.dtype == tl.float32:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 gives 0, not nan
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if v.dtype == tl.float32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _combine_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, n_rows, n_q_heads, n_kv_heads,
                           group, n_splits, so_b, so_h, so_n,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
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
    # every split empty (a draft padding row): weights 0, out 0, lse -inf
    w = tl.exp(lse_s - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    o_s = tl.load(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, m + tl.log(total), float("-inf"))
    tl.store(out_ptr + b * so_b + head * so_h + node * so_n + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, lse)


def _num_splits(ctas: int, capacity: int, device: torch.device) -> int:
    """Split the prefix when (batch x KV heads x M tiles) leaves the GPU's SMs idle, keeping at
    least MIN_SPLIT_ROWS cache rows per split. Sized from the capacity S, not cache_lens, to
    avoid a host sync; splits past a sequence's prefix end early."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(ctas, 1)), capacity // MIN_SPLIT_ROWS))


def attention_forward(q, k_new, v_new, k_cache, v_cache, cache_lens, aux, mask_kind: int, num_masks: int,
                      scale: float, out, lse, num_splits: int | None = None) -> None:
    """Launch the flash-decoding kernel (and the combine pass when split).

    aux is the packed tree mask [B, N, W] (MASK_TREE), new_lens [B] (MASK_DRAFT) or None.
    num_splits=None picks the split count from the grid size and the cache capacity; the
    last dim of every tensor must be contiguous and lse contiguous.
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
    m_total = group * N
    BLOCK_M = 16 if m_total <= 16 else (32 if m_total <= 32 else 64)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    m_tiles = triton.cdiv(m_total, BLOCK_M)
    if num_splits is None:
        num_splits = _num_splits(B * Hkv * m_tiles, k_cache.shape[2], q.device)
    split_rows = triton.cdiv(triton.cdiv(max(k_cache.shape[2], 1), num_splits), BLOCK_N) * BLOCK_N
    if aux is None:
        aux, aux_strides = cache_lens, (0, 0)
    elif mask_kind == MASK_TREE:
        assert aux.dtype == torch.int64 and aux.stride(-1) == 1, "tree_mask: int64 words, contiguous last dim"
        aux_strides = (aux.stride(0), aux.stride(1))
    else:
        aux, aux_strides = aux.to(torch.int64).contiguous(), (0, 0)
    split = num_splits > 1
    with on_device(q):
        _launch(q, k_new, v_new, k_cache, v_cache, cache_lens, aux, aux_strides, out, lse, scale, N, num_masks, Hkv,
                group, Hq, D, mask_kind, split, num_splits, split_rows, m_total, m_tiles, BLOCK_M, BLOCK_N, BLOCK_D)


def _launch(q, k_new, v_new, k_cache, v_cache, cache_lens, aux, aux_strides, out, lse, scale, N, num_masks, Hkv,
            group, Hq, D, mask_kind, split, num_splits, split_rows, m_total, m_tiles, BLOCK_M, BLOCK_N, BLOCK_D):
    B = q.shape[0]
    if split:
        part_out = torch.empty(B * Hkv * num_splits * m_total, BLOCK_D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B * Hkv * num_splits * m_total, dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out, lse
    _attention_fwd_kernel[(B * Hkv, m_tiles, num_splits)](
        q, k_new, v_new, k_cache, v_cache, cache_lens, aux, out, lse, part_out, part_lse,
        scale * 1.4426950408889634, N, num_masks, Hkv, group, split_rows,
        q.stride(0), q.stride(1), q.stride(2), k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *aux_strides, D=D, MASK=mask_kind, SPLIT=split, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    if split:
        _combine_splits_kernel[(B * Hq * N,)](
            part_out, part_lse, out, lse, N, Hq, Hkv, group, num_splits, out.stride(0), out.stride(1), out.stride(2),
            D=D, BLOCK_D=BLOCK_D, BLOCK_S=triton.next_power_of_2(num_splits))


def _fwd_signature(dtype: str) -> dict:
    ptr = "*" + dtype
    sig = {"q_ptr": ptr, "kn_ptr": ptr, "vn_ptr": ptr, "kc_ptr": ptr, "vc_ptr": ptr, "cache_lens_ptr": "*i64",
           "aux_ptr": "*i64", "out_ptr": ptr, "lse_ptr": "*fp32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
           "qk_scale": "fp32"}
    for name in ("n_rows", "num_masks", "n_kv_heads", "group", "split_rows", "sq_b", "sq_h", "sq_n",
                 "skn_b", "skn_h", "skn_n", "svn_b", "svn_h", "svn_n", "skc_b", "skc_h", "skc_s",
                 "svc_b", "svc_h", "svc_s", "so_b", "so_h", "so_n", "sa_b", "sa_n"):
        sig[name] = "i32"
    for name in ("D", "MASK", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
        sig[name] = "constexpr"
    return sig


def aot_specs(mask_kind: int) -> list:
    """AOT compile specs for one mask kind: the dtypes, head dims (incl. a padded odd one),
    tile shapes and both the split and the direct epilogue."""
    specs = []
    for dtype, D, block_m, split in (("fp16", 128, 64, False), ("bf16", 64, 16, True), ("fp32", 80, 32, True),
                                     ("fp16", 96, 64, True), ("bf16", 200, 16, False)):
        block_d = max(16, triton.next_power_of_2(D))
        specs.append((_attention_fwd_kernel, _fwd_signature(dtype),
                      {"D": D, "MASK": mask_kind, "SPLIT": split, "BLOCK_M": block_m,
                       "BLOCK_N": 64 if block_d <= 128 else 32, "BLOCK_D": block_d}))
    for dtype, D in (("fp16", 128), ("fp32", 80)):
        block_d = max(16, triton.next_power_of_2(D))
        specs.append((_combine_splits_kernel,
                      {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*" + dtype, "lse_ptr": "*fp32",
                       "n_rows": "i32", "n_q_heads": "i32", "n_kv_heads": "i32", "group": "i32", "n_splits": "i32",
                       "so_b": "i32", "so_h": "i32", "so_n": "i32",
                       "D": "constexpr", "BLOCK_D": "constexpr", "BLOCK_S": "constexpr"},
                      {"D": D, "BLOCK_D": block_d, "BLOCK_S": 8}))
    return specs
