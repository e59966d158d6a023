"""ps_kernels: kernels for ParallelSpec speculative decoding.

One public function per op; each picks a backend (``cuda`` > ``triton`` > ``reference`` on
CUDA tensors, ``cpu`` > ``reference`` on CPU tensors) unless ``backend=`` or the
``PS_KERNELS_BACKEND`` environment variable names one. ``backends()`` reports what this
install can run; ``cpu_capability()`` the instruction-set level the native CPU kernels run at
(the best this CPU has, or ``PS_KERNELS_CPU_CAPABILITY``).
"""
from ._backend import BackendUnavailable, CpuCapability, backends, cpu_capability
from .ops.draft_attention import draft_attention
from .ops.kv_rollback import kv_rollback
from .ops.skinny_linear import SKINNY_ROWS, skinny_linear
from .ops.tree_accept import tree_accept
from .ops.tree_attention import pack_tree_mask, tree_attention, tree_mask_from_parents

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "CpuCapability", "SKINNY_ROWS", "backends", "cpu_capability", "draft_attention", "kv_rollback", "pack_tree_mask",
           "skinny_linear", "tree_accept", "tree_attention", "tree_mask_from_parents"]
