"""The attention features (sliding window, logit soft-cap, attention sinks) and the split plan
in the Triton and CUDA kernels, against a dense formulation of the contract (every key's
position and score spelled out, fp64), over odd shapes: windows smaller than, equal to and
larger than the prefix, deep tree nodes, GQA, ragged prefixes, padding draft rows, the split
path with and without a plan's workspace. Triton runs in the interpreter on a CPU (fp32/fp16:
bf16 is broken there); CUDA only on a GPU.

The kernels are called at the backend level (the launchers' and the native schema's argument
order), so these tests do not depend on the op layer."""
import math

import pytest
import torch

import ps_kernels
from ps_kernels import _backend
from ps_kernels import reference as ref

from attention_cases import check_against_reference, random_parents, random_qkv_cache
from helpers import DEVICE

INTERPRETED = DEVICE.type == "cpu"


def _triton_reason():
    return _backend.why_unavailable("tree_attention", "triton", DEVICE)


def _cuda_reason():
    reason = _backend.why_unavailable("tree_attention", "cuda", DEVICE)
    if reason is None and not hasattr(torch.ops.ps_kernels_C, "tree_attention_planned"):
        reason = "the native library has no tree_attention_planned (built without the CUDA bindings)"
    return reason


BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(_triton_reason() is not None,
                                                            reason=str(_triton_reason()))),
            pytest.param("cuda", marks=pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason())))]
DTYPES = [torch.float32, torch.float16] if INTERPRETED else [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- the contract, spelled out

def _attend(q, keys, vals, allowed, scale, softcap, sinks):
    """q [Hq, n, D], keys/vals [Hq, s, D], allowed [Hq or 1, n, s] -> out [Hq, n, D], lse [Hq, n]
    with the soft-cap on the scaled scores and the per-head sink in the denominator."""
    scores = torch.einsum("hnd,hsd->hns", q, keys) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype)[:, None, None].expand(-1, scores.shape[1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("hns,hsd->hnd", p, vals), lse


def dense_tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window, softcap, sinks):
    B, Hq, N, D = q.shape
    group = Hq // k_new.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    tree = ref.unpack_tree_mask(tree_mask, N, B, q.device)          # [B, N, N]
    depth = tree.sum(-1) - 1                                          # ancestors-or-self - 1
    out, lse = torch.empty_like(q), torch.empty(B, Hq, N, dtype=acc, device=q.device)
    for b in range(B):
        P = int(cache_lens[b])
        k_cache[b, :, P:P + N] = k_new[b]
        v_cache[b, :, P:P + N] = v_new[b]
        keys = k_cache[b, :, :P + N].to(acc).repeat_interleave(group, 0)
        vals = v_cache[b, :, :P + N].to(acc).repeat_interleave(group, 0)
        allowed = torch.cat([torch.ones(N, P, dtype=torch.bool, device=q.device), tree[b]], dim=1)
        if window:
            pos_q = P + depth[b]
            pos_k = torch.cat([torch.arange(P, device=q.device), P + depth[b]])
            allowed &= (pos_q[:, None] - pos_k[None, :]) < window
        o, lse[b] = _attend(q[b].to(acc), keys, vals, allowed[None], scale, softcap, sinks)
        out[b] = o.to(q.dtype)
    return out, lse


def dense_draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale, window, softcap,
                          sinks):
    B, Hq, T, D = q.shape
    group = Hq // k_new.shape[1]
    M, R = num_masks, T - num_masks
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=acc, device=q.device)
    for b in range(B):
        P, r = int(cache_lens[b]), int(new_lens[b])
        k_cache[b, :, P:P + r] = k_new[b, :, :r]
        v_cache[b, :, P:P + r] = v_new[b, :, :r]
        rows = list(range(r)) + list(range(R, T))
        keys = torch.cat([k_cache[b, :, :P + r], k_new[b, :, R:]], dim=1).to(acc).repeat_interleave(group, 0)
        vals = torch.cat([v_cache[b, :, :P + r], v_new[b, :, R:]], dim=1).to(acc).repeat_interleave(group, 0)
        allowed = torch.zeros(r + M, P + r + M, dtype=torch.bool, device=q.device)
        allowed[:, :P] = True
        allowed[:r, P:P + r] = torch.ones(r, r, dtype=torch.bool).tril()
        allowed[r:, P:P + r] = True
        allowed[r:, P + r:] = torch.ones(M, M, dtype=torch.bool).tril()
        if window:
            pos = torch.arange(P + r + M, device=q.device)    # cache rows, real rows, then mask slots
            allowed &= (pos[P:, None] - pos[None, :]) < window
        o, lse[b, :, rows] = _attend(q[b, :, rows].to(acc), keys, vals, allowed[None], scale, softcap, sinks)
        out[b, :, rows] = o.to(q.dtype)
    return out, lse


def _reference_has_features() -> bool:
    import inspect
    return "window" in inspect.signature(ref.tree_attention).parameters


def reference_tree(args, scale, window, softcap, sinks):
    """The specification: ps_kernels.reference once it has the features, the dense form above
    until then."""
    if _reference_has_features():
        return ref.tree_attention(*args, scale=scale, window=window or None, softcap=softcap or None, sinks=sinks,
                                  return_lse=True)
    return dense_tree_attention(*args, scale, window, softcap, sinks)


def reference_draft(args, scale, window, softcap, sinks):
    if _reference_has_features():
        return ref.draft_attention(*args, scale=scale, window=window or None, softcap=softcap or None, sinks=sinks,
                                   return_lse=True)
    return dense_draft_attention(*args, scale, window, softcap, sinks)


# ---------------------------------------------------------------- the backends, as the op layer calls them

def _outputs(q):
    B, Hq, N, _ = q.shape
    return torch.empty_like(q), torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)


def run_tree(backend, args, scale, window, softcap, sinks, plan=None):
    """plan: None (planned inside the call) or (num_splits, split_rows, workspace)."""
    q, k_new, v_new, k_cache, v_cache, cache_lens, mask = args
    out, lse = _outputs(q)
    mask = None if mask is None else (mask.expand(q.shape[0], -1, -1) if mask.dim() == 2 else mask).contiguous()
    if backend == "triton":
        from ps_kernels.triton_kernels.tree_attention import tree_attention
        tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale, window, softcap, sinks, out, lse,
                       *(plan or ()))
    elif plan is None:
        torch.ops.ps_kernels_C.tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale, window,
                                              softcap, sinks, out, lse)
    else:
        torch.ops.ps_kernels_C.tree_attention_planned(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale,
                                                      window, softcap, sinks, out, lse, *plan)
    return out, lse


def run_draft(backend, args, scale, window, softcap, sinks, plan=None):
    q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks = args
    out, lse = _outputs(q)
    if backend == "triton":
        from ps_kernels.triton_kernels.draft_attention import draft_attention
        draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale, window, softcap,
                        sinks, out, lse, *(plan or ()))
    elif plan is None:
        torch.ops.ps_kernels_C.draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks,
                                               scale, window, softcap, sinks, out, lse)
    else:
        torch.ops.ps_kernels_C.draft_attention_planned(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens,
                                                       num_masks, scale, window, softcap, sinks, out, lse, *plan)
    return out, lse


def forced_splits(backend, num_splits, q, split_rows):
    """A plan with `num_splits` splits of split_rows rows and a fresh workspace sized for it."""
    B, Hq, N, D = q.shape
    pitch = max(16, 1 << (D - 1).bit_length()) if backend == "triton" else D   # Triton pads rows to BLOCK_D
    workspace = torch.full((B * Hq * N * num_splits * (pitch + 1),), float("nan"), device=q.device)
    return num_splits, split_rows, workspace


# ---------------------------------------------------------------- cases

def sinks_for(Hq, gen, on=True):
    return (torch.randn(Hq, generator=gen) * 2).to(DEVICE) if on else None


def tree_case(gen, dtype, B, Hkv, group, N, D, prefix, mask_kind, extra=3):
    S = max(prefix) + N + extra
    q, k, v, kc, vc = random_qkv_cache(gen, B, Hkv * group, Hkv, N, D, S, dtype)
    lens = torch.tensor(prefix, dtype=torch.int64, device=DEVICE)
    if mask_kind == "causal":
        mask = None
    elif mask_kind == "chain_then_bushy":   # deep nodes: a chain of N // 2, the rest hanging off it
        parents = torch.arange(-1, N - 1)
        parents[N // 2:] = torch.randint(max(0, N // 2 - 3), N // 2, (N - N // 2,), generator=gen)
        mask = ps_kernels.tree_mask_from_parents(parents).to(DEVICE)
    else:
        mask = ps_kernels.tree_mask_from_parents(torch.stack([random_parents(gen, N) for _ in range(B)])).to(DEVICE)
    return [q, k, v, kc, vc, lens, mask]


def check_tree(backend, args, scale, window, softcap, sinks, plan=None):
    return check_against_reference(lambda a: run_tree(backend, a, scale, window, softcap, sinks, plan),
                                   lambda a: reference_tree(a, scale, window, softcap, sinks), args)


def check_draft(backend, args, scale, window, softcap, sinks, plan=None):
    return check_against_reference(lambda a: run_draft(backend, a, scale, window, softcap, sinks, plan),
                                   lambda a: reference_draft(a, scale, window, softcap, sinks), args)


# prefixes 0 and 13 (ragged); windows below, at and above the longer prefix, 1 (self only), and
# one deep enough to cut a node's far ancestors off but not its near ones
TREE_WINDOWS = [1, 3, 13, 14, 40]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", TREE_WINDOWS)
def test_tree_window(backend, window):
    gen = torch.Generator().manual_seed(window)
    N = 12 if INTERPRETED else 40
    for dtype, mask_kind in zip(DTYPES, ["chain_then_bushy", "per_batch", "causal"]):
        args = tree_case(gen, dtype, 2, 2, 2, N, 64, [0, 13], mask_kind)
        check_tree(backend, args, 0.125, window, 0.0, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,with_sinks", [(5.0, False), (0.0, True), (2.5, True)])
def test_tree_softcap_and_sinks(backend, softcap, with_sinks):
    gen = torch.Generator().manual_seed(int(softcap * 10) + with_sinks)
    for dtype in DTYPES:
        # q scaled up so the soft-cap bites (scores well past softcap before it)
        args = tree_case(gen, dtype, 2, 1, 3, 6, 40, [9, 0], "per_batch")
        args[0] = args[0] * 3
        check_tree(backend, args, 1 / math.sqrt(40), 0, softcap, sinks_for(3, gen, with_sinks))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_all_features_split(backend):
    # the split path: the window's run of the prefix cut in 3 (and the rest to the last split),
    # the sink added once by the combine pass; a second call reuses the plan's workspace
    gen = torch.Generator().manual_seed(7)
    P = 70 if INTERPRETED else 700
    args = tree_case(gen, torch.float32, 2, 2, 2, 9, 64, [P, P // 3], "chain_then_bushy")
    sinks = sinks_for(4, gen)
    plan = forced_splits(backend, 3, args[0], 16)
    for window in (P // 2, 0):
        out, lse = check_tree(backend, args, 0.1, window, 4.0, sinks, plan)
        plain_out, plain_lse = run_tree(backend, [a.clone() if torch.is_tensor(a) else a for a in args], 0.1, window,
                                        4.0, sinks)
        torch.testing.assert_close(out, plain_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, plain_lse, atol=1e-5, rtol=1e-5)


def draft_case(gen, dtype, B, Hkv, group, R, M, D, prefix, new_lens):
    T = R + M
    S = max(prefix) + R + 2
    q, k, v, kc, vc = random_qkv_cache(gen, B, Hkv * group, Hkv, T, D, S, dtype)
    return [q, k, v, kc, vc, torch.tensor(prefix, device=DEVICE), torch.tensor(new_lens, device=DEVICE), M]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 4, 11, 12, 30])
def test_draft_window(backend, window):
    gen = torch.Generator().manual_seed(100 + window)
    for dtype in DTYPES:
        # sequence 1 has padding rows (1 real of R = 4); prefixes ragged around the windows
        args = draft_case(gen, dtype, 2, 2, 2, 4, 3, 64, [11, 5], [4, 1])
        check_draft(backend, args, 0.125, window, 0.0, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_softcap_sinks_and_split(backend):
    gen = torch.Generator().manual_seed(5)
    args = draft_case(gen, torch.float32, 2, 1, 3, 3, 2, 40, [0, 50 if INTERPRETED else 600], [2, 0])
    args[0] = args[0] * 3
    sinks = sinks_for(3, gen)
    for window in (0, 20):
        out, lse = check_draft(backend, args, 0.15, window, 3.0, sinks)
        # padding rows keep out 0 and lse -inf with a sink too
        assert torch.all(lse[1, :, :3] == float("-inf")) and torch.all(out[1, :, :3] == 0)
        split_out, split_lse = check_draft(backend, args, 0.15, window, 3.0, sinks,
                                           forced_splits(backend, 4, args[0], 8))
        assert torch.all(split_lse[1, :, :3] == float("-inf")) and torch.all(split_out[1, :, :3] == 0)


def test_window_spans_and_split_plans():
    from ps_kernels.triton_kernels.attention_core import plan_splits, prefix_span

    assert prefix_span(1000, 0) == 1000 and prefix_span(1000, 100) == 99 and prefix_span(50, 100) == 50
    # a window bounds the rows to split: fewer splits than over the whole prefix
    full = plan_splits(1, 8, 2, 1, 128, 32768, 0, 132)
    windowed = plan_splits(1, 8, 2, 1, 128, 32768, 1024, 132)
    assert full[0] > windowed[0] >= 1 and windowed[0] * windowed[1] >= 1023
    assert full[0] * full[1] >= 32768 and full[2] == 1 * 8 * 1 * full[0] * (128 + 1)
    assert plan_splits(64, 32, 8, 16, 128, 4096, 0, 132)[0] == 1     # a full grid: no split, no workspace
    assert plan_splits(64, 32, 8, 16, 128, 4096, 0, 132)[2] == 0


def test_popcount_positions_in_the_interpreter():
    # tree depths come from popcounts of mask rows, high words and the sign bit included
    if _triton_reason() is not None or not INTERPRETED:
        pytest.skip("interpreter check (the GPU tests run the same kernels)")
    gen = torch.Generator().manual_seed(3)
    N = 70   # two mask words; a chain makes depths up to 69, node 63's bit is the sign bit
    args = tree_case(gen, torch.float32, 1, 1, 1, N, 16, [5], "causal")
    args[6] = ps_kernels.tree_mask_from_parents(torch.arange(-1, N - 1)).to(DEVICE)
    check_tree("triton", args, 0.25, 7, 0.0, None)
