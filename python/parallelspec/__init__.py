"""parallelspec: ParallelSpec speculative decoding on top of ps_kernels."""
__version__ = "0.1.0"

from .autotree import AutoTree
from .cache import KVCache
from .defaults import load_drafter
from .drafters import DraftCandidates, Drafter, EagleDrafter, HybridDrafter, NgramDrafter, ParallelDrafter
from .engine import GenerationStats
from .generate import CUSTOM_GENERATE_DIR, custom_generate, generate, patch, unpatch
from .trees import ChainTree, DynamicTree, StaticTree, Tree, TreeBuilder

__all__ = ["AutoTree", "CUSTOM_GENERATE_DIR", "ChainTree", "DraftCandidates", "Drafter", "DynamicTree",
           "EagleDrafter", "GenerationStats", "HybridDrafter", "KVCache", "NgramDrafter", "ParallelDrafter",
           "StaticTree", "Tree", "TreeBuilder", "custom_generate", "generate", "load_drafter", "patch", "unpatch"]
