"""ps_kernels: kernels for ParallelSpec speculative decoding.

One public function per op; each picks a backend (``cuda`` > ``triton`` > ``reference`` on
CUDA tensors, ``cpu`` > ``reference`` on CPU tensors) unless ``backend=`` or the
``PS_KERNELS_BACKEND`` environment variable names one. ``backends()`` reports what this
install can run; ``cpu_capability()`` the instruction-set level the native CPU kernels run at
(the best this CPU has, or ``PS_KERNELS_CPU_CAPABILITY``), ``force_cpu_capability(level)`` runs a
block at a lower one, ``runnable_cpu_levels()`` lists those this machine can run and
``native_build_id()`` names the loaded native build (measurements cached against it go stale
when it changes). ``attention_plan(...)`` makes a decoding step's attention plan once for all
its layers (the ops' ``plan=``). ``skinny_linear_rows(device)`` is the routing query for few-row linears.
"""
from ._backend import (BackendUnavailable, CpuCapability, backends, cpu_capability, force_cpu_capability,
                       native_build_id, runnable_cpu_levels)
from .ops.attention_plan import AttentionPlan, attention_plan
from .ops.draft_attention import draft_attention
from .ops.kv_rollback import kv_rollback
from .ops.skinny_linear import SKINNY_ROWS, skinny_linear, skinny_linear_rows
from .ops.tree_accept import tree_accept
from .ops.tree_attention import pack_tree_mask, tree_attention, tree_mask_from_parents

__version__ = "0.1.0"

__all__ = ["AttentionPlan", "BackendUnavailable", "CpuCapability", "attention_plan", "SKINNY_ROWS", "backends", "cpu_capability", "draft_attention",
           "force_cpu_capability", "kv_rollback", "native_build_id", "pack_tree_mask", "runnable_cpu_levels",
           "skinny_linear", "skinny_linear_rows", "tree_accept", "tree_attention", "tree_mask_from_parents"]
