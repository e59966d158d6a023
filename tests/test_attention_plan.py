"""The attention plan made once per decoding step (ps_kernels.attention_plan, the ops' plan=):
the CUDA planner registered by the native library against its Python mirror, the plan's
invariants, a CPU plan that changes nothing, a Triton plan whose splits and workspace the kernel
uses (in the interpreter on a CPU), and a plan made for another call refused by name."""
import itertools

import pytest
import torch

import ps_kernels
from ps_kernels import _backend
from ps_kernels import reference as ref
from ps_kernels.ops.attention_plan import cuda_split_plan, native_split_plan

from attention_cases import random_parents, random_qkv_cache
from helpers import DEVICE

CPU = torch.device("cpu")
NATIVE = _backend.why_unavailable("tree_attention", "cpu", CPU)


def _tree(gen, B=2, Hq=4, Hkv=2, N=5, D=64, prefix=(7, 0), dtype=torch.float32, device=DEVICE):
    S = max(prefix) + N + 2
    q, k, v, kc, vc = random_qkv_cache(gen, B, Hq, Hkv, N, D, S, dtype)
    mask = ps_kernels.tree_mask_from_parents(torch.stack([random_parents(gen, N) for _ in range(B)]))
    return [t.to(device) for t in (q, k, v, kc, vc, torch.tensor(prefix), mask)]


def _draft(gen, B=2, Hq=4, Hkv=2, R=3, M=2, D=64, prefix=(7, 0), new_lens=(3, 1), device=DEVICE):
    S = max(prefix) + R + 2
    q, k, v, kc, vc = random_qkv_cache(gen, B, Hq, Hkv, R + M, D, S, torch.float32)
    return [t.to(device) for t in (q, k, v, kc, vc, torch.tensor(prefix), torch.tensor(new_lens))] + [M]


def _plan_of(op, args, window=None, **kw):
    q, k = args[0], args[1]
    B, Hq, rows, D = q.shape
    return ps_kernels.attention_plan(op, batch=B, q_heads=Hq, kv_heads=k.shape[1], rows=rows, head_dim=D,
                                     max_prefix=args[3].shape[2], window=window, device=q.device, **kw)


def _clone(args):
    return [a.clone() if torch.is_tensor(a) else a for a in args]


# ---------------------------------------------------------------- the planner

SHAPES = list(itertools.product([1, 3, 16], [(8, 2), (32, 8), (9, 3), (14, 2)], [1, 7, 64], [64, 128],
                                [0, 255, 256, 1000, 32768], [0, 1, 100, 4096], [108, 132]))


@pytest.mark.skipif(NATIVE is not None, reason=str(NATIVE))
def test_native_planner_matches_its_python_mirror():
    """ps_kernels_C::attention_split_plan (csrc/cuda/attention_plan.h, in every native build)
    and cuda_split_plan agree on a grid of shapes (so a plan made without the library splits as
    the kernels would)."""
    assert native_split_plan(1, 8, 2, 1, 128, 32768, 0, 132) is not None
    for batch, (hq, hkv), rows, d, prefix, window, sms in SHAPES:
        shape = (batch, hq, hkv, rows, d, prefix, window, sms)
        assert native_split_plan(*shape) == cuda_split_plan(*shape), shape


def test_cuda_plan_invariants():
    for batch, (hq, hkv), rows, d, prefix, window, sms in SHAPES:
        splits, split_rows, floats = cuda_split_plan(batch, hq, hkv, rows, d, prefix, window, sms)
        span = window - 1 if 0 < window <= prefix else prefix
        assert splits >= 1 and split_rows % 32 == 0 and splits * split_rows >= max(span, 1)
        assert splits == 1 or split_rows >= 256 - 31          # every split streams enough rows to pay
        assert floats == (batch * hq * rows * splits * (d + 1) if splits > 1 else 0)
    # decode on a big GPU: the prefix split to fill the SMs; a window bounds the rows split
    assert cuda_split_plan(1, 8, 2, 1, 128, 32768, 0, 132)[0] == 128
    assert cuda_split_plan(1, 8, 2, 1, 128, 32768, 1024, 132)[0] == 3
    assert cuda_split_plan(64, 32, 8, 16, 128, 32768, 0, 132)[0] == 1   # a full grid: one split


def test_plan_arguments_are_checked():
    ok = dict(batch=1, q_heads=4, kv_heads=2, rows=3, head_dim=64, max_prefix=10, device="cpu")
    with pytest.raises(ValueError, match="op: expected one of"):
        ps_kernels.attention_plan("skinny_linear", **ok)
    with pytest.raises(ValueError, match="kv_heads: expected a number of KV heads that divides q_heads = 4, got 3"):
        ps_kernels.attention_plan("tree_attention", **(ok | dict(kv_heads=3)))
    with pytest.raises(ValueError, match="window: expected None or an int >= 1"):
        ps_kernels.attention_plan("tree_attention", **ok, window=0)
    with pytest.raises(ValueError, match="max_prefix: expected an int >= 0, got -1"):
        ps_kernels.attention_plan("tree_attention", **(ok | dict(max_prefix=-1)))


# ---------------------------------------------------------------- the ops with a plan

@pytest.mark.skipif(NATIVE is not None, reason=str(NATIVE))
@pytest.mark.parametrize("window", [None, 4])
def test_cpu_plan_changes_nothing(window):
    gen = torch.Generator().manual_seed(0)
    args = _tree(gen, device=CPU)
    plan = _plan_of("tree_attention", args, window)
    assert plan.backend == "cpu" and plan.num_splits == 1 and plan.workspace is None
    want = ps_kernels.tree_attention(*_clone(args), window=window, return_lse=True)
    got = ps_kernels.tree_attention(*args, window=window, return_lse=True, plan=plan)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    d_args = _draft(gen, device=CPU)
    d_plan = _plan_of("draft_attention", d_args, window)
    want = ps_kernels.draft_attention(*_clone(d_args), window=window, return_lse=True)
    for _ in range(2):  # one plan, every layer
        got = ps_kernels.draft_attention(*_clone(d_args), window=window, return_lse=True, plan=d_plan,
                                         validate=False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _bad_plans(args):
    gen = torch.Generator().manual_seed(1)
    other_rows = _tree(gen, N=6, device=args[0].device)
    other_heads = _tree(gen, Hq=6, device=args[0].device)
    return [
        (_plan_of("tree_attention", other_rows), {}, r"plan: expected a plan made for this call's rows = 5, got a "
                                                     r"plan made for rows = 6"),
        (_plan_of("tree_attention", other_heads), {}, r"q_heads = 4, got a plan made for q_heads = 6"),
        (_plan_of("tree_attention", args, window=8), {}, r"window = 0, got a plan made for window = 8"),
        (_plan_of("tree_attention", args), dict(window=3), r"window = 3, got a plan made for window = 0"),
        (_plan_of("draft_attention", _draft(gen, R=3, M=2, device=args[0].device)), {},
         r"op = 'tree_attention', got a plan made for op = 'draft_attention'"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_a_plan_for_another_call_is_refused(case):
    gen = torch.Generator().manual_seed(2)
    args = _tree(gen, device=CPU)
    plan, kwargs, match = _bad_plans(args)[case]
    before = [a.clone() for a in args[3:5]]
    with pytest.raises(ValueError, match=match):
        ps_kernels.tree_attention(*args, plan=plan, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(args[3:5], before))


def test_plan_for_another_backend_or_not_a_plan_is_refused():
    gen = torch.Generator().manual_seed(3)
    args = _tree(gen, device=CPU)
    plan = _plan_of("tree_attention", args, backend="reference")
    with pytest.raises(ValueError, match=r"backend = 'cpu', got a plan made for backend = 'reference'"):
        ps_kernels.tree_attention(*args, plan=plan, backend="cpu")
    out = ps_kernels.tree_attention(*_clone(args), plan=plan)      # the plan's backend runs
    torch.testing.assert_close(out, ref.tree_attention(*_clone(args)), atol=0, rtol=0)
    with pytest.raises(TypeError, match=r"plan: expected None or a ps_kernels.attention_plan\(...\) result, got tuple"):
        ps_kernels.tree_attention(*args, plan=(1, 0, None))


def _gpu_reason(backend):
    reason = _backend.why_unavailable("tree_attention", backend, DEVICE)
    if reason is None and backend == "cuda" and not hasattr(torch.ops.ps_kernels_C, "tree_attention_planned"):
        reason = "the native library has no tree_attention_planned (built without the CUDA bindings)"
    return reason


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.skipif(_gpu_reason(b) is not None, reason=str(_gpu_reason(b))))
    for b in ("triton", "cuda")])
def test_gpu_plan_splits_into_its_workspace(backend):
    """A plan with several splits (num_sms forced up; Triton runs in the interpreter on a CPU):
    the kernel writes its partials into the plan's workspace, and the result equals the
    reference, layer after layer."""
    gen = torch.Generator().manual_seed(4)
    args = _tree(gen, B=1, Hq=2, Hkv=1, N=3, D=16, prefix=(600,))
    plan = _plan_of("tree_attention", args, backend=backend, num_sms=64)
    assert plan.backend == backend and plan.num_splits == 2 and plan.workspace.numel() > 0
    plan.workspace.fill_(float("nan"))
    for _ in range(2):
        out, lse = ps_kernels.tree_attention(*_clone(args), plan=plan, return_lse=True)
        want, want_lse = ref.tree_attention(*_clone(args), return_lse=True)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)
    assert not torch.isnan(plan.workspace).all()   # the partials went there
    d_args = _draft(gen, B=1, Hq=2, Hkv=1, R=2, M=1, D=16, prefix=(600,), new_lens=(1,))
    d_plan = _plan_of("draft_attention", d_args, backend=backend, num_sms=64, window=100)
    assert d_plan.num_splits == 1     # the window bounds the rows to split: 99 < 256
    d_plan = _plan_of("draft_attention", d_args, backend=backend, num_sms=64)
    assert d_plan.num_splits == 2
    out = ps_kernels.draft_attention(*_clone(d_args), plan=d_plan)
    torch.testing.assert_close(out, ref.draft_attention(*_clone(d_args)), atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(NATIVE is not None, reason=str(NATIVE))
def test_opcheck_with_plan_arguments():
    gen = torch.Generator().manual_seed(5)
    q, k, v, kc, vc, lens, mask = _tree(gen, device=CPU)
    mask = mask.contiguous()
    torch.library.opcheck(torch.ops.ps_kernels.tree_attention.default,
                          (q, k, v, kc, vc, lens, mask, 0.125, 0, 0.0, None, "cpu", 0, 0, None))
    q, k, v, kc, vc, lens, new_lens, M = _draft(gen, device=CPU)
    torch.library.opcheck(torch.ops.ps_kernels.draft_attention.default,
                          (q, k, v, kc, vc, lens, new_lens, M, 0.125, 0, 0.0, None, "cpu", 0, 0, None))
