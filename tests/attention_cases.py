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
