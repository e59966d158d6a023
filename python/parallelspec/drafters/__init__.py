from .base import DraftCandidates, Drafter
from .hybrid import HybridDrafter
from .ngram import NgramDrafter

__all__ = ["DraftCandidates", "Drafter", "HybridDrafter", "NgramDrafter"]
