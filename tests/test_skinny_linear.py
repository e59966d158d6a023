"""skinny_linear (few-row linear) against its reference and torch's F.linear, and the
parallelspec.hf.linear routing that puts it under the target's and drafter's layers."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ps_kernels
from ps_kernels import reference as ref

from helpers import cpu_level_params

OP = "skinny_linear"
CPU = torch.device("cpu")
NATIVE = ps_kernels._backend.why_unavailable(OP, "cpu", CPU)
needs_native = pytest.mark.skipif(NATIVE is not None, reason=f"native CPU backend: {NATIVE}")
# each native test once per capability level this machine runs (conftest forces the level)
LEVELS = pytest.mark.parametrize("level", cpu_level_params() if NATIVE is None else ["none"])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tolerance(x, weight, dtype):
    """~2x the error torch's own linear makes in this dtype against fp32 (plus a floor)."""
    exact = F.linear(x.double(), weight.double())
    torch_err = (F.linear(x, weight).double() - exact).abs().max().item()
    return exact, 2 * torch_err + (1e-5 if dtype == torch.float32 else 1e-3) * exact.abs().max().item()


@needs_native
@LEVELS
@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 200), N=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_reference_over_odd_shapes(level, M, K, N, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    got = ps_kernels.skinny_linear(x, w, b, backend="cpu")
    want = ref.skinny_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (M, N)
    # both sum in fp32 (different order): within fp32 rounding of the sum, then one rounding to dtype
    scale = (x.float().abs() @ w.float().abs().t()).max().item() + (b.float().abs().max().item() if bias else 0)
    atol = 1e-6 * scale * K ** 0.5 + (0 if dtype == torch.float32 else 2 * scale * 2 ** -8)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@needs_native
@LEVELS
@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 9), K=st.integers(1, 150), N=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_exact_sums_round_once_to_nearest_even(level, M, K, N, bias, seed):
    """Small integers: every product and sum is exact in fp32, so the result in x's dtype must be
    torch's own rounding of the exact sum, bit for bit (round to nearest, ties to even; bf16 x and
    weight take the bf16-pairs path where the level has it, which writes bf16 itself)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 17, (M, K), generator=g).float()
    w = torch.randint(-16, 17, (N, K), generator=g).float()
    b = torch.randint(-300, 301, (N,), generator=g).float() + 0.5 if bias else None
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)   # |.| < 2^17: exact in fp32
    for dtype in DTYPES:
        got = ps_kernels.skinny_linear(x.to(dtype), w.to(dtype), b, backend="cpu")
        assert got.dtype == dtype
        assert torch.equal(got, exact.float().to(dtype)), dtype


@needs_native
@LEVELS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, N", [(576, 1536), (1536, 576), (96, 4099)])
def test_model_shapes_within_twice_torchs_error(level, dtype, K, N):
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(3, 5, K, generator=g).to(dtype)       # leading dims count as rows (15)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    exact, tol = _tolerance(x, w, dtype)
    got = ps_kernels.skinny_linear(x, w, backend="cpu")
    assert got.shape == (3, 5, N)
    assert (got.double() - exact).abs().max().item() <= tol


@needs_native
@LEVELS
def test_mixed_weight_dtype_and_noncontiguous_weight(level):
    x = torch.randn(4, 64)
    w = torch.randn(64, 30).t()                          # [30, 64], not contiguous
    torch.testing.assert_close(ps_kernels.skinny_linear(x, w, backend="cpu"), F.linear(x, w), rtol=1e-5, atol=1e-5)
    wb = torch.randn(30, 64).bfloat16()                   # bf16 weight widened under fp32 x
    torch.testing.assert_close(ps_kernels.skinny_linear(x, wb, backend="cpu"), x @ wb.float().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, err, match", [
    (lambda: ([1.0], torch.randn(3, 4)), TypeError, "x: expected a torch.Tensor"),
    (lambda: (torch.randn(2, 4).int(), torch.randn(3, 4)), TypeError, "x: expected dtype float32/float16/bfloat16"),
    (lambda: (torch.randn(2, 4), torch.randn(3, 5)), ValueError, r"weight: expected shape \(\*, 4\)"),
    (lambda: (torch.randn(2, 4), torch.randn(3, 4, 1)), ValueError, "weight: expected a tensor of rank 2"),
    (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), ValueError, r"bias: expected shape \(3\)"),
    (lambda: (torch.tensor(1.0), torch.randn(3, 4)), ValueError, "x: expected a tensor of rank >= 1"),
])
def test_bad_input_names_the_argument(args, err, match):
    with pytest.raises(err, match=match):
        ps_kernels.skinny_linear(*args())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    if ps_kernels._backend.why_unavailable(OP, backend, CPU) is not None:
        pytest.skip(f"backend {backend} unavailable")
    torch.library.opcheck(torch.ops.ps_kernels.skinny_linear.default,
                          (torch.randn(3, 20), torch.randn(7, 20), torch.randn(7), backend))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_op_fake_matches_the_kernel(dtype):
    """The native op's own fake (ps_kernels._backend._FAKES), traced by torch.compile in place of
    the Python wrapper: opcheck compares it with the kernel (bf16: the pairs path's dtype)."""
    torch.library.opcheck(torch.ops.ps_kernels_C.skinny_linear.default,
                          (torch.randn(3, 40).to(dtype), torch.randn(9, 40).to(dtype), torch.randn(9)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_traces_the_op(backend):
    if ps_kernels._backend.why_unavailable(OP, backend, CPU) is not None:
        pytest.skip(f"backend {backend} unavailable")
    x, w = torch.randn(3, 20), torch.randn(7, 20)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, w):
        return ps_kernels.skinny_linear(x, w, validate=False, backend=backend) + 1

    torch.testing.assert_close(f(x, w), ref.skinny_linear(x, w) + 1)


@needs_native
@LEVELS
def test_routing_inside_the_block_only(level):
    from parallelspec.hf import linear
    from parallelspec.hf.linear import skinny_linears

    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    calls = []
    real = ps_kernels.skinny_linear

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    few, many = torch.randn(2, 3, 32), torch.randn(ps_kernels.skinny_linear_rows(CPU)[torch.float32][1] + 1, 32)
    ps_kernels.skinny_linear = spy
    try:
        with torch.no_grad():
            want_few, want_many = model(few), model(many)
            with skinny_linears(model):
                got_few = model(few)       # 6 rows: the native kernel, both layers
                got_many = model(many)     # past SKINNY_ROWS: torch
            with torch.enable_grad(), skinny_linears(model):
                model(few)                 # recording gradients: torch
        assert len(calls) == 2
        assert all("forward" not in m.__dict__ for m in model.modules())  # restored
    finally:
        ps_kernels.skinny_linear = real
    torch.testing.assert_close(got_few, want_few, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_many, want_many)


@needs_native
def test_every_block_installs_the_same_forward_object():
    """A compiled verify step guards on the identity of the modules' forward (parallelspec.compiled):
    each block installs the object the first one made, while the weights stay; a new weight gets a
    new one (so it is never served a stale tensor)."""
    from parallelspec.hf.linear import skinny_linears

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3))
    seen = []
    for _ in range(3):
        with skinny_linears(model):
            seen.append([m.__dict__["forward"] for m in model])
    assert all(a is b for later in seen[1:] for a, b in zip(seen[0], later))
    model[0].weight = torch.nn.Parameter(torch.randn(4, 8))
    with skinny_linears(model), torch.no_grad():
        assert model[0].__dict__["forward"] is not seen[0][0] and model[1].__dict__["forward"] is seen[0][1]
        x = torch.randn(2, 8)
        torch.testing.assert_close(model(x), torch.nn.functional.linear(
            torch.nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias))


@needs_native
def test_routing_follows_the_active_levels_table(monkeypatch):
    """A level without a measured-faster range for a dtype is not routed to (e.g. fp16 at the
    portable level); the level's range decides the rows."""
    from parallelspec.hf import linear

    before = ps_kernels._backend.cpu_level()   # the best level, or the one PS_KERNELS_CPU_CAPABILITY forces
    monkeypatch.setitem(ps_kernels.SKINNY_ROWS, "default", {torch.float32: (2, 3)})
    with ps_kernels._backend.force_cpu_capability("default"):
        assert linear.native_serves(CPU)
        w = torch.randn(5, 8)
        for rows, routed in ((1, False), (2, True), (3, True), (4, False)):
            calls = []
            real = ps_kernels.skinny_linear
            monkeypatch.setattr(ps_kernels, "skinny_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
            with torch.no_grad():
                linear.linear(torch.randn(rows, 8), w)
            assert bool(calls) == routed, rows
            monkeypatch.setattr(ps_kernels, "skinny_linear", real)
        monkeypatch.setitem(ps_kernels.SKINNY_ROWS, "default", {})
        assert not linear.native_serves(CPU)
    assert ps_kernels._backend.cpu_level() == before      # restored
    assert linear.native_serves(CPU) == bool(ps_kernels.SKINNY_ROWS[before])


@needs_native
@LEVELS
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_at_every_thread_count(level, dtype):
    """The threads split the weight rows in units of 8 (the one-row tile), so each row sums in one
    order whatever the thread count: a split at an odd row (1001 rows over 2 or 3 threads) once put
    the rows near it through the remainder tiles, whose sums run in another order."""
    g = torch.Generator().manual_seed(7)
    K = 1024    # 4 KiB fp32 rows: the smallest task (64 rows) lets 2 and 3 threads split 1001 rows
    w = torch.randn(1001, K, generator=g).to(dtype)
    b = torch.randn(1001, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        for M in (1, 2, 3, 5):
            x = torch.randn(M, K, generator=g).to(dtype)
            torch.set_num_threads(1)
            one = ps_kernels.skinny_linear(x, w, b, backend="cpu")
            for t in (2, 3):
                torch.set_num_threads(t)
                assert torch.equal(ps_kernels.skinny_linear(x, w, b, backend="cpu"), one), (M, t)
    finally:
        torch.set_num_threads(threads)
