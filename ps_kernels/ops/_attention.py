"""What tree_attention and draft_attention share: the argument checks on (q, new K/V, cache),
the default scale, the output buffers, and the cache-capacity check.

Contract between these ops and their backends (reference, native ``ps_kernels_C``, Triton):
``q``, ``k_new``, ``v_new`` arrive contiguous (the op copies them when they are not), the
caches contiguous (checked: they are views ``kv[l, 0]`` / ``kv[l, 1]`` of the contiguous
``[L, 2, B, H_kv, S, D]`` cache), ``cache_lens`` contiguous int64, ``scale`` resolved to a float,
and ``out`` ``[B, Hq, N, D]`` (q's dtype) / ``lse`` ``[B, Hq, N]`` fp32 preallocated contiguous.
The optional features reach every backend in this order, right after ``scale``: ``window`` an
int (0 = no window), ``softcap`` a float (0.0 = off), ``sinks`` None or a contiguous fp32 ``[Hq]``
tensor on q's device (see the references for their meaning).
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from . import attention_plan as _plan


def check_inputs(q, k_new, v_new, k_cache, v_cache, cache_lens, rows: str) -> tuple[int, int, int, int, int, int]:
    """Shapes, dtypes and devices of the arguments both ops share; `rows` names q's dim 2 in
    messages ("N" tree nodes, "T" draft rows). Returns (B, Hq, Hkv, rows, D, S)."""
    _checks.tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    dev, dt = q.device, (q.dtype,)
    _checks.tensor("k_new", k_new, ndim=4, dtypes=dt, device=dev)
    _checks.tensor("v_new", v_new, ndim=4, dtypes=dt, device=dev)
    _checks.tensor("k_cache", k_cache, ndim=4, dtypes=dt, device=dev, contiguous=True)
    _checks.tensor("v_cache", v_cache, ndim=4, dtypes=dt, device=dev, contiguous=True)
    _checks.tensor("cache_lens", cache_lens, ndim=1, dtypes=(torch.int64,), device=dev, contiguous=True)
    B, Hq, N, D = q.shape
    Hkv = k_new.shape[1]
    _checks.shape("k_new", k_new, (B, None, N, D), f"(B, Hkv, {rows}, D) with B, {rows}, D of q")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k_new: expected a number of KV heads that divides q's {Hq} query heads "
                         f"(grouped-query attention), got {Hkv}")
    _checks.shape("v_new", v_new, tuple(k_new.shape), "(the shape of k_new)")
    _checks.shape("k_cache", k_cache, (B, Hkv, None, D), "(B, Hkv, S, D) with B, Hkv, D of k_new")
    _checks.shape("v_cache", v_cache, tuple(k_cache.shape), "(the shape of k_cache)")
    _checks.shape("cache_lens", cache_lens, (B,), "(one per sequence of q)")
    return B, Hq, Hkv, N, D, k_cache.shape[2]


#: backends whose torch bindings check the shape/dtype/contiguity contract themselves (in C++,
#: cheaply): with validate=False the Python checks are skipped for them (hot loops pay ~30 us of
#: Python per call for those checks, 30 layers per decode step)
NATIVE = ("cpu", "cuda")


def check_scale(scale, head_dim: int) -> float:
    """None -> 1/sqrt(D); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.SymFloat):  # torch.compile with dynamic shapes traces it symbolic: no value to check
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected None or a finite float, got {scale!r}")
    return float(scale)


def check_features(window, softcap, sinks, q: torch.Tensor, check_sinks: bool = True) -> tuple[int, float, torch.Tensor | None]:
    """The optional features, checked, in the backends' form: (window, 0 = none; softcap, 0.0 =
    off; sinks contiguous, or None). check_sinks=False skips the sinks tensor's checks (the
    native bindings check them: validate=False)."""
    window_msg = f"window: expected None or an int >= 1 (the sliding window, in positions), got {window!r}"
    if window is None:
        window = 0
    elif isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(window_msg)
    elif window < 1:
        raise ValueError(window_msg)
    softcap_msg = f"softcap: expected None or a finite float > 0 (scores become softcap * tanh(s / softcap)), got {softcap!r}"
    if softcap is None:
        softcap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(softcap_msg)
    elif not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(softcap_msg)
    if sinks is not None:
        if check_sinks:
            _checks.tensor("sinks", sinks, ndim=1, dtypes=(torch.float32,), device=q.device)
            _checks.shape("sinks", sinks, (q.shape[1],), "(one logit per query head of q)")
        sinks = sinks.contiguous()
    return int(window), float(softcap), sinks


def contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


def empty_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, N, D] in q's dtype and lse [B, Hq, N] fp32, both contiguous."""
    B, Hq, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)


def cache_room_error(base: torch.Tensor, need: torch.Tensor, capacity: int, need_what: str) -> str | None:
    """Host tensors base = cache_lens, need = rows written per sequence. The message for the
    first sequence whose prefix is negative or whose rows do not fit, or None."""
    bad = (base < 0).nonzero()
    if len(bad):
        b = int(bad[0])
        return f"cache_lens: expected non-negative prefix lengths, got cache_lens[{b}] = {int(base[b])}"
    over = (base + need > capacity).nonzero()
    if len(over):
        b = int(over[0])
        return (f"cache_lens: expected cache_lens[b] + {need_what} <= {capacity} (the cache capacity "
                f"S = k_cache.shape[2]), got cache_lens[{b}] + {int(need[b])} = {int(base[b] + need[b])}")
    return None


def resolve(op: str, name: str, q: torch.Tensor, kv_heads: int, scale, window, softcap, sinks, plan, backend,
            validate: bool):
    """What both attention ops do after choosing the backend `name`: the scale and the optional
    features checked (the sinks tensor's checks left to the native bindings when validate=False),
    and a plan checked against the call, which then names the backend and the launch arguments.
    -> (backend, scale, window, softcap, sinks, launch arguments)."""
    scale = check_scale(scale, q.shape[-1])
    window, softcap, sinks = check_features(window, softcap, sinks, q, check_sinks=validate or name not in NATIVE)
    launch = ()
    if plan is not None:
        name = _plan.plan_for(op, plan, q, kv_heads, window, backend)
        launch = plan.launch_args() if name in ("cuda", "triton") else ()
    return name, scale, window, softcap, sinks, launch
