import pytest
import torch
from hypothesis import given, strategies as st

import ps_kernels
from ps_kernels import reference as ref

from attention_cases import (backends, check_against_reference, check_native_refuses, clone_all, draw_layout,
                             dtypes, interpreted, random_qkv_cache, spelled_out_draft_attention, upcast)
from helpers import DEVICE

OP = "draft_attention"
BACKENDS = backends(OP)


def check_reference_independently(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale=None):
    """The `reference` backend is the specification: judged by an independent formulation
    (attention_cases.spelled_out_draft_attention, every position spelled out) in fp64, not by
    itself; its cache writes by the contract (the real rows at cache_lens[b] + t)."""
    args = upcast(clone_all([q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks]))
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    out, lse = ref.draft_attention(*args, scale=scale, return_lse=True)     # the specification, in fp64
    want, want_lse = spelled_out_draft_attention(*upcast(clone_all([q, k_new, v_new, k_cache, v_cache, cache_lens,
                                                                    new_lens])), num_masks, scale)
    torch.testing.assert_close(out, want.to(out.device), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse.double(), want_lse.to(lse.device), atol=1e-5, rtol=1e-6)
    for cache, new, before in ((args[3], args[1], k_cache), (args[4], args[2], v_cache)):
        expected = before.double().clone()
        for b, (P, r) in enumerate(zip(cache_lens.tolist(), new_lens.tolist())):
            expected[b, :, P:P + r] = new[b, :, :r]
        assert torch.equal(cache, expected)
    # the op's reference backend in the inputs' dtype: the same up to that dtype's rounding
    low = clone_all([q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks])
    got = ps_kernels.draft_attention(*low, scale=scale, backend="reference")
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[q.dtype]
    torch.testing.assert_close(got.double(), want.to(got.device), atol=tol, rtol=tol)
    return got, lse


def run_case(backend, q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale=None):
    def run_backend(a):
        return ps_kernels.draft_attention(*a, scale=scale, return_lse=True, backend=backend)

    def run_reference(a):
        return ref.draft_attention(*a, scale=scale, return_lse=True)

    if backend == "reference":
        out, lse = check_reference_independently(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks,
                                                 scale)
    else:
        out, lse = check_against_reference(run_backend, run_reference,
                                           [q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks])
    R = q.shape[2] - num_masks
    for b, r in enumerate(new_lens.tolist()):  # padding rows: exactly 0 and -inf
        assert torch.all(out[b, :, r:R] == 0) and torch.all(lse[b, :, r:R] == float("-inf"))
    return out, lse


def build(rng, B, Hq, Hkv, R, M, D, prefix_lens, real_lens, dtype, extra_rows=0):
    S = max(p + r for p, r in zip(prefix_lens, real_lens)) + extra_rows
    q, k, v, kc, vc = random_qkv_cache(rng, B, Hq, Hkv, R + M, D, max(S, 1), dtype)
    return (q, k, v, kc, vc, torch.tensor(prefix_lens, dtype=torch.int64, device=DEVICE),
            torch.tensor(real_lens, dtype=torch.int64, device=DEVICE), M)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference_random(backend, data):
    interp, dtype, B, Hkv, group, D, prefix, scale = draw_layout(data, backend, max_batch=4)
    R = data.draw(st.integers(0, 4) if interp else st.one_of(st.integers(0, 8), st.integers(60, 80)), label="R")
    M = data.draw(st.integers(0, 3 if interp else 7), label="M")
    real = data.draw(st.lists(st.integers(0, R), min_size=B, max_size=B), label="new_lens")
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    case = build(rng, B, Hkv * group, Hkv, R, M, D, prefix, real, dtype, extra_rows=data.draw(st.integers(0, 3)))
    run_case(backend, *case, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
@pytest.mark.parametrize("D", [40, 64, 72, 80, 96, 128])
def test_head_dims_and_dtypes(backend, D):
    if interpreted(backend) and D not in (40, 64):
        pytest.skip("interpreter: a small subset of head dims")
    rng = torch.Generator().manual_seed(D)
    for dtype in dtypes(backend):
        run_case(backend, *build(rng, 3, 6, 2, 4, 3, D, [0, 37, 5], [4, 1, 0], dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_layouts(backend):
    # no mask slots (plain causal prefill); only mask slots (nothing new accepted); nothing at all
    rng = torch.Generator().manual_seed(5)
    run_case(backend, *build(rng, 2, 3, 1, 6, 0, 64, [0, 9], [6, 2], torch.float32))
    run_case(backend, *build(rng, 2, 3, 1, 0, 4, 64, [3, 9], [0, 0], torch.float32))
    run_case(backend, *build(rng, 2, 3, 1, 2, 0, 64, [3, 0], [0, 0], torch.float32))


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_writes_only_real_rows(backend):
    rng = torch.Generator().manual_seed(6)
    B, Hkv, R, M, D, S = 2, 2, 3, 2, 64, 12
    q, k, v, kc, vc, lens, new_lens, _ = build(rng, B, 4, Hkv, R, M, D, [4, 0], [2, 3], torch.float32, extra_rows=4)
    kc0, vc0 = kc.clone(), vc.clone()
    ps_kernels.draft_attention(q, k, v, kc, vc, lens, new_lens.to(torch.int32), M, backend=backend)
    for cache, before, new in ((kc, kc0, k), (vc, vc0, v)):
        expected = before.clone()
        expected[0, :, 4:6] = new[0, :, :2]
        expected[1, :, 0:3] = new[1, :, :3]
        assert torch.equal(cache, expected)
    assert lens.tolist() == [4, 0]


def _good():
    B, Hq, Hkv, T, D, S = 2, 4, 2, 5, 64, 8
    return [torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D),
            torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D), torch.tensor([2, 5]), torch.tensor([3, 1]), 2]


def _set(i, value):
    def mutate(a):
        a = list(a)
        a[i] = value(a) if callable(value) else value
        return a
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (_set(0, lambda a: a[0].double()), "q: expected dtype float32/float16/bfloat16"),
    (_set(2, lambda a: a[2].bfloat16()), "v_new: expected dtype float32"),
    (_set(1, lambda a: a[1][:, :, :4]), r"k_new: expected shape \(2, \*, 5, 64\)"),
    (_set(1, lambda a: torch.randn(2, 3, 5, 64)), "k_new: expected a number of KV heads that divides q's 4"),
    (_set(4, lambda a: a[4][..., :8]), "v_cache: expected a contiguous tensor"),
    (_set(5, torch.tensor([2, 5, 0])), r"cache_lens: expected shape \(2\)"),
    (_set(6, torch.tensor([3.0, 1.0])), "new_lens: expected dtype int32/int64"),
    (_set(6, torch.tensor([3])), r"new_lens: expected shape \(2\)"),
    (_set(6, torch.tensor([4, 1])), r"new_lens: expected values in \[0, 3\] .* new_lens\[0\] = 4"),
    (_set(6, torch.tensor([3, -1])), r"new_lens\[1\] = -1"),
    (_set(5, torch.tensor([2, 8])), r"cache_lens\[1\] \+ 1 = 9"),
    (_set(5, torch.tensor([0, -3])), r"cache_lens: expected non-negative .* cache_lens\[1\] = -3"),
    (_set(7, 6), r"num_masks: expected 0 <= num_masks <= T = 5 .* got 6"),
    (_set(7, -1), "num_masks: expected 0 <= num_masks"),
    (_set(7, 2.0), "num_masks: expected an int, got float"),
])
def test_bad_input_names_argument_and_writes_nothing(mutate, match):
    args = mutate(_good())
    before = [a.clone() for a in args[3:5]]
    with pytest.raises((ValueError, TypeError), match=match):
        ps_kernels.draft_attention(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[3:5], before))


@pytest.mark.parametrize("mutate, match", [
    (_set(1, lambda a: a[1][:, :, :4]), "k_new, v_new: expected"),
    (_set(6, torch.tensor([4, 1])), r"new_lens: expected values in \[0, 3\], got new_lens\[0\] = 4"),
    (_set(5, torch.tensor([2, 8])), r"cache_lens\[b\] \+ new_lens\[b\] <= 8 .* cache_lens\[1\] = 8"),
    (_set(7, 6), "num_masks: expected 0..5, got 6"),
])
def test_native_binding_guards_memory_without_validation(mutate, match):
    """validate=False skips the Python checks for the native backend; its binding still refuses
    what would read or write out of bounds."""
    check_native_refuses(OP, mutate(_good()), match)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    if ps_kernels._backend.why_unavailable(OP, backend, torch.device("cpu")) is not None:
        pytest.skip(f"backend {backend} unavailable")
    q, k, v, kc, vc, lens, new_lens, M = _good()
    torch.library.opcheck(torch.ops.ps_kernels.draft_attention.default,
                          (q, k, v, kc, vc, lens, new_lens, M, 0.125, 0, 0.0, None, backend))


def test_native_op_fake_matches_the_kernel():
    """The native op's own fake, which torch.compile traces in place of the Python wrapper (as in
    test_tree_attention)."""
    if ps_kernels._backend.why_unavailable(OP, "cpu", torch.device("cpu")) is not None:
        pytest.skip("native CPU backend unavailable")
    q, k, v, kc, vc, lens, new_lens, M = _good()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    torch.library.opcheck(torch.ops.ps_kernels_C.draft_attention.default,
                          (q, k, v, kc, vc, lens, new_lens, M, 0.125, 0, 0.0, None, out, lse))


def test_torch_compile_traces_the_op():
    q, k, v, kc, vc, lens, new_lens, M = _good()
    kc2, vc2 = kc.clone(), vc.clone()

    @torch.compile(backend="eager", fullgraph=True)
    def step(q, k, v, kc, vc, lens, new_lens):
        out, lse = torch.ops.ps_kernels.draft_attention(q, k, v, kc, vc, lens, new_lens, M, 0.125, 0, 0.0, None, "reference")
        return out + 1, lse

    out, lse = step(q, k, v, kc, vc, lens, new_lens)
    want, want_lse = ref.draft_attention(q, k, v, kc2, vc2, lens, new_lens, M, 0.125, return_lse=True)
    assert torch.equal(out, want + 1) and torch.equal(lse, want_lse)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
