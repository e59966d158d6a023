"""parallelspec: ParallelSpec speculative decoding on top of ps_kernels.

The public names load on first use (torch, transformers and the kernels take seconds to
import; ``parallelspec --help`` needs none of them)."""
import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "AutoTree": ".trees", "KVCache": ".cache", "load_drafter": ".defaults",
    "DraftCandidates": ".drafters", "Drafter": ".drafters", "EagleDrafter": ".drafters",
    "HybridDrafter": ".drafters", "NgramDrafter": ".drafters", "ParallelDrafter": ".drafters",
    "GenerationStats": ".engine",
    "CUSTOM_GENERATE_DIR": ".hf.generate", "custom_generate": ".hf.generate", "generate": ".hf.generate",
    "patch": ".hf.generate", "unpatch": ".hf.generate",
    "ChainTree": ".trees", "DynamicTree": ".trees", "StaticTree": ".trees", "Tree": ".trees",
    "TreeBuilder": ".trees",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parallelspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


