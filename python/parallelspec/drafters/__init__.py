from .base import DraftCandidates, Drafter
from .eagle import EagleDrafter
from .hybrid import HybridDrafter
from .layer import DraftConfig, DraftNetwork, build_network
from .ngram import NgramDrafter
from .parallel import ParallelDrafter

__all__ = ["DraftCandidates", "Drafter", "DraftConfig", "DraftNetwork", "EagleDrafter", "HybridDrafter",
           "NgramDrafter", "ParallelDrafter", "build_network"]
