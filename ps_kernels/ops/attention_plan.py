"""attention_plan: the split plan and scratch of the GPU attention kernels, made once per decoding
step for all of its layers (FlashInfer's plan() / run()).

Every layer of a step calls tree_attention (or draft_attention) with the same shapes, so how the
kernels split the prefix across the GPU (split-KV) and the fp32 scratch their partial results
take are the same for all of them. Without a plan each call plans again, reads the device's SM
count and allocates that scratch; with one, the step plans once::

    plan = ps_kernels.attention_plan("tree_attention", batch=B, q_heads=Hq, kv_heads=Hkv, rows=N,
                                     head_dim=D, max_prefix=S, window=None, device=q.device)
    for layer in layers:                      # the same shapes in every layer
        out = ps_kernels.tree_attention(q, k, v, kc, vc, lens, mask, plan=plan)

A plan names the backend it was made for (the op's automatic choice for these shapes, or
``backend=``), and the op runs that backend. It is checked against each call: another op, device,
backend, shape (batch, heads, rows, head dim) or window is refused with an error saying which.
``max_prefix`` bounds the prefix lengths (``cache_lens``; the cache capacity when the caller knows
no better): any bound gives the right result, a tight one balances the splits better. Layers with
different windows (Gemma's local and global layers) take one plan each.

On the CPU (and for the reference) a plan holds no split and no scratch: the op checks it and
runs as without one. The CUDA plan comes from the kernels' own planner
(``ps_kernels_C::attention_split_plan``, csrc/cuda/attention_plan.h, registered in every native
build); ``cuda_split_plan`` mirrors it where the native library is absent. The Triton plan is
the Triton kernel's (``triton_kernels/attention_core.plan_splits``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _backend

OPS = ("tree_attention", "draft_attention")

# csrc/cuda/attention_plan.h
_CUDA_ROWS_PER_CTA = 16
_CUDA_KEYS = 32
_CUDA_MIN_SPLIT_ROWS = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cuda_split_plan(batch: int, q_heads: int, kv_heads: int, rows: int, head_dim: int, max_prefix: int, window: int,
                    num_sms: int) -> tuple[int, int, int]:
    """The CUDA kernels' plan(), as csrc/cuda/attention_plan.h computes it: (num_splits,
    split_rows, workspace_floats). window 0 = none."""
    span = window - 1 if 0 < window and window - 1 < max_prefix else max_prefix
    ctas = batch * kv_heads * _cdiv(rows * (q_heads // kv_heads), _CUDA_ROWS_PER_CTA)
    splits = _cdiv(2 * num_sms, ctas) if ctas > 0 else 1
    splits = max(1, min(splits, span // _CUDA_MIN_SPLIT_ROWS))
    split_rows = _cdiv(_cdiv(max(span, 1), splits), _CUDA_KEYS) * _CUDA_KEYS
    floats = batch * q_heads * rows * splits * (head_dim + 1) if splits > 1 else 0
    return splits, split_rows, floats


def native_split_plan(batch: int, q_heads: int, kv_heads: int, rows: int, head_dim: int, max_prefix: int,
                      window: int, num_sms: int) -> tuple[int, int, int] | None:
    """ps_kernels_C::attention_split_plan (the kernels' own planner), or None without it."""
    loaded, _ = _backend.native_library()
    if not loaded or not hasattr(torch.ops.ps_kernels_C, "attention_split_plan"):
        return None
    return tuple(torch.ops.ps_kernels_C.attention_split_plan(batch, q_heads, kv_heads, rows, head_dim, max_prefix,
                                                            window, num_sms))


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """A step's attention plan (make it with ``attention_plan``). ``num_splits`` /
    ``split_rows``: how the kernels cut the prefix; ``workspace``: their fp32 scratch (None on
    the CPU and the reference, which neither split nor need one)."""
    op: str
    backend: str
    device: torch.device
    batch: int
    q_heads: int
    kv_heads: int
    rows: int
    head_dim: int
    max_prefix: int
    window: int
    num_splits: int
    split_rows: int
    workspace: torch.Tensor | None

    def check(self, op: str, q: torch.Tensor, kv_heads: int, window: int, backend: str | None) -> str:
        """The backend this plan runs for a call of `op` with q [B, Hq, rows, D], kv_heads and
        window (0 = none); ValueError naming what differs when the plan was made for another call."""
        shape = tuple(q.shape) + (None,) * (4 - q.dim())   # a bad q (validate=False) is the binding's to refuse
        want = {"op": op, "device": q.device, "batch": shape[0], "q_heads": shape[1], "kv_heads": kv_heads,
                "rows": shape[2], "head_dim": shape[3], "window": window}
        if backend is not None and backend != "auto":
            want["backend"] = backend
        for name, value in want.items():
            mine = getattr(self, name)
            if name == "device":
                same = mine.type == value.type and (mine.index == value.index or mine.type == "cpu")
            else:
                same = mine == value
            if not same:
                raise ValueError(f"plan: expected a plan made for this call's {name} = {value!r}, got a plan made "
                                 f"for {name} = {mine!r} (ps_kernels.attention_plan({op!r}, ...) with this call's "
                                 f"shapes; one plan per op, shape and window)")
        return self.backend

    def launch_args(self) -> tuple[int, int, torch.Tensor | None]:
        return self.num_splits, self.split_rows, self.workspace


def _count(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
    return value


def attention_plan(op: str, *, batch: int, q_heads: int, kv_heads: int, rows: int, head_dim: int, max_prefix: int,
                   device: torch.device | str, window: int | None = None, backend: str | None = None,
                   num_sms: int | None = None) -> AttentionPlan:
    """The plan of one decoding step's ``op`` calls (module docstring).

    Args:
        op: ``"tree_attention"`` or ``"draft_attention"``.
        batch, q_heads, kv_heads, rows, head_dim: the calls' q ``[batch, q_heads, rows, head_dim]``
            and KV heads (``rows``: tree nodes N, or draft rows T = R + num_masks).
        max_prefix: a bound of the prefix lengths (``cache_lens``), e.g. the cache capacity S.
        device: the tensors' device.
        window: the calls' sliding window (None = none).
        backend: as the op's ``backend=`` (None: the op's automatic choice for these shapes).
        num_sms: the GPU's SM count (default: read from the device; Triton in the interpreter:
            1). Only tests set it.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    device = torch.device(device)
    for name, value, least in (("batch", batch, 0), ("q_heads", q_heads, 0), ("kv_heads", kv_heads, 1),
                               ("rows", rows, 0), ("head_dim", head_dim, 1), ("max_prefix", max_prefix, 0)):
        _count(name, value, least)
    if q_heads % kv_heads:
        raise ValueError(f"kv_heads: expected a number of KV heads that divides q_heads = {q_heads}, got {kv_heads}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window: expected None or an int >= 1 (the sliding window, in positions), got {window!r}")
    window = window or 0
    auto = None
    if op == "tree_attention":
        from .tree_attention import auto_order
        auto = auto_order(device, rows, q_heads, kv_heads)
    name = _backend.select(op, device, backend, auto)
    splits, split_rows, floats, workspace = 1, 0, 0, None
    if name in ("cuda", "triton"):
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        _count("num_sms", num_sms, 1)
        shape = (batch, q_heads, kv_heads, rows, head_dim, max_prefix, window, num_sms)
        if name == "cuda":
            splits, split_rows, floats = native_split_plan(*shape) or cuda_split_plan(*shape)
        else:
            from ..triton_kernels.attention_core import plan_splits
            splits, split_rows, floats = plan_splits(*shape)
        workspace = torch.empty(floats, dtype=torch.float32, device=device)
    return AttentionPlan(op, name, device, batch, q_heads, kv_heads, rows, head_dim, max_prefix, window, splits,
                         split_rows, workspace)


def plan_for(op: str, plan: AttentionPlan | None, q: torch.Tensor, kv_heads: int, window: int,
             backend: str | None) -> str:
    """The backend a call with `plan` runs (the ops' entry): the plan's, after checking it."""
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"plan: expected None or a ps_kernels.attention_plan(...) result, got {type(plan).__name__}")
    return plan.check(op, q, kv_heads, window, backend)


__all__ = ["AttentionPlan", "attention_plan", "cuda_split_plan", "native_split_plan"]
