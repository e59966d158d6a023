"""What test_tree_attention.py and test_draft_attention.py share: the backends to run, random
inputs, and the FlashInfer-style accuracy check (a backend may err at most ~2x what PyTorch
itself makes in the same dtype, against an fp64 computation from the same inputs)."""
import importlib.util

import pytest
import torch

from helpers import DEVICE, runnable_backends

# allowed on top of 2x the yardstick: fp32 noise where PyTorch happens to err less
ATOL_FLOOR = 1e-5


def backends(op: str):
    """runnable_backends(op), with the Triton backend skipped while its kernel module is absent
    (it is written on another branch)."""
    params = []
    for p in runnable_backends(op):
        name = p.values[0]
        if (name == "triton" and not p.marks
                and importlib.util.find_spec(f"ps_kernels.triton_kernels.{op}") is None):
            p = pytest.param(name, id=name, marks=[pytest.mark.skip(
                reason=f"ps_kernels/triton_kernels/{op}.py is not present on this branch")])
        params.append(p)
    return params


def interpreted(backend: str) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def dtypes(backend: str):
    # bf16 keeps raw bits in the Triton interpreter
    return [torch.float32, torch.float16] if interpreted(backend) else [torch.float32, torch.float16, torch.bfloat16]


def draw_layout(data, backend: str, max_batch: int):
    """Hypothesis draws shared by the attention tests: (interp, dtype, B, Hkv, group, D, prefix
    lengths (0 often), scale)."""
    from hypothesis import strategies as st
    interp = interpreted(backend)
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    B = data.draw(st.integers(1, 2 if interp else max_batch), label="B")
    Hkv = data.draw(st.integers(1, 2 if interp else 3), label="Hkv")
    group = data.draw(st.sampled_from([1, 2, 3] if interp else [1, 2, 3, 8]), label="group")
    D = data.draw(st.sampled_from([40, 64] if interp else [40, 64, 72, 80, 96, 128]), label="D")
    max_p = 24 if interp else 300
    prefix = data.draw(st.lists(st.one_of(st.just(0), st.integers(0, max_p)), min_size=B, max_size=B), label="P")
    scale = data.draw(st.sampled_from([None, 0.05, 1.0]), label="scale")
    return interp, dtype, B, Hkv, group, D, prefix, scale


def random_qkv_cache(rng: torch.Generator, B, Hq, Hkv, rows, D, S, dtype, q_gain=1.0):
    """q [B, Hq, rows, D], k_new/v_new [B, Hkv, rows, D], k_cache/v_cache [B, Hkv, S, D] (random
    contents everywhere, so a row written where it should not be is seen)."""
    def rnd(*shape, gain=1.0):
        return (torch.randn(*shape, generator=rng) * gain).to(dtype).to(DEVICE)
    return (rnd(B, Hq, rows, D, gain=q_gain), rnd(B, Hkv, rows, D), rnd(B, Hkv, rows, D),
            rnd(B, Hkv, S, D), rnd(B, Hkv, S, D))


def random_parents(rng: torch.Generator, n: int) -> torch.Tensor:
    """A random tree in topological order: parents[0] = -1, parents[i] uniform in [0, i)."""
    parents = torch.full((n,), -1, dtype=torch.int64)
    for i in range(1, n):
        parents[i] = int(torch.randint(0, i, (1,), generator=rng))
    return parents


def clone_all(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def upcast(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check_against_reference(run_backend, run_reference, args, cache_slots=(3, 4)):
    """run_backend(args) and run_reference(args) each return (out, lse) and write the caches at
    args[cache_slots]. Checks: the caches equal the reference's exactly, lse matches the fp32
    reference, out errs at most 2x what the reference run on the inputs' dtype errs (it computes
    in fp32 and rounds to the dtype), both against the reference run in fp64 on the same
    inputs. Returns (out, lse)."""
    mine, low, high = clone_all(args), clone_all(args), upcast(clone_all(args))
    out, lse = run_backend(mine)
    ref_out, _ = run_reference(low)
    truth, truth_lse = run_reference(high)
    for slot in cache_slots:
        assert torch.equal(mine[slot], low[slot]), f"cache argument {slot} differs from the reference"
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert lse.dtype == torch.float32 and lse.shape == args[0].shape[:3]
    torch.testing.assert_close(lse, truth_lse.float(), atol=1e-4, rtol=1e-5)
    err = (out.float() - truth).abs().max().item() if out.numel() else 0.0
    yardstick = (ref_out.float() - truth).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * yardstick + ATOL_FLOOR, \
        f"max error {err:.3g} vs PyTorch's {yardstick:.3g} in {args[0].dtype} (allowed 2x + {ATOL_FLOOR})"
    return out, lse


def check_native_refuses(op: str, args, match: str) -> None:
    """With validate=False the native backend skips the Python checks: its binding must still
    refuse `args` (RuntimeError matching `match`) and write nothing to the caches (args[3:5])."""
    import ps_kernels

    reason = ps_kernels._backend.why_unavailable(op, "cpu", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    before = [a.clone() for a in args[3:5]]
    with pytest.raises(RuntimeError, match=match):
        getattr(ps_kernels, op)(*args, validate=False, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(args[3:5], before))


# ---------------------------------------------------------------- the features' contract, spelled out
# An independent formulation of the window / soft-cap / sink contract (docs in the references):
# every query's and key's absolute position is computed from the parents (tree) or the row
# layout (draft), never from the mask's popcount, and each (query, key) pair is decided on its
# own. Loops over rows: for small fp64 cases only.

def _attend_row(q_row, keys, vals, visible, scale, softcap, sink_logits):
    """q_row [Hq, D], keys/vals [Hq, K, D], visible list of key indices -> (out [Hq, D], lse [Hq])."""
    Hq, D = q_row.shape
    if not visible:
        return torch.zeros(Hq, D, dtype=q_row.dtype), torch.full((Hq,), float("-inf"), dtype=q_row.dtype)
    idx = torch.tensor(visible)
    s = torch.einsum("hd,hkd->hk", q_row, keys[:, idx]) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    terms = s.exp()
    denom = terms.sum(-1)
    if sink_logits is not None:
        denom = denom + sink_logits.to(s.dtype).exp()
    p = terms / denom[:, None]
    return torch.einsum("hk,hkd->hd", p, vals[:, idx]), denom.log()


def spelled_out_tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, parents, scale, window=None,
                               softcap=None, sinks=None):
    """q [B, Hq, N, D] fp64, parents [B, N] (None: the causal chain) -> (out, lse): node i at
    position P + depth(i) (depth by walking up the parents) sees prefix row r (position r) and
    its ancestors-or-self j (position P + depth(j)) within the window. Reads the prefix from the
    caches' first P rows and the nodes' keys from k_new / v_new; writes nothing."""
    kc, vc = k_cache, v_cache
    B, Hq, N, D = q.shape
    group = Hq // k_new.shape[1]
    out = torch.zeros_like(q)
    lse = torch.empty(B, Hq, N, dtype=q.dtype)
    for b in range(B):
        P = int(cache_lens[b])
        par = list(range(-1, N - 1)) if parents is None else [int(x) for x in parents[b]]
        ancestors = []
        for i in range(N):  # ancestors-or-self by walking up the parents
            chain, j = [], i
            while j >= 0:
                chain.append(j)
                j = par[j]
            ancestors.append(set(chain))
        depth = [len(a) - 1 for a in ancestors]
        keys = torch.cat([kc[b, :, :P], k_new[b]], 1).repeat_interleave(group, 0)   # [Hq, P + N, D]
        vals = torch.cat([vc[b, :, :P], v_new[b]], 1).repeat_interleave(group, 0)
        pos_k = list(range(P)) + [P + depth[j] for j in range(N)]
        for i in range(N):
            pos_q = P + depth[i]
            visible = [c for c in range(P + N)
                       if (c < P or (c - P) in ancestors[i]) and (window is None or pos_q - pos_k[c] < window)]
            out[b, :, i], lse[b, :, i] = _attend_row(q[b, :, i], keys, vals, visible, scale, softcap, sinks)
    return out, lse


def spelled_out_draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale,
                                window=None, softcap=None, sinks=None):
    """q [B, Hq, T, D] fp64 -> (out, lse): real row t at position P + t sees cache rows and real
    rows 0..t; mask slot j at P + r + j sees cache rows, all r real rows and slots 0..j; padding
    rows see nothing (out 0, lse -inf)."""
    B, Hq, T, D = q.shape
    group = Hq // k_new.shape[1]
    M, R = num_masks, T - num_masks
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=q.dtype)
    for b in range(B):
        P, r = int(cache_lens[b]), int(new_lens[b])
        # keys: (row of k_cache / k_new, its position, kind)
        key_list = [("cache", c, c) for c in range(P)] + [("real", t, P + t) for t in range(r)] + \
                   [("slot", R + j, P + r + j) for j in range(M)]
        empty = torch.zeros(k_new.shape[1], 0, D, dtype=q.dtype)
        keys = torch.stack([(k_cache if kind == "cache" else k_new)[b, :, i] for kind, i, _ in key_list], 1) \
            if key_list else empty
        vals = torch.stack([(v_cache if kind == "cache" else v_new)[b, :, i] for kind, i, _ in key_list], 1) \
            if key_list else empty
        keys, vals = keys.repeat_interleave(group, 0), vals.repeat_interleave(group, 0)
        queries = [("real", t, P + t) for t in range(r)] + [("slot", R + j, P + r + j) for j in range(M)]
        for kind_q, row, pos_q in queries:
            visible = []
            for c, (kind_k, i, pos_k) in enumerate(key_list):
                if kind_k == "cache":
                    ok = True
                elif kind_k == "real":
                    ok = kind_q == "slot" or i <= row
                else:
                    ok = kind_q == "slot" and i <= row
                if ok and (window is None or pos_q - pos_k < window):
                    visible.append(c)
            out[b, :, row], lse[b, :, row] = _attend_row(q[b, :, row], keys, vals, visible, scale, softcap, sinks)
    return out, lse
