from .base import DraftCandidates, Drafter

__all__ = ["DraftCandidates", "Drafter"]
