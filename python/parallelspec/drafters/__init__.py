from .base import DraftCandidates, Drafter
from .eagle import EagleDrafter
from .layer import DraftConfig, DraftNetwork, build_network
from .parallel import ParallelDrafter

__all__ = ["DraftCandidates", "Drafter", "ParallelDrafter", "EagleDrafter", "DraftConfig", "DraftNetwork",
           "build_network"]
