from .base import DraftCandidates, Drafter
from .eagle import EagleDrafter
from .hybrid import HybridDrafter
from .checkpoint import DraftConfig
from .network import DraftNetwork, build_network
from .ngram import NgramDrafter
from .parallel import ParallelDrafter

__all__ = ["DraftCandidates", "Drafter", "DraftConfig", "DraftNetwork", "EagleDrafter", "HybridDrafter",
           "NgramDrafter", "ParallelDrafter", "build_network"]
