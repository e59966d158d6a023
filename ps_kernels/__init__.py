"""ps_kernels: kernels for ParallelSpec speculative decoding.

One public function per op; each picks a backend (``cuda`` > ``triton`` > ``reference`` on
CUDA tensors, ``cpu`` > ``reference`` on CPU tensors) unless ``backend=`` or the
``PS_KERNELS_BACKEND`` environment variable names one. ``backends()`` reports what this
install can run.
"""
from ._backend import BackendUnavailable, backends
from .ops.kv_rollback import kv_rollback

__version__ = "0.1.0"

__all__ = ["backends", "BackendUnavailable", "kv_rollback"]

# Ops added by later modules register themselves here when present.
try:
    from .ops.tree_attention import tree_attention, pack_tree_mask, tree_mask_from_parents  # noqa: F401
    __all__ += ["tree_attention", "pack_tree_mask", "tree_mask_from_parents"]
except ImportError:  # pragma: no cover - op not written yet
    pass
try:
    from .ops.draft_attention import draft_attention  # noqa: F401
    __all__ += ["draft_attention"]
except ImportError:  # pragma: no cover
    pass
try:
    from .ops.tree_accept import tree_accept  # noqa: F401
    __all__ += ["tree_accept"]
except ImportError:  # pragma: no cover
    pass
