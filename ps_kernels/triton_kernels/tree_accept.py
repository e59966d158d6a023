"""tree_accept in Triton: one program per sequence walks its tree on the device.

The program holds the tree (parents, tokens) of its sequence in registers, finds children by a
masked min over that block (children have larger indices than their parent, and are tried in
index order), and does the V-wide work at the current node only: the argmax in blocks (greedy),
or the sums, the residual update and the inverse-CDF draw in float64 (sample), as the reference
does. The residual distribution lives in a float64 scratch row [B, V] from the first rejection at
a node on; barriers separate its writes from other threads' reads."""
import torch
import triton
import triton.language as tl

from . import on_device

BLOCK_V = 2048  # vocabulary entries per step of the V-wide loops (8 per thread at 8 warps)


@triton.jit
def _row_sum(row_ptr, V, BLOCK_V: tl.constexpr):
    total = tl.zeros([], tl.float64)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        total += tl.sum(tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float64), 0)
    return total


@triton.jit
def _load_weights(row_ptr, resid_ptr, from_resid, offs, V):
    # The residual when from_resid, else the target row: one of the two loads is masked off
    # entirely (and reads nothing), so the sum is the other. (The flag goes into the bound, not
    # into `mask & flag`: the interpreter mistypes a block & scalar-bool mask.)
    row_end = tl.where(from_resid == 0, V, 0)
    w_row = tl.load(row_ptr + offs, mask=offs < row_end, other=0.0).to(tl.float64)
    w_res = tl.load(resid_ptr + offs, mask=offs < V - row_end, other=0.0)
    return w_row + w_res


@triton.jit
def _inverse_cdf(row_ptr, resid_ptr, from_resid, u, V, BLOCK_V: tl.constexpr):
    # The smallest v with cdf[v] > u * total and w[v] > 0 (exact arithmetic never picks a zero
    # weight; the guard keeps rounding from doing so); none: the last positive weight, else V - 1.
    total = tl.zeros([], tl.float64)
    last_positive = tl.full([], -1, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        w = _load_weights(row_ptr, resid_ptr, from_resid, offs, V)
        total += tl.sum(w, 0)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0, offs, -1), 0))
    threshold = u * total
    prefix = tl.zeros([], tl.float64)
    found = tl.full([], V, tl.int32)
    v0 = 0
    while (v0 < V) & (found == V):
        offs = v0 + tl.arange(0, BLOCK_V)
        w = _load_weights(row_ptr, resid_ptr, from_resid, offs, V)
        cdf = prefix + tl.cumsum(w, 0)
        found = tl.min(tl.where((cdf > threshold) & (w > 0), offs, V), 0)
        prefix += tl.sum(w, 0)
        v0 += BLOCK_V
    return tl.where(found < V, found, tl.where(last_positive >= 0, last_positive, V - 1))


# Shapes and strides vary call to call: one compiled kernel per (dtype, mode, BLOCK_N), not per
# divisibility pattern of each integer.
@triton.jit(do_not_specialize=["parents_stride", "target_stride_b", "target_stride_n", "draft_stride_b",
                               "draft_stride_n", "N", "V"])
def _tree_accept_kernel(tokens_ptr, parents_ptr, parents_stride, target_ptr, target_stride_b, target_stride_n,
                        draft_ptr, draft_stride_b, draft_stride_n, uniforms_ptr, scratch_ptr,
                        accept_index_ptr, accept_lens_ptr, next_token_ptr, N, V,
                        SAMPLE: tl.constexpr, HAS_DRAFT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    nodes = tl.arange(0, BLOCK_N)
    par = tl.load(parents_ptr + b * parents_stride + nodes, mask=nodes < N, other=-2)
    tok = tl.load(tokens_ptr + b * N + nodes, mask=nodes < N, other=-1)
    resid_ptr = scratch_ptr + b * V
    path = tl.where(nodes == 0, 0, -1).to(tl.int64)
    length = tl.full([], 1, tl.int32)
    cur = tl.full([], 0, tl.int32)
    next_token = tl.full([], 0, tl.int32)
    walking = tl.full([], 1, tl.int32)
    while walking != 0:
        row_ptr = target_ptr + b * target_stride_b + cur * target_stride_n
        # `nodes > cur` keeps the walk moving forward (and finite) even on a malformed tree.
        is_child = (par == cur) & (nodes > cur)
        if SAMPLE:
            total = _row_sum(row_ptr, V, BLOCK_V)
            have_resid = tl.full([], 0, tl.int32)
            accepted = tl.full([], -1, tl.int32)
            c = tl.min(tl.where(is_child, nodes, BLOCK_N), 0)
            trying = (c < N) & (total > 0)
            while trying:
                t = tl.load(tokens_ptr + b * N + c)
                in_vocab = (t >= 0) & (t < V)  # out of range (unvalidated input): probability 0
                t = tl.where(in_vocab, t, 0)
                p = tl.where(have_resid != 0, tl.load(resid_ptr + t), tl.load(row_ptr + t).to(tl.float64))
                p = tl.where(in_vocab, p, 0.0)
                u = tl.load(uniforms_ptr + b * N + c).to(tl.float64)
                if HAS_DRAFT:
                    q_ptr = draft_ptr + b * draft_stride_b + c * draft_stride_n
                    q_t = tl.where(in_vocab, tl.load(q_ptr + t).to(tl.float64), 0.0)
                    ratio = tl.minimum((p / total) / tl.maximum(q_t, 1e-30), 1.0)
                else:
                    ratio = p / total
                take = u < ratio
                if take:
                    accepted = c
                else:
                    if HAS_DRAFT:
                        # r <- max(0, r / total - q_c); each element is read and written by the
                        # same thread, so the in-place update needs no barrier inside the loop.
                        tl.debug_barrier()
                        new_total = tl.zeros([], tl.float64)
                        for v0 in range(0, V, BLOCK_V):
                            offs = v0 + tl.arange(0, BLOCK_V)
                            w = _load_weights(row_ptr, resid_ptr, have_resid, offs, V)
                            q = tl.load(q_ptr + offs, mask=offs < V, other=0.0).to(tl.float64)
                            r = tl.maximum(w / total - q, 0.0)
                            tl.store(resid_ptr + offs, r, mask=offs < V)
                            new_total += tl.sum(r, 0)
                        tl.debug_barrier()
                        total = new_total
                        have_resid = tl.full([], 1, tl.int32)
                    else:
                        if p > 0:  # r[t] <- 0; a duplicated sibling token finds it zero already
                            tl.debug_barrier()
                            if have_resid == 0:
                                for v0 in range(0, V, BLOCK_V):
                                    offs = v0 + tl.arange(0, BLOCK_V)
                                    x = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float64)
                                    tl.store(resid_ptr + offs, x, mask=offs < V)
                                tl.debug_barrier()
                            tl.store(resid_ptr + t, 0.0)
                            tl.debug_barrier()
                            total = _row_sum(resid_ptr, V, BLOCK_V)
                            have_resid = tl.full([], 1, tl.int32)
                c = tl.min(tl.where(is_child & (nodes > c), nodes, BLOCK_N), 0)
                trying = (accepted < 0) & (c < N) & (total > 0)
            if accepted < 0:
                u0 = tl.load(uniforms_ptr + b * N).to(tl.float64)
                next_token = _inverse_cdf(row_ptr, resid_ptr, have_resid, u0, V, BLOCK_V)
            nxt = tl.where(accepted < 0, BLOCK_N, accepted)
        else:
            best = tl.full([], float("-inf"), tl.float32)
            want = tl.full([], 0, tl.int32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                block_max = tl.max(x, 0)
                # tl.argmax takes the first maximum in a block; a later block wins only when
                # strictly larger: torch.argmax's first-index rule.
                block_arg = tl.argmax(x, 0) + v0
                want = tl.where(block_max > best, block_arg, want)
                best = tl.maximum(best, block_max)
            nxt = tl.min(tl.where(is_child & (tok == want), nodes, BLOCK_N), 0)
            next_token = want
        moved = nxt < N
        path = tl.where(nodes == tl.where(moved, length, -1), nxt.to(tl.int64), path)
        length += moved.to(tl.int32)
        cur = tl.where(moved, nxt, cur)
        walking = moved.to(tl.int32)
    tl.store(accept_index_ptr + b * N + nodes, path, mask=nodes < N)
    tl.store(accept_lens_ptr + b, length.to(tl.int64))
    tl.store(next_token_ptr + b, next_token.to(tl.int64))


def tree_accept(tokens, parents, target, sample, draft_probs, uniforms):
    B, N = tokens.shape
    V = target.shape[2]
    dev = tokens.device
    tokens = tokens.contiguous()
    parents = parents.contiguous()
    if sample:  # the kernel indexes uniforms as a dense [B, N] (b * N + c)
        uniforms = uniforms.contiguous()
    accept_index = torch.empty(B, N, dtype=torch.int64, device=dev)
    accept_lens = torch.empty(B, dtype=torch.int64, device=dev)
    next_token = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return accept_index, accept_lens, next_token
    # Pointers a mode never reads still need a tensor: the target stands in.
    scratch = torch.empty(B, V, dtype=torch.float64, device=dev) if sample else target
    draft = draft_probs if draft_probs is not None else target
    with on_device(tokens):
        _tree_accept_kernel[(B,)](
            tokens, parents, N if parents.dim() == 2 else 0, target, target.stride(0), target.stride(1),
            draft, draft.stride(0), draft.stride(1), uniforms if sample else target, scratch,
            accept_index, accept_lens, next_token, N, V,
            SAMPLE=sample, HAS_DRAFT=draft_probs is not None,
            BLOCK_N=max(16, triton.next_power_of_2(N)), BLOCK_V=BLOCK_V, num_warps=8)
    return accept_index, accept_lens, next_token


def _spec(target: str, uniforms: str, sample: bool, draft: bool, block_n: int):
    signature = {
        "tokens_ptr": "*i64", "parents_ptr": "*i64", "parents_stride": "i32", "target_ptr": target,
        "target_stride_b": "i64", "target_stride_n": "i32", "draft_ptr": target, "draft_stride_b": "i64",
        "draft_stride_n": "i32", "uniforms_ptr": uniforms, "scratch_ptr": "*fp64", "accept_index_ptr": "*i64",
        "accept_lens_ptr": "*i64", "next_token_ptr": "*i64", "N": "i32", "V": "i32",
        "SAMPLE": "constexpr", "HAS_DRAFT": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr"}
    return (_tree_accept_kernel, signature,
            {"SAMPLE": sample, "HAS_DRAFT": draft, "BLOCK_N": block_n, "BLOCK_V": BLOCK_V})


AOT_SPECS = [
    _spec("*fp32", "*fp32", False, False, 16),
    _spec("*bf16", "*fp32", False, False, 64),
    _spec("*fp16", "*fp32", True, False, 64),
    _spec("*fp32", "*fp32", True, True, 16),
    _spec("*bf16", "*fp64", True, True, 1024),
]
