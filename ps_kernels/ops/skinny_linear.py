"""skinny_linear: ``y = x W^T + b`` for a few rows of x, reading W once for all of them.

The verification pass of speculative decoding multiplies every weight of the target by a
handful of rows (batch x tree nodes). On a GPU that is free width; on a CPU, torch's GEMM for
2..32 rows costs up to several times its one-row GEMV (it is tuned for big matrices), which is
what made verifying a tree expensive here. The native CPU kernel streams each weight row once
for all rows of x (csrc/cpu/skinny_linear.h). Backends: ``cpu`` (native), ``reference``
(PyTorch, any device: on CUDA cuBLAS already handles few rows well, so it is the auto choice
there).

Rows: every leading dim of x counts (``x.numel() // K``). The kernel works for any number of
rows; ``SKINNY_ROWS[level][dtype]`` is the range where it measured faster than torch's F.linear
at each CPU capability level (``ps_kernels.cpu_capability()``; callers route by the active
level's, see ``parallelspec.linear``).
"""
from __future__ import annotations

import torch

from .. import _backend, _checks
from .. import reference as _ref

OP = "skinny_linear"
#: Per CPU capability level, per weight dtype: (fewest, most) rows of x for which the native
#: kernel beat torch's F.linear at that level, with torch held to the same instruction set
#: (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), over SmolLM2-135M's weights
#: (benchmarks/results/README.md, "Few-row linears"; the runs behind the ranges are in
#: benchmarks/results/kernels_cpu.json and benchmarks/results/variants/). A level or dtype missing
#: here is not routed to (the kernel still runs when asked for by name).
_AVX512_ROWS = {torch.float32: (1, 32), torch.bfloat16: (1, 4), torch.float16: (2, 32)}
SKINNY_ROWS = {
    "default": {torch.float32: (4, 8), torch.bfloat16: (1, 32)},
    "avx2": {torch.float32: (1, 32), torch.bfloat16: (1, 32), torch.float16: (1, 32)},
    "avx512": _AVX512_ROWS,
    "avx512_bf16": _AVX512_ROWS,
}


@torch.library.custom_op("ps_kernels::skinny_linear", mutates_args=())
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return _run(x, weight, bias, backend)


@_skinny_linear_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def _run(x, weight, bias, backend):
    if backend == "cpu":
        return torch.ops.ps_kernels_C.skinny_linear(x, weight, bias)
    if backend == "reference":
        return _ref.skinny_linear(x, weight, bias)
    raise AssertionError(backend)  # resolved by _backend.select


def _validate(x, weight, bias):
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected a tensor of rank >= 1 ([..., K]), got a scalar")
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    _checks.shape("weight", weight, (None, x.shape[-1]), f"(N, K) with K = x.shape[-1] = {x.shape[-1]}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES, device=x.device)
        _checks.shape("bias", bias, (weight.shape[0],), "(N, one per row of weight)")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias [N])`` -> ``[..., N]`` in x's dtype.

    Same result as ``torch.nn.functional.linear`` up to fp32 summation order (products and sums
    in fp32 for every dtype, rounded once). weight may be fp32/fp16/bf16 whatever x's dtype is
    (it is widened to fp32 as it is read); a non-contiguous weight is copied first.

    Args:
        x: ``[..., K]`` fp32/fp16/bf16; the rows are every leading position.
        weight: ``[N, K]`` (an ``nn.Linear``'s weight).
        bias: ``[N]`` or None.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``.
        validate: check shapes, dtypes and devices (pass False in hot loops whose shapes are
            right by construction; the native binding still checks what memory safety needs).

    Example::

        >>> layer = torch.nn.Linear(576, 1536)
        >>> x = torch.randn(1, 4, 576)                  # 4 tree nodes
        >>> y = skinny_linear(x, layer.weight, layer.bias)
        >>> torch.allclose(y, layer(x), atol=1e-5)
        True
    """
    if validate:
        _validate(x, weight, bias)
    return launch(x, weight, bias, _backend.select(OP, x.device, backend))


def skinny_linear_rows(device: torch.device | str = "cpu") -> dict[torch.dtype, tuple[int, int]]:
    """The routing query: per weight dtype, the (fewest, most) rows of x for which ``skinny_linear``
    on `device` runs the native CPU kernel and measured faster than torch's F.linear at the active
    CPU capability level (``SKINNY_ROWS``). Empty where the native CPU kernel does not serve
    `device` (CUDA, no native library, ``PS_KERNELS_BACKEND`` naming another backend) or the level
    has no measured range. A caller routes few-row linears by it once per block of calls, then
    calls ``skinny_linear(x, w, b, backend="cpu", validate=False)`` for x with rows in range.

    Example::

        >>> ps_kernels.skinny_linear_rows("cpu").get(torch.float32)
        (1, 32)
    """
    try:
        if _backend.select(OP, torch.device(device), None) != "cpu":
            return {}
    except (ValueError, _backend.BackendUnavailable):  # PS_KERNELS_BACKEND names another backend
        return {}
    return dict(SKINNY_ROWS.get(_backend.cpu_level(), {}))


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """``skinny_linear`` past validation, with `backend` already resolved."""
    if backend == "cpu" and not weight.is_contiguous():
        weight = weight.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    run = _skinny_linear_op if torch.compiler.is_compiling() and backend != "cpu" else _run  # as in tree_attention
    return run(x2, weight, bias, backend).reshape(*lead, weight.shape[0])
