"""Few-row linear layers through ``ps_kernels.skinny_linear``.

A decoding step multiplies every weight by a handful of rows (batch x tree nodes, or the
drafter's new tokens and mask slots). On a CPU torch's GEMM is slow there (module docstring of
``ps_kernels.ops.skinny_linear``), so inside ``skinny_linears(module)`` every ``nn.Linear``
of the module runs the native kernel when its input has as many rows as
``ps_kernels.SKINNY_ROWS[level][dtype]`` allows for the active CPU capability level (where it
measured faster than torch at that level), no gradient is being
recorded, and the native CPU backend serves the device; otherwise (prefill, training, CUDA)
it runs ``F.linear`` as before. The modules are patched while a block is active (an instance
attribute ``forward``, removed when the last block ends): no modeling code is forked, the model
is unchanged outside the blocks, and only the threads inside a block are routed (another
thread running the same model at the same time gets ``F.linear``).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import ps_kernels


def native_serves(device: torch.device) -> bool:
    """True when skinny_linear would run the native CPU kernel for tensors on `device` and the
    active CPU capability level has a row range measured faster than torch (SKINNY_ROWS; e.g.
    the portable `default` level may have none)."""
    return bool(ps_kernels.skinny_linear_rows(device))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the native few-row kernel where it is faster (module docstring)."""
    rows = ps_kernels.skinny_linear_rows(x.device)
    return _routed(x, weight, bias, rows) if rows else F.linear(x, weight, bias)


def _routed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: dict) -> torch.Tensor:
    """`linear` with the routing query's answer `rows` (dtype -> row range) already in hand: only
    the per-call conditions are checked (a decoding step makes ~200 of these calls), then the op
    runs on the native CPU backend that answer named, without validation."""
    K = x.shape[-1]
    if x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == weight.dtype and K:
        lo, hi = rows.get(x.dtype, (1, 0))
        if lo <= x.numel() // K <= hi:
            return ps_kernels.skinny_linear(x, weight, bias, backend="cpu", validate=False)
    return F.linear(x, weight, bias)


# Routing is decided per thread: the patch is installed once while any block on a module is
# active (a count per nn.Linear, under a lock) and removed when the last one ends, and the patched
# forward routes only the calls of a thread that is inside a block (its routing answer in
# _local.rows); any other thread, e.g. one running the plain model at the same time, gets F.linear.
_lock = threading.Lock()
_installed: dict[int, list] = {}      # id(module) -> [module, number of active blocks over it]
_local = threading.local()            # .rows: this thread's routing answer inside a block, else absent
# module -> its patched forward, made once and reinstalled by every later block while the module
# keeps its weight and bias objects: a compiled graph guards on the forward's identity
# (parallelspec.compiled), so a new object per block would recompile every generate call
_forwards: "weakref.WeakKeyDictionary[nn.Module, functools.partial]" = weakref.WeakKeyDictionary()


def _forward_of(m: nn.Linear) -> functools.partial:
    kept = _forwards.get(m)
    if kept is None or kept.keywords["weight"] is not m.weight or kept.keywords["bias"] is not m.bias:
        kept = _forwards[m] = functools.partial(_dispatch, weight=m.weight, bias=m.bias)
    return kept


def _dispatch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A patched nn.Linear's forward: routed in a thread inside a block, F.linear in any other."""
    rows = getattr(_local, "rows", None)
    return _routed(x, weight, bias, rows) if rows else F.linear(x, weight, bias)


@contextlib.contextmanager
def skinny_linears(module: nn.Module):
    """Route the module's nn.Linear layers through `linear` inside the block, for the calling
    thread only (nothing is routed where the native kernel does not serve). Blocks may run at the
    same time in several threads and nest; the modules are restored when the last block ends,
    also on an exception."""
    rows = ps_kernels.skinny_linear_rows("cpu")
    if not rows:
        yield
        return
    mine = []
    with _lock:
        for m in module.modules():
            entry = _installed.get(id(m))
            if entry is not None:
                entry[1] += 1
                mine.append(m)
            elif type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.device.type == "cpu":
                # the module's own forward, dispatched (an instance attribute, removed afterwards)
                m.forward = _forward_of(m)
                _installed[id(m)] = [m, 1]
                mine.append(m)
    outer = getattr(_local, "rows", None)
    _local.rows = rows
    try:
        yield
    finally:
        _local.rows = outer
        with _lock:
            for m in mine:
                entry = _installed[id(m)]
                entry[1] -= 1
                if entry[1] == 0:
                    del _installed[id(m)]
                    del m.forward
