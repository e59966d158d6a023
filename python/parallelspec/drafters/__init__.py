from .base import DraftCandidates, Drafter
from .ngram import NgramDrafter

__all__ = ["DraftCandidates", "Drafter", "NgramDrafter"]
