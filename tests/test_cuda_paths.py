"""What of the CUDA paths a CPU can check: the backend each op gets on CUDA tensors (no op may
pick a backend it has no kernel for: skinny_linear on CUDA is the reference, i.e. cuBLAS),
PS_KERNELS_BACKEND=triton forcing the ops that have a Triton kernel, the kernel benchmark's
op/backend table, and the Triton launchers' device guard."""
import sys
from pathlib import Path

import pytest
import torch

from ps_kernels import BackendUnavailable, _backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_skinny_linear_on_cuda_is_the_reference_not_a_missing_kernel():
    assert _backend._select("skinny_linear", "cuda", None, None, False) == "reference"
    with pytest.raises(BackendUnavailable, match="no Triton kernel for skinny_linear"):
        _backend._select("skinny_linear", "cuda", "triton", None, False)
    assert "no Triton kernel" in _backend.why_unavailable("skinny_linear", "triton", torch.device("cuda"))
    # the ops that have a Triton kernel keep it
    for op in _backend.TRITON_OPS:
        assert _backend.why_unavailable(op, "triton", torch.device("cuda")) is None


def test_env_triton_forces_only_the_ops_with_a_triton_kernel(monkeypatch):
    monkeypatch.setenv("PS_KERNELS_BACKEND", "triton")
    cuda = torch.device("cuda")
    assert _backend.select("tree_attention", cuda, None) == "triton"
    assert _backend.select("kv_rollback", cuda, None) == "triton"
    assert _backend.select("skinny_linear", cuda, None) == "reference"
    # on a CPU (no interpreter) the native kernel keeps serving the linear layers
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.select("skinny_linear", torch.device("cpu"), None) in ("cpu", "reference")
    with pytest.raises(BackendUnavailable):   # asked by name: fails loudly
        _backend.select("skinny_linear", cuda, "triton")


def test_kernel_benchmark_skips_a_backend_without_a_kernel_with_its_reason():
    import bench_kernels

    table = bench_kernels.backend_table("skinny_linear", torch.device("cuda"))
    assert set(table) == {"cuda", "triton"} and all(table.values())   # both skipped, each with a reason
    assert "no Triton kernel" in table["triton"]
    assert bench_kernels.backend_table("tree_attention", torch.device("cuda"))["triton"] is None
    assert bench_kernels.backends_for("skinny_linear", torch.device("cuda")) == []
    assert "triton" in bench_kernels.SKIPPED["skinny_linear"]


def test_triton_launches_guard_the_tensors_device():
    from ps_kernels.triton_kernels import on_device

    with on_device(torch.zeros(1)):   # CPU tensors (the interpreter): nothing to set
        pass
    assert type(on_device(torch.zeros(1))).__name__ == "nullcontext"
