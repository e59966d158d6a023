import pytest
import torch
from hypothesis import given, strategies as st

import ps_kernels
from ps_kernels import reference as ref

from helpers import DEVICE, runnable_backends

BACKENDS = runnable_backends("kv_rollback")


def random_case(rng: torch.Generator, L, B, H, S, D, max_tree, dtype, device=DEVICE):
    kv = torch.randn(L, 2, B, H, S, D, generator=rng).to(dtype).to(device)
    cache_lens = torch.randint(0, S - max_tree + 1, (B,), generator=rng)
    A = max_tree
    idx = torch.zeros(B, A, dtype=torch.int64)
    lens = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(0, A + 1, (1,), generator=rng))
        rows = torch.randperm(max_tree, generator=rng)[:n].sort().values
        idx[b, :n] = rows
        lens[b] = n
    return kv, cache_lens.to(device), idx.to(device), lens.to(device)


def run_both(backend, kv, cache_lens, idx, lens):
    kv_ref, lens_ref = kv.clone(), cache_lens.clone()
    ref.kv_rollback(kv_ref, lens_ref, idx, lens)
    ps_kernels.kv_rollback(kv, cache_lens, idx, lens, backend=backend)
    return (kv, cache_lens), (kv_ref, lens_ref)


def _dtypes(backend):
    # bf16 keeps raw bits in the Triton interpreter; the kernel moves raw bits anyway, but the
    # brief asks to keep bf16 out of interpreter tests.
    if backend == "triton" and DEVICE.type == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_matches_reference_random_ragged(backend, data):
    interp = backend == "triton" and DEVICE.type == "cpu"
    dtype = data.draw(st.sampled_from(_dtypes(backend)))
    L = data.draw(st.integers(1, 3 if interp else 40))
    B = data.draw(st.integers(1, 3 if interp else 8))
    H = data.draw(st.integers(1, 3))
    D = data.draw(st.sampled_from([64, 80, 128]))
    max_tree = data.draw(st.integers(1, 12))
    S = data.draw(st.integers(max_tree, max_tree + 40))
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    got, want = run_both(backend, *random_case(rng, L, B, H, S, D, max_tree, dtype))
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("reference", id="reference")])
def test_overlapping_rows_move_without_race(backend):
    # accept_index [1, 3]: row 1 -> 0 and row 3 -> 1; [0, 1, 2] is the identity; [2..9] shifts
    # a long run down by 2, where every destination is also a later source.
    L, B, H, S, D = 2, 3, 2, 16, 64
    kv = torch.arange(L * 2 * B * H * S * D, dtype=torch.float32).reshape(L, 2, B, H, S, D).to(DEVICE)
    cache_lens = torch.tensor([3, 0, 4], device=DEVICE)
    idx = torch.tensor([[1, 3, 0, 0, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0], [2, 3, 4, 5, 6, 7, 8, 9]], device=DEVICE)
    lens = torch.tensor([2, 3, 8], device=DEVICE)
    expected = kv.clone()
    for b in range(B):
        for i in range(int(lens[b])):
            expected[:, :, b, :, int(cache_lens[b]) + i] = kv[:, :, b, :, int(cache_lens[b]) + int(idx[b, i])]
    ps_kernels.kv_rollback(kv, cache_lens, idx, lens, backend=backend)
    assert torch.equal(kv, expected)
    assert cache_lens.tolist() == [5, 3, 12]


def test_rows_beyond_new_length_and_other_sequences_untouched():
    kv = torch.randn(2, 2, 2, 1, 10, 64)
    before = kv.clone()
    lens = torch.tensor([2, 5])
    ps_kernels.kv_rollback(kv, lens, torch.tensor([[3, 0], [0, 0]]), torch.tensor([1, 0]))
    assert torch.equal(kv[:, :, 0, :, 2], before[:, :, 0, :, 5])
    assert torch.equal(kv[:, :, 0, :, :2], before[:, :, 0, :, :2])
    assert torch.equal(kv[:, :, 0, :, 3:], before[:, :, 0, :, 3:])
    assert torch.equal(kv[:, :, 1], before[:, :, 1])
    assert lens.tolist() == [3, 5]


def _good():
    return (torch.zeros(1, 2, 2, 1, 8, 64), torch.tensor([2, 3]), torch.tensor([[0, 2], [1, 0]]),
            torch.tensor([2, 1]))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: (a[0].to(torch.int32), *a[1:]), "kv_cache: expected dtype"),
    (lambda a: (a[0][0], *a[1:]), "kv_cache: expected a tensor of rank 6"),
    (lambda a: (a[0].transpose(4, 5), *a[1:]), "kv_cache: expected a contiguous"),
    (lambda a: (a[0], a[1].to(torch.int32), *a[2:]), "cache_lens: expected dtype int64"),
    (lambda a: (a[0], torch.tensor([2]), *a[2:]), r"cache_lens: expected shape \(2\)"),
    (lambda a: (a[0], a[1], torch.tensor([[2, 0], [1, 0]]), a[3]), "accept_index: expected strictly increasing"),
    (lambda a: (a[0], a[1], torch.tensor([[0, 6], [1, 0]]), a[3]), "outside the cache"),
    (lambda a: (a[0], a[1], torch.tensor([[-1, 2], [1, 0]]), a[3]), "accept_index: expected non-negative"),
    (lambda a: (a[0], a[1], a[2], torch.tensor([3, 1])), r"accept_lens: expected values in \[0, 2\]"),
    (lambda a: (a[0], torch.tensor([2, 9]), *a[2:]), r"cache_lens: expected values in \[0, 8\]"),
    (lambda a: (a[0], a[1], a[2].float(), a[3]), "accept_index: expected dtype int32/int64"),
    (lambda a: (a[0], a[1], a[2], [2, 1]), "accept_lens: expected a torch.Tensor"),
])
def test_bad_input_names_argument_and_writes_nothing(mutate, match):
    args = mutate(_good())
    kv_before = args[0].clone() if isinstance(args[0], torch.Tensor) else None
    lens_before = args[1].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        ps_kernels.kv_rollback(*args)
    assert torch.equal(args[1], lens_before)
    if kv_before is not None:
        assert torch.equal(args[0], kv_before)


def test_forced_unavailable_backend_raises_with_reason(monkeypatch):
    with pytest.raises(ps_kernels.BackendUnavailable, match="backend 'cuda' runs on CUDA tensors"):
        ps_kernels.kv_rollback(*_good(), backend="cuda")
    monkeypatch.setenv("PS_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend: expected one of"):
        ps_kernels.kv_rollback(*_good())


def test_backend_environment_is_read_live(monkeypatch):
    """select() reads PS_KERNELS_BACKEND on every call (not a snapshot taken at import)."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("PS_KERNELS_BACKEND", "reference")
    assert ps_kernels._backend.select("kv_rollback", cpu, None) == "reference"
    monkeypatch.delenv("PS_KERNELS_BACKEND")
    auto = "cpu" if ps_kernels._backend.why_unavailable("kv_rollback", "cpu", cpu) is None else "reference"
    assert ps_kernels._backend.select("kv_rollback", cpu, None) == auto
    monkeypatch.setenv("PS_KERNELS_BACKEND", "auto")
    assert ps_kernels._backend.select("kv_rollback", cpu, None) == auto


def test_opcheck():
    kv, lens, idx, alens = _good()
    kv = torch.randn_like(kv)
    for backend in ("reference", "cpu"):
        if ps_kernels._backend.why_unavailable("kv_rollback", backend, kv.device) is None:
            torch.library.opcheck(torch.ops.ps_kernels.kv_rollback.default,
                                  (kv.clone(), lens.clone(), idx, alens, backend))


def test_torch_compile_traces_the_op():
    kv, lens, idx, alens = _good()
    kv = torch.randn_like(kv)
    kv2, lens2 = kv.clone(), lens.clone()

    @torch.compile(backend="eager", fullgraph=True)
    def step(kv, lens, idx, alens):
        torch.ops.ps_kernels.kv_rollback(kv, lens, idx, alens, "reference")
        return lens * 1

    out = step(kv, lens, idx, alens)
    ref.kv_rollback(kv2, lens2, idx, alens)
    assert torch.equal(kv, kv2) and torch.equal(out, lens2)
