"""Few-row linear layers through ``ps_kernels.skinny_linear``.

A decoding step multiplies every weight by a handful of rows (batch x tree nodes, or the
drafter's new tokens and mask slots). On a CPU torch's GEMM is slow there (module docstring of
``ps_kernels.ops.skinny_linear``), so inside ``skinny_linears(module)`` every ``nn.Linear``
of the module runs the native kernel when its input has as many rows as
``ps_kernels.SKINNY_ROWS[level][dtype]`` allows for the active CPU capability level (where it
measured faster than torch at that level), no gradient is being
recorded, and the native CPU backend serves the device; otherwise (prefill, training, CUDA)
it runs ``F.linear`` as before. The modules are patched for the duration of
the block only (an instance attribute ``forward``, removed afterwards): no modeling code is
forked and the model is unchanged outside the block.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import ps_kernels
from ps_kernels import _backend
from ps_kernels.ops.skinny_linear import launch as _launch


def native_serves(device: torch.device) -> bool:
    """True when skinny_linear would run the native CPU kernel for tensors on `device` and the
    active CPU capability level has a row range measured faster than torch (SKINNY_ROWS; e.g.
    the portable `default` level may have none)."""
    try:
        return _backend.select("skinny_linear", device, None) == "cpu" and bool(_level_rows())
    except (ValueError, _backend.BackendUnavailable):  # PS_KERNELS_BACKEND names another backend
        return False


def _level_rows() -> dict:
    """SKINNY_ROWS of the active capability level (its dtype -> row range)."""
    return ps_kernels.SKINNY_ROWS.get(_backend.cpu_level(), {})


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the native few-row kernel where it is faster (module docstring)."""
    return _routed(x, weight, bias) if native_serves(x.device) else F.linear(x, weight, bias)


def _routed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` once native_serves is known to hold: only the per-call conditions are checked
    (a decoding step makes ~200 of these calls), then the op is launched on the native CPU
    backend, the choice native_serves already made (``ps_kernels.skinny_linear`` making it again
    doubled each call's ~4 us of host time)."""
    K = x.shape[-1]
    if x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == weight.dtype and K:
        lo, hi = _level_rows().get(x.dtype, (1, 0))
        if lo <= x.numel() // K <= hi:
            return _launch(x, weight, bias, "cpu")
    return F.linear(x, weight, bias)


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _routed(x, module.weight, module.bias)  # patched only where native_serves held


@contextlib.contextmanager
def skinny_linears(module: nn.Module):
    """Route the module's nn.Linear layers through `linear` inside the block (nothing is patched
    where the native kernel does not serve)."""
    patched = []
    if native_serves(torch.device("cpu")):
        for m in module.modules():
            if type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.device.type == "cpu":
                m.forward = _forward.__get__(m)  # bound method: the module's own forward, routed
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
