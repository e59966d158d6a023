import pytest
import torch
from hypothesis import given, strategies as st

import ps_kernels
from ps_kernels import reference as ref

from attention_cases import (backends, check_against_reference, check_native_refuses, clone_all, draw_layout,
                             dtypes, interpreted, random_parents, random_qkv_cache, spelled_out_tree_attention,
                             upcast)
from helpers import DEVICE

OP = "tree_attention"
BACKENDS = backends(OP)


def make_mask(rng, kind: str, B: int, N: int):
    if kind == "causal":
        return None
    if kind == "shared":
        return ps_kernels.tree_mask_from_parents(random_parents(rng, N)).to(DEVICE)
    return ps_kernels.tree_mask_from_parents(torch.stack([random_parents(rng, N) for _ in range(B)])).to(DEVICE)


def parents_from_mask(mask, B: int, N: int):
    """[B, N] parents read off packed ancestor-or-self bits (bit by bit): a node's parent is its
    highest-index ancestor other than itself; None (causal) stays None."""
    if mask is None:
        return None
    words = mask if mask.dim() == 3 else mask.unsqueeze(0).expand(B, -1, -1)
    rows = words.cpu().tolist()
    return torch.tensor([[max([j for j in range(i) if (rows[b][i][j // 64] >> (j % 64)) & 1], default=-1)
                          for i in range(N)] for b in range(B)])


def check_reference_independently(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale=None):
    """The `reference` backend is the specification: judged by an independent formulation
    (attention_cases.spelled_out_tree_attention, every position spelled out) in fp64, not by
    itself; its cache writes by the contract (node rows at cache_lens[b] + i)."""
    args = upcast(clone_all([q, k_new, v_new, k_cache, v_cache, cache_lens, mask]))
    B, _, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out, lse = ref.tree_attention(*args, scale=scale, return_lse=True)        # the specification, in fp64
    want, want_lse = spelled_out_tree_attention(*upcast(clone_all([q, k_new, v_new, k_cache, v_cache, cache_lens])),
                                                parents_from_mask(mask, B, N), scale)
    torch.testing.assert_close(out, want.to(out.device), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse.double(), want_lse.to(lse.device), atol=1e-5, rtol=1e-6)
    # the op's reference backend in the inputs' dtype: the same up to that dtype's rounding
    low = clone_all([q, k_new, v_new, k_cache, v_cache, cache_lens, mask])
    got = ps_kernels.tree_attention(*low, scale=scale, backend="reference")
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[q.dtype]
    torch.testing.assert_close(got.double(), want.to(got.device), atol=tol, rtol=tol)
    for cache, new, before in ((args[3], args[1], k_cache), (args[4], args[2], v_cache)):
        expected = before.double().clone()
        for b, P in enumerate(cache_lens.tolist()):
            expected[b, :, P:P + N] = new[b]
        assert torch.equal(cache, expected)
    return out, lse


def run_case(backend, q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale=None):
    if backend == "reference":
        return check_reference_independently(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale)

    def run_backend(a):
        return ps_kernels.tree_attention(*a, scale=scale, return_lse=True, backend=backend)

    def run_reference(a):
        return ref.tree_attention(*a, scale=scale, return_lse=True)

    return check_against_reference(run_backend, run_reference, [q, k_new, v_new, k_cache, v_cache, cache_lens, mask])


def build(rng, B, Hq, Hkv, N, D, prefix_lens, dtype, mask_kind, extra_rows=0, q_gain=1.0):
    S = max(prefix_lens) + N + extra_rows
    q, k, v, kc, vc = random_qkv_cache(rng, B, Hq, Hkv, N, D, S, dtype, q_gain)
    lens = torch.tensor(prefix_lens, dtype=torch.int64, device=DEVICE)
    return q, k, v, kc, vc, lens, make_mask(rng, mask_kind, B, N)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference_random(backend, data):
    interp, dtype, B, Hkv, group, D, prefix, scale = draw_layout(data, backend, max_batch=3)
    N = data.draw(st.integers(1, 6) if interp else st.one_of(st.integers(1, 20), st.integers(60, 140)), label="N")
    mask_kind = data.draw(st.sampled_from(["causal", "shared", "per_batch"]), label="mask")
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    case = build(rng, B, Hkv * group, Hkv, N, D, prefix, dtype, mask_kind, extra_rows=data.draw(st.integers(0, 3)))
    run_case(backend, *case, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
@pytest.mark.parametrize("D", [40, 64, 72, 80, 96, 128])
def test_head_dims_and_dtypes(backend, D):
    if interpreted(backend) and D not in (40, 64):
        pytest.skip("interpreter: a small subset of head dims")
    rng = torch.Generator().manual_seed(D)
    for dtype in dtypes(backend):
        run_case(backend, *build(rng, 2, 6, 2, 5, D, [0, 37], dtype, "per_batch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_mask_words_and_long_prefix(backend):
    # N = 200 nodes: four 64-bit words per row, the last one partial; a chain-like deep tree
    # so that rows reach far across words. The prefix crosses several key blocks.
    interp = interpreted(backend)
    N, P = (70, 5) if interp else (200, 1100)
    rng = torch.Generator().manual_seed(1)
    q, k, v, kc, vc, lens, _ = build(rng, 1, 3, 1, N, 64, [P], torch.float32, "causal")
    parents = torch.arange(-1, N - 1)
    parents[N // 2:] = torch.randint(N // 3, N // 2, (N - N // 2,), generator=rng)
    mask = ps_kernels.tree_mask_from_parents(parents).to(DEVICE)
    assert mask.shape == (N, (N + 63) // 64)
    run_case(backend, q, k, v, kc, vc, lens, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaky_scores_rescale_online(backend):
    # large scores growing along the prefix: the running max changes at every key block
    interp = interpreted(backend)
    N, P, D = (3, 20, 64) if interp else (9, 400, 64)
    rng = torch.Generator().manual_seed(2)
    q, k, v, kc, vc, lens, mask = build(rng, 1, 2, 1, N, D, [P], torch.float32, "shared", q_gain=4.0)
    kc[:, :, :P] *= torch.linspace(0.1, 3.0, P, device=DEVICE).view(1, 1, P, 1)
    run_case(backend, q, k, v, kc, vc, lens, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_long_diffuse_prefix(backend):
    # diffuse attention (small scale) over a long prefix in bf16 / fp16: where rounding inside
    # the kernel (e.g. bf16 probabilities for P.V) adds up most against the output's own rounding
    if interpreted(backend):
        pytest.skip("interpreter: long prefixes are slow")
    for dtype in (torch.bfloat16, torch.float16):
        rng = torch.Generator().manual_seed(4)
        case = build(rng, 2, 6, 3, 97, 72, [1100, 746], dtype, "per_batch")
        run_case(backend, *case, scale=0.05)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_shared_mask_equals_expanded_and_none_equals_chain(backend):
    rng = torch.Generator().manual_seed(3)
    B, N = 3, 7
    q, k, v, kc, vc, lens, mask = build(rng, B, 4, 2, N, 64, [4, 0, 9], torch.float32, "shared")
    shared = ps_kernels.tree_attention(q, k, v, kc.clone(), vc.clone(), lens, mask, backend=backend)
    expanded = ps_kernels.tree_attention(q, k, v, kc.clone(), vc.clone(), lens, mask.expand(B, -1, -1), backend=backend)
    assert torch.equal(shared, expanded)
    chain = ps_kernels.tree_mask_from_parents(torch.arange(-1, N - 1)).to(DEVICE)
    causal = ps_kernels.tree_attention(q, k, v, kc.clone(), vc.clone(), lens, None, backend=backend)
    explicit = ps_kernels.tree_attention(q, k, v, kc.clone(), vc.clone(), lens, chain, backend=backend)
    torch.testing.assert_close(causal, explicit, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_writes_only_the_tree_rows_and_accepts_strided_q(backend):
    rng = torch.Generator().manual_seed(4)
    B, Hq, Hkv, N, D, S = 2, 4, 2, 3, 64, 16
    q_bnhd = torch.randn(B, N, Hq, D, generator=rng).to(DEVICE)   # a model's layout, transposed
    k, v = torch.randn(B, Hkv, N, D, generator=rng).to(DEVICE), torch.randn(B, Hkv, N, D, generator=rng).to(DEVICE)
    kv = torch.randn(2, B, Hkv, S, D, generator=rng).to(DEVICE)
    before = kv.clone()
    lens = torch.tensor([5, 0], device=DEVICE)
    out = ps_kernels.tree_attention(q_bnhd.transpose(1, 2), k, v, kv[0], kv[1], lens, backend=backend)
    want = ref.tree_attention(q_bnhd.transpose(1, 2).contiguous(), k, v, before[0].clone(), before[1].clone(), lens, None)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    expected = before.clone()
    expected[0, 0, :, 5:8], expected[1, 0, :, 5:8] = k[0], v[0]
    expected[0, 1, :, 0:3], expected[1, 1, :, 0:3] = k[1], v[1]
    assert torch.equal(kv, expected)
    assert lens.tolist() == [5, 0]


def _good():
    B, Hq, Hkv, N, D, S = 2, 4, 2, 3, 64, 8
    return [torch.randn(B, Hq, N, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D),
            torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D), torch.tensor([2, 5]),
            ps_kernels.tree_mask_from_parents(torch.tensor([-1, 0, 0]))]


def _set(i, value):
    def mutate(a):
        a = list(a)
        a[i] = value(a) if callable(value) else value
        return a
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (_set(0, lambda a: a[0].to(torch.int32)), "q: expected dtype float32/float16/bfloat16"),
    (_set(0, lambda a: a[0][0]), "q: expected a tensor of rank 4"),
    (_set(1, lambda a: a[1].half()), "k_new: expected dtype float32"),
    (_set(1, lambda a: a[1][:, :, :2]), r"k_new: expected shape \(2, \*, 3, 64\)"),
    (_set(1, lambda a: torch.randn(2, 3, 3, 64)), "k_new: expected a number of KV heads that divides q's 4"),
    (_set(2, lambda a: a[2][:, :1]), r"v_new: expected shape \(2, 2, 3, 64\)"),
    (_set(3, lambda a: a[3].transpose(2, 3)), "k_cache: expected a contiguous tensor"),
    (_set(3, lambda a: a[3][:, :, :, :32].contiguous()), r"k_cache: expected shape \(2, 2, \*, 64\)"),
    (_set(4, lambda a: torch.randn(2, 2, 9, 64)), r"v_cache: expected shape \(2, 2, 8, 64\)"),
    (_set(5, torch.tensor([2, 5], dtype=torch.int32)), "cache_lens: expected dtype int64"),
    (_set(5, torch.tensor([2])), r"cache_lens: expected shape \(2\)"),
    (_set(5, torch.tensor([2, 6])), r"cache_lens\[1\] \+ 3 = 9"),
    (_set(5, torch.tensor([-1, 0])), r"cache_lens: expected non-negative .* cache_lens\[0\] = -1"),
    (_set(6, torch.tensor([[1], [3], [5]], dtype=torch.int32)), "tree_mask: expected dtype int64"),
    (_set(6, torch.tensor([[1], [3]])), r"tree_mask: expected shape \(3, 1\)"),
    (_set(6, torch.ones(3, 3, 1, dtype=torch.int64)), r"tree_mask: expected shape \(2, 3, 1\)"),
    (_set(6, torch.tensor([[1], [1], [5]])), "row 1 with its own bit i unset"),
    (_set(6, torch.tensor([[1], [7], [5]])), "row 1 with a bit j > i set"),
    (_set(6, torch.tensor([[1], [3], [5 | 8]])), "row 2 with a bit set beyond node 2"),
    (_set(6, torch.tensor([[[1], [3], [5]], [[1], [7], [5]]])), "row 1 of sequence 1 with a bit j > i"),
    (lambda a: [t[:, :, :0] for t in a[:3]] + a[3:], "q: expected at least one tree node"),
    (_set(0, [1.0]), "q: expected a torch.Tensor"),
])
def test_bad_input_names_argument_and_writes_nothing(mutate, match):
    args = mutate(_good())
    before = [a.clone() for a in args[3:5] if isinstance(a, torch.Tensor)]
    with pytest.raises((ValueError, TypeError), match=match):
        ps_kernels.tree_attention(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[3:5], before))


@pytest.mark.parametrize("mutate, match", [
    (_set(1, lambda a: a[1][:, :, :2]), "k_new, v_new: expected"),
    (_set(1, lambda a: torch.randn(2, 3, 3, 64)), "k_new: expected a number of KV heads dividing 4"),
    (_set(3, lambda a: a[3].transpose(2, 3)), "k_cache: expected a contiguous 4-d CPU tensor"),
    (_set(5, torch.tensor([2, 6])), r"cache_lens\[b\] \+ N \(tree nodes\) <= 8 .* cache_lens\[1\] = 6"),
    (_set(5, torch.tensor([-1, 0])), r"cache_lens\[0\] = -1"),
    (_set(6, torch.ones(3, 3, 1, dtype=torch.int64)), "tree_mask: expected contiguous int64"),
])
def test_native_binding_guards_memory_without_validation(mutate, match):
    """validate=False skips the Python checks for the native backend: its binding must still
    refuse every argument that would make it read or write out of bounds."""
    check_native_refuses(OP, mutate(_good()), match)


def test_bad_scale_and_validate_false_skips_value_checks():
    args = _good()
    with pytest.raises(TypeError, match="scale: expected None or a finite float, got nan"):
        ps_kernels.tree_attention(*args, scale=float("nan"))
    # a non-tree mask passes without validation (the hot loop's contract), with the reference:
    # refused when validated; unvalidated, computed as given (node 0's row, the same bits as the
    # valid mask's, gives the same output)
    valid = ps_kernels.tree_attention(*clone_all(args), backend="reference")
    args[6] = torch.tensor([[1], [7], [5]])
    with pytest.raises(ValueError, match="tree_mask: expected a tree mask in topological order"):
        ps_kernels.tree_attention(*clone_all(args), backend="reference")
    out = ps_kernels.tree_attention(*clone_all(args), validate=False, backend="reference")
    assert out.shape == valid.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 0], valid[:, :, 0], rtol=0, atol=0)


def test_mask_helpers():
    allowed = torch.rand(2, 70, 70) < 0.5
    packed = ps_kernels.pack_tree_mask(allowed)
    assert packed.shape == (2, 70, 2) and packed.dtype == torch.int64
    assert torch.equal(ref.unpack_tree_mask(packed, 70, 2, "cpu"), allowed)
    mask = ps_kernels.tree_mask_from_parents(torch.tensor([-1, 0, 0, 1]))
    assert mask.flatten().tolist() == [0b1, 0b11, 0b101, 0b1011]
    with pytest.raises(ValueError, match=r"parents: expected .* got parents\[2\] = 2"):
        ps_kernels.tree_mask_from_parents(torch.tensor([-1, 0, 2]))
    with pytest.raises(ValueError, match=r"got parents\[1, 0\] = 0"):
        ps_kernels.tree_mask_from_parents(torch.tensor([[-1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="allowed: expected a square"):
        ps_kernels.pack_tree_mask(torch.ones(3, 4, dtype=torch.bool))


def test_forced_unavailable_backend_raises_with_reason():
    with pytest.raises(ps_kernels.BackendUnavailable, match="backend 'cuda' runs on CUDA tensors"):
        ps_kernels.tree_attention(*_good(), backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "causal"])
def test_opcheck(backend, with_mask):
    if ps_kernels._backend.why_unavailable(OP, backend, torch.device("cpu")) is not None:
        pytest.skip(f"backend {backend} unavailable")
    q, k, v, kc, vc, lens, mask = _good()
    mask = mask.expand(2, -1, -1).contiguous() if with_mask else None
    torch.library.opcheck(torch.ops.ps_kernels.tree_attention.default, (q, k, v, kc, vc, lens, mask, 0.125, 0, 0.0, None, backend))


def test_native_op_fake_matches_the_kernel():
    """The native op's own fake (ps_kernels._backend._FAKES), which torch.compile traces in place
    of the Python wrapper: opcheck compares it, and the schema's in-place writes, with the kernel."""
    if ps_kernels._backend.why_unavailable(OP, "cpu", torch.device("cpu")) is not None:
        pytest.skip("native CPU backend unavailable")
    q, k, v, kc, vc, lens, mask = _good()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    torch.library.opcheck(torch.ops.ps_kernels_C.tree_attention.default,
                          (q, k, v, kc, vc, lens, mask.expand(2, -1, -1).contiguous(), 0.125, 0, 0.0, None, out, lse))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_public_op_gives_the_reference(backend):
    """ps_kernels.tree_attention inside a compiled graph (the native op traced directly on the cpu
    backend, the registered custom op on the others): the reference's outputs and cache writes."""
    if ps_kernels._backend.why_unavailable(OP, backend, torch.device("cpu")) is not None:
        pytest.skip(f"backend {backend} unavailable")
    q, k, v, kc, vc, lens, mask = _good()
    kc2, vc2 = kc.clone(), vc.clone()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(q, k, v, kc, vc, lens, mask):
        out, lse = ps_kernels.tree_attention(q, k, v, kc, vc, lens, mask, validate=False, backend=backend,
                                             return_lse=True)
        return out * 2, lse

    out, lse = step(q, k, v, kc, vc, lens, mask)
    want, want_lse = ref.tree_attention(q, k, v, kc2, vc2, lens, mask, 0.125, return_lse=True)
    torch.testing.assert_close(out, want * 2)
    torch.testing.assert_close(lse, want_lse)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_torch_compile_traces_the_op():
    q, k, v, kc, vc, lens, mask = _good()
    mask = mask.expand(2, -1, -1).contiguous()
    kc2, vc2 = kc.clone(), vc.clone()

    @torch.compile(backend="eager", fullgraph=True)
    def step(q, k, v, kc, vc, lens, mask):
        out, lse = torch.ops.ps_kernels.tree_attention(q, k, v, kc, vc, lens, mask, 0.125, 0, 0.0, None, "reference")
        return out * 2, lse

    out, lse = step(q, k, v, kc, vc, lens, mask)
    want, want_lse = ref.tree_attention(q, k, v, kc2, vc2, lens, mask, 0.125, return_lse=True)
    assert torch.equal(out, want * 2) and torch.equal(lse, want_lse)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 65, 130])
@pytest.mark.parametrize("shape", ["chain", "bushy", "mixed_batch"])
def test_mask_from_parents_on_device_matches_the_reference_walk(n, shape):
    """Pointer doubling (the op, no host sync with validate=False) against the reference's
    node-by-node walk, on odd trees: a chain of depth n - 1 (the most doubling rounds), bushy
    trees, and a batch whose trees differ."""
    g = torch.Generator().manual_seed(n)
    rows = 3 if shape == "mixed_batch" else 1
    parents = torch.full((rows, n), -1, dtype=torch.int64)
    for b in range(rows):
        reach = {"chain": 1, "bushy": 9}.get(shape, 1 + 4 * b)
        for i in range(1, n):
            parents[b, i] = int(torch.randint(max(0, i - reach), i, (1,), generator=g))
    parents = parents.to(DEVICE)
    expected = ref.tree_mask_from_parents(parents)
    assert torch.equal(ps_kernels.tree_mask_from_parents(parents, validate=False), expected)
    assert torch.equal(ps_kernels.tree_mask_from_parents(parents[0].to(torch.int32)), expected[0])
