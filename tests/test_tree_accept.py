import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ps_kernels
from ps_kernels import reference as ref
from ps_kernels.ops.tree_accept import MAX_NODES

from helpers import DEVICE, runnable_backends

BACKENDS = runnable_backends("tree_accept")
INTERPRETED = DEVICE.type == "cpu"  # the Triton backend runs in the interpreter here


def _interp(backend):
    return backend == "triton" and INTERPRETED


def _dtypes(backend):
    # bf16 keeps raw bits in the Triton interpreter
    return [torch.float32, torch.float16] if _interp(backend) else [torch.float32, torch.float16, torch.bfloat16]


def random_parents(g: torch.Generator, N: int, shape: str) -> torch.Tensor:
    if shape == "chain":
        return torch.arange(-1, N - 1)
    if shape == "star":
        return torch.tensor([-1] + [0] * (N - 1))
    # random recursive tree, biased towards recent nodes so that some branches are deep
    par = [-1]
    for i in range(1, N):
        lo = int(torch.randint(0, 2, (1,), generator=g)) * max(0, i - 3)
        par.append(int(torch.randint(lo, i, (1,), generator=g)))
    return torch.tensor(par)


def make_tree(g, B, N, V, shape):
    """parents ([N], or [B, N] with a different tree per sequence) and tokens from a small
    alphabet, so sibling tokens repeat and the target's favourite tokens are in the tree."""
    if shape == "per_sequence":
        parents = torch.stack([random_parents(g, N, "random") for _ in range(B)])
    else:
        parents = random_parents(g, N, shape)
    alphabet = min(V, 3)
    tokens = torch.randint(0, alphabet, (B, N), generator=g)
    return tokens, parents, alphabet


def greedy_logits(g, B, N, V, alphabet, dtype):
    # integer logits: ties are common (first-index rule); a boost on the tree's alphabet makes
    # long accepted paths common too
    logits = torch.randint(-4, 4, (B, N, V), generator=g).float()
    logits[..., :alphabet] += torch.randint(0, 8, (B, N, alphabet), generator=g).float()
    return logits.to(dtype)


def sample_probs(g, B, N, V, alphabet, dtype, zero_frac=0.3):
    logits = torch.randn(B, N, V, generator=g) * 2
    logits[..., :alphabet] += 2
    p = torch.softmax(logits, -1)
    p = p * (torch.rand(B, N, V, generator=g) >= zero_frac)  # top-k/top-p style exact zeros
    return p.to(dtype)


def simple_greedy_walk(tokens, parents, logits):
    """An independent greedy walk on Python lists: (path, next token) per sequence."""
    B, N = tokens.shape
    result = []
    for b in range(B):
        par = (parents[b] if parents.dim() == 2 else parents).tolist()
        tok = tokens[b].tolist()
        rows = logits[b].float().tolist()
        path = [0]
        while True:
            row = rows[path[-1]]
            want = row.index(max(row))  # the first maximum
            kid = next((c for c in range(N) if par[c] == path[-1] and tok[c] == want), None)
            if kid is None:
                break
            path.append(kid)
        result.append((path, want))
    return result


def check_structure(tokens, parents, V, accept_index, accept_lens, next_token):
    B, N = tokens.shape
    assert accept_index.shape == (B, N) and accept_lens.shape == (B,) and next_token.shape == (B,)
    assert accept_index.dtype == accept_lens.dtype == next_token.dtype == torch.int64
    for b in range(B):
        par = (parents[b] if parents.dim() == 2 else parents).tolist()
        n = int(accept_lens[b])
        row = accept_index[b].tolist()
        assert 1 <= n <= N
        assert row[0] == 0
        assert all(par[row[i]] == row[i - 1] for i in range(1, n)), (row, par)
        assert row[n:] == [-1] * (N - n)
        assert 0 <= int(next_token[b]) < V


def to_device(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


@st.composite
def tree_cases(draw, backend):
    interp = _interp(backend)
    B = draw(st.integers(1, 3 if interp else 6))
    N = draw(st.sampled_from([1, 2, 3, 5, 8] if interp else [1, 2, 3, 7, 16, 33]))
    V = draw(st.sampled_from([1, 2, 5, 37] if interp else [1, 2, 5, 37, 64, 1000, 4099]))
    shape = draw(st.sampled_from(["random", "chain", "star", "per_sequence"]))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, N, V, shape, dtype, seed


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_greedy_matches_reference_and_simple_walk(backend, data):
    B, N, V, shape, dtype, seed = data.draw(tree_cases(backend))
    g = torch.Generator().manual_seed(seed)
    tokens, parents, alphabet = make_tree(g, B, N, V, shape)
    logits = greedy_logits(g, B, N, V, alphabet, dtype)
    tokens, parents, logits = to_device(tokens, parents, logits)
    got = ps_kernels.tree_accept(tokens, parents, logits, backend=backend)
    want = ref.tree_accept(tokens, parents, logits)
    for x, y in zip(got, want):
        assert torch.equal(x, y), (got, want)
    check_structure(tokens, parents, V, *got)
    for b, (path, nxt) in enumerate(simple_greedy_walk(tokens.cpu(), parents.cpu(), logits.cpu())):
        assert got[0][b, :len(path)].tolist() == path and int(got[1][b]) == len(path) and int(got[2][b]) == nxt


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_sample_same_uniforms_same_outputs(backend, data):
    B, N, V, shape, dtype, seed = data.draw(tree_cases(backend))
    with_draft = data.draw(st.booleans())
    u_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(seed)
    tokens, parents, alphabet = make_tree(g, B, N, V, shape)
    target = sample_probs(g, B, N, V, alphabet, dtype, zero_frac=data.draw(st.sampled_from([0.0, 0.3, 1.0])))
    draft = sample_probs(g, B, N, V, alphabet, dtype) if with_draft else None
    uniforms = torch.rand(B, N, generator=g, dtype=u_dtype)
    tokens, parents, target, draft, uniforms = to_device(tokens, parents, target, draft, uniforms)
    got = ps_kernels.tree_accept(tokens, parents, target, mode="sample", draft_probs=draft, uniforms=uniforms,
                                 backend=backend)
    want = ref.tree_accept(tokens, parents, target, "sample", draft, uniforms)
    for x, y in zip(got, want):
        assert torch.equal(x, y), (got, want)
    check_structure(tokens, parents, V, *got)
    # the token drawn is never one the residual gave probability zero (unless every weight is zero)
    for b in range(B):
        last = int(got[0][b, int(got[1][b]) - 1])
        if float(target[b, last].float().sum()) > 0:
            assert float(target[b, last, int(got[2][b])]) > 0


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_edge_shapes(backend):
    # N = 1 (root only), V = 1, B = 0, and a row whose maxima tie at the first and last index
    one = ps_kernels.tree_accept(torch.tensor([[4]], device=DEVICE), torch.tensor([-1], device=DEVICE),
                                 torch.tensor([[[0.0, 2.0, 1.0, 2.0, 2.0]]], device=DEVICE), backend=backend)
    assert [t.tolist() for t in one] == [[[0]], [1], [1]]
    single = ps_kernels.tree_accept(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE),
                                    torch.tensor([-1, 0, 0], device=DEVICE), torch.zeros(2, 3, 1, device=DEVICE),
                                    backend=backend)
    assert [t.tolist() for t in single] == [[[0, 1, -1], [0, 1, -1]], [2, 2], [0, 0]]
    empty = ps_kernels.tree_accept(torch.zeros(0, 4, dtype=torch.int64, device=DEVICE),
                                   torch.tensor([-1, 0, 1, 2], device=DEVICE), torch.zeros(0, 4, 7, device=DEVICE),
                                   mode="sample", backend=backend)
    assert [tuple(t.shape) for t in empty] == [(0, 4), (0,), (0,)]
    inf = torch.full((1, 2, 3), float("-inf"), device=DEVICE)
    got = ps_kernels.tree_accept(torch.tensor([[1, 0]], device=DEVICE), torch.tensor([-1, 0], device=DEVICE), inf,
                                 backend=backend)
    assert [t.tolist() for t in got] == [[[0, 1]], [2], [0]]  # all -inf: argmax is index 0


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_sample_zero_rows_and_duplicates(backend):
    # root: children with tokens 2, 2, 3; target puts all mass on {2, 3}; u forces both
    # rejections of the duplicated 2 (the second finds r[2] = 0) and then accepts 3
    tokens = torch.tensor([[0, 2, 2, 3]], device=DEVICE)
    parents = torch.tensor([-1, 0, 0, 0], device=DEVICE)
    target = torch.tensor([[[0.0, 0.0, 0.5, 0.5, 0.0]] * 4], device=DEVICE)
    uniforms = torch.tensor([[0.3, 0.9, 0.0, 0.99]], device=DEVICE)
    got = ps_kernels.tree_accept(tokens, parents, target, mode="sample", uniforms=uniforms, backend=backend)
    assert [t.tolist() for t in got] == [[[0, 3, -1, -1]], [2], [2]]  # leaf 3: draw from target[3] at u = 0.3
    # an all-zero target row: nothing is accepted and the draw falls back to V - 1 (the reference)
    got = ps_kernels.tree_accept(tokens, parents, torch.zeros(1, 4, 5, device=DEVICE), mode="sample",
                                 uniforms=uniforms, backend=backend)
    assert [t.tolist() for t in got] == [[[0, -1, -1, -1]], [1], [4]]


def first_emitted_token(tokens, accept_index, accept_lens, next_token):
    """The token right after the root: the first accepted child's, else the bonus token."""
    child = accept_index[:, 1].clamp(min=0)
    from_child = tokens.gather(1, child[:, None])[:, 0]
    return torch.where(accept_lens >= 2, from_child, next_token)


def draw_first_tokens(backend, n, seed, with_draft):
    """n independent verifications of the same tree (a batch of n identical sequences with their
    own uniforms, and with draft tokens drawn from draft_probs when given)."""
    g = torch.Generator().manual_seed(seed)
    V = 6
    p = torch.tensor([[0.30, 0.05, 0.25, 0.0, 0.15, 0.25]])  # p[3] = 0: must never come out
    if with_draft:
        N = 4  # a chain of 3 drafted tokens
        parents = torch.arange(-1, N - 1)
        q = torch.softmax(torch.randn(N, V, generator=g), -1)
        q[:, 1] = 0.0  # the drafter never proposes token 1: it must still come out at p[1]
        q = q / q.sum(-1, keepdim=True)
        target_rows = torch.cat([p, torch.softmax(torch.randn(N - 1, V, generator=g), -1)])
        tokens = torch.zeros(n, N, dtype=torch.int64)
        tokens[:, 1:] = torch.stack([torch.multinomial(q[c], n, replacement=True, generator=g) for c in range(1, N)], 1)
        draft = q.expand(n, N, V)
    else:
        # duplicated sibling (2, 2), a zero-probability candidate (3), deeper nodes
        parents = torch.tensor([-1, 0, 0, 0, 0, 1, 4])
        N = parents.shape[0]
        tokens = torch.tensor([[0, 2, 2, 3, 0, 5, 1]]).expand(n, N)
        target_rows = torch.cat([p, torch.softmax(torch.randn(N - 1, V, generator=g), -1)])
        draft = None
    target = target_rows.expand(n, N, V)
    uniforms = torch.rand(n, N, generator=g)
    tokens, parents, target, draft, uniforms = to_device(tokens, parents, target, draft, uniforms)
    out = ps_kernels.tree_accept(tokens, parents, target, mode="sample", draft_probs=draft, uniforms=uniforms,
                                 backend=backend)
    check_structure(tokens[:64], parents, V, *(t[:64] for t in out))
    first = first_emitted_token(tokens, *out).cpu()
    return torch.bincount(first, minlength=V).double(), p[0].double()


STAT_BACKENDS = [pytest.param("reference", id="reference")] + [
    p for p in BACKENDS if not (p.values[0] == "triton" and INTERPRETED)]


@pytest.mark.parametrize("with_draft", [False, True], ids=["deterministic", "draft_chain"])
@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_sampling_is_lossless(backend, with_draft):
    sizes = (500, 4000) if backend == "reference" else (1000, 8000, 64000)
    tvs = []
    for i, n in enumerate(sizes):
        counts, p = draw_first_tokens(backend, n, seed=1234 + i, with_draft=with_draft)
        assert counts[p == 0].sum() == 0, counts
        expected = n * p[p > 0]
        chi2 = float(((counts[p > 0] - expected) ** 2 / expected).sum())
        df = int((p > 0).sum()) - 1
        p_value = float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(chi2 / 2)))
        assert p_value > 1e-3, (n, counts.tolist(), chi2)
        tv = 0.5 * float((counts / n - p).abs().sum())
        # E[TV] of an exact sampler is about sum_i sqrt(p_i (1 - p_i) / (2 pi n))
        scale = float((p * (1 - p)).sqrt().sum()) / math.sqrt(2 * math.pi * n)
        assert tv < 3 * scale, (n, tv, scale)
        tvs.append(tv)
    assert tvs[-1] < tvs[0], tvs


def test_sample_without_uniforms_uses_the_generator():
    g = torch.Generator().manual_seed(0)
    tokens, parents, alphabet = make_tree(g, 4, 9, 11, "random")
    target = sample_probs(g, 4, 9, 11, alphabet, torch.float32)
    a = ps_kernels.tree_accept(tokens, parents, target, mode="sample", generator=torch.Generator().manual_seed(7))
    u = torch.rand(4, 9, generator=torch.Generator().manual_seed(7))
    b = ps_kernels.tree_accept(tokens, parents, target, mode="sample", uniforms=u)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_strided_inputs(backend):
    # target with a non-unit vocabulary stride and parents as int32
    g = torch.Generator().manual_seed(3)
    tokens, parents, alphabet = make_tree(g, 3, 6, 9, "random")
    logits = greedy_logits(g, 3, 6, 9, alphabet, torch.float32)
    strided = logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert strided.stride(-1) != 1
    tokens, parents, logits, strided = to_device(tokens, parents, logits, strided)
    got = ps_kernels.tree_accept(tokens, parents.to(torch.int32), strided, backend=backend)
    want = ref.tree_accept(tokens, parents, logits)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_strided_uniforms_and_draft_probs(backend):
    # sample mode with uniforms sliced out of a wider tensor (node stride 2) and draft_probs
    # transposed in their batch / node dims: each backend reads them by index, not by layout
    g = torch.Generator().manual_seed(5)
    B, N, V = 3, 7, 11
    tokens, parents, _ = make_tree(g, B, N, V, "random")
    target = torch.softmax(torch.randn(B, N, V, generator=g), -1)
    draft = torch.softmax(torch.randn(N, B, V, generator=g), -1).transpose(0, 1)
    wide = torch.rand(B, 2 * N, generator=g)
    uniforms = wide[:, ::2]
    assert not uniforms.is_contiguous() and not draft.is_contiguous()
    tokens, parents, target, draft, uniforms = to_device(tokens, parents, target, draft, uniforms)
    got = ps_kernels.tree_accept(tokens, parents, target, mode="sample", draft_probs=draft, uniforms=uniforms,
                                 backend=backend)
    want = ref.tree_accept(tokens, parents, target, "sample", draft.contiguous(), uniforms.contiguous())
    assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(got, want))


@pytest.mark.parametrize("backend", [p for p in BACKENDS])
def test_unvalidated_malformed_input_stays_in_bounds(backend):
    # validate=False with a cycle-like parent, a forward parent and out-of-range tokens: the
    # result is unspecified, but the kernel must terminate and write a well-formed path
    tokens = torch.tensor([[0, 99, -5, 1, 1]], device=DEVICE)
    parents = torch.tensor([3, 1, 7, 0, -4], device=DEVICE)
    target = torch.rand(1, 5, 4, device=DEVICE)
    for mode in ("greedy", "sample"):
        idx, lens, nxt = ps_kernels.tree_accept(tokens, parents, target, mode=mode, backend=backend, validate=False)
        n = int(lens[0])
        assert 1 <= n <= 5 and int(idx[0, 0]) == 0 and idx[0, n:].eq(-1).all() and 0 <= int(nxt[0]) < 4


def _good():
    return (torch.tensor([[5, 1, 2], [5, 2, 2]]), torch.tensor([-1, 0, 0]), torch.rand(2, 3, 7))


@pytest.mark.parametrize("mutate, match", [
    (lambda t, p, x, k: ((t.int(), p, x), k), "tokens: expected dtype int64"),
    (lambda t, p, x, k: ((t[0], p, x), k), "tokens: expected a tensor of rank 2"),
    (lambda t, p, x, k: ((t.tolist(), p, x), k), "tokens: expected a torch.Tensor"),
    (lambda t, p, x, k: ((t[:, :0], p[:0], x[:, :0]), k), "tokens: expected at least one node"),
    (lambda t, p, x, k: ((t + 10, p, x), k), r"tokens: expected token ids in \[0, 7\).*tokens\[0, 0\] = 15"),
    (lambda t, p, x, k: ((t, p.float(), x), k), "parents: expected dtype int32/int64"),
    (lambda t, p, x, k: ((t, torch.tensor([-1, 0, 0, 1]), x), k), r"parents: expected shape \(3\)"),
    (lambda t, p, x, k: ((t, torch.tensor([-1, 0, 0]).expand(3, 3), x), k), r"parents: expected shape \(2, 3\)"),
    (lambda t, p, x, k: ((t, torch.tensor([0, 0, 0]), x), k), r"parents: not a tree: .*parents\[0\] = 0"),
    (lambda t, p, x, k: ((t, torch.tensor([-1, 0, 2]), x), k), r"parents: not a tree: .*parents\[2\] = 2"),
    (lambda t, p, x, k: ((t, torch.tensor([[-1, 0, 0], [-1, -1, 1]]), x), k),
     r"parents: not a tree: .*parents\[1, 1\] = -1"),
    (lambda t, p, x, k: ((t, p, x.double()), k), "target: expected dtype float32/float16/bfloat16"),
    (lambda t, p, x, k: ((t, p, x[:, :2]), k), r"target: expected shape \(2, 3, \*\)"),
    (lambda t, p, x, k: ((t, p, x.to("meta")), k), "target: expected a tensor on cpu"),
    (lambda t, p, x, k: ((t, p, x.index_put((torch.tensor(1),), torch.tensor(float("nan")))), k),
     r"target: expected no NaN, got NaN at target\[1, 0, 0\]"),
    (lambda t, p, x, k: ((t, p, x - 0.5), dict(k, mode="sample")), "target: expected probabilities >= 0"),
    (lambda t, p, x, k: ((t, p, x), dict(k, mode="beam")), "mode: expected one of"),
    (lambda t, p, x, k: ((t, p, x), dict(k, draft_probs=x)), "draft_probs: expected None with mode='greedy'"),
    (lambda t, p, x, k: ((t, p, x), dict(k, uniforms=x[..., 0])), "uniforms: expected None with mode='greedy'"),
    (lambda t, p, x, k: ((t, p, x), dict(k, mode="sample", draft_probs=x.half())), "draft_probs: expected dtype float32"),
    (lambda t, p, x, k: ((t, p, x), dict(k, mode="sample", draft_probs=x[:1])), r"draft_probs: expected shape \(2, 3, 7\)"),
    (lambda t, p, x, k: ((t, p, x), dict(k, mode="sample", uniforms=torch.ones(2, 3))),
     r"uniforms: expected values in \[0, 1\), got uniforms\[0, 0\] = 1.0"),
    (lambda t, p, x, k: ((t, p, x), dict(k, mode="sample", uniforms=torch.zeros(2, 3).half())),
     "uniforms: expected dtype float32/float64"),
    (lambda t, p, x, k: ((t, p, x), dict(k, mode="sample", uniforms=torch.zeros(3, 2))), r"uniforms: expected shape \(2, 3\)"),
    (lambda t, p, x, k: ((torch.zeros(1, MAX_NODES + 1, dtype=torch.int64), torch.arange(-1, MAX_NODES),
                          torch.zeros(1, MAX_NODES + 1, 2)), k), f"tokens: expected at most {MAX_NODES} tree nodes"),
])
def test_bad_input_names_argument(mutate, match):
    args, kwargs = mutate(*_good(), {})
    with pytest.raises((ValueError, TypeError), match=match):
        ps_kernels.tree_accept(*args, **kwargs)


def test_forced_unavailable_backend_raises_with_reason():
    with pytest.raises(ps_kernels.BackendUnavailable, match="backend 'cuda' runs on CUDA tensors"):
        ps_kernels.tree_accept(*_good(), backend="cuda")


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
def test_opcheck(sample):
    tokens, parents, target = _good()
    tokens = tokens % 7
    uniforms = torch.rand(2, 3) if sample else None
    for backend in ("reference", "cpu"):
        if ps_kernels._backend.why_unavailable("tree_accept", backend, tokens.device) is None:
            torch.library.opcheck(torch.ops.ps_kernels.tree_accept.default,
                                  (tokens, parents, target, sample, None, uniforms, backend))


def test_torch_compile_traces_the_op():
    tokens, parents, target = _good()
    tokens = tokens % 7

    @torch.compile(backend="eager", fullgraph=True)
    def step(tokens, parents, target):
        idx, lens, nxt = torch.ops.ps_kernels.tree_accept(tokens, parents, target, False, None, None, "reference")
        return idx, lens + 0, nxt

    got = step(tokens, parents, target)
    assert all(torch.equal(x, y) for x, y in zip(got, ref.tree_accept(tokens, parents, target)))
