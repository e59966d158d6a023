"""parallelspec: ParallelSpec speculative decoding on top of ps_kernels."""
__version__ = "0.1.0"

from .cache import KVCache
from .drafters import DraftCandidates, Drafter, NgramDrafter
from .engine import GenerationStats
from .generate import CUSTOM_GENERATE_DIR, custom_generate, generate, patch, unpatch
from .trees import ChainTree, DynamicTree, StaticTree, Tree, TreeBuilder

__all__ = ["CUSTOM_GENERATE_DIR", "ChainTree", "DraftCandidates", "Drafter", "DynamicTree", "GenerationStats",
           "KVCache", "NgramDrafter", "StaticTree", "Tree", "TreeBuilder", "custom_generate", "generate", "patch",
           "unpatch"]
