"""HybridDrafter: several drafters feeding ONE verification tree.

Each source is stepped with the same committed tokens (and features, for those that need
them). Sources whose candidates are whole chains (prompt lookup: ``DraftCandidates.paths``)
contribute those chains; the others contribute per-depth candidates, concatenated along the
candidate axis. ``AutoTree`` (tree="auto") merges both into one prefix-closed trie scored by
draft probability and sized by the verify cost; verification and acceptance do not care where
a branch came from, so the output stays exactly the target's. Other tree builders see only the
per-depth candidates.
"""
from __future__ import annotations

import math

import torch

from .base import DraftCandidates, Drafter


class HybridDrafter(Drafter):
    def __init__(self, drafters):
        drafters = list(drafters)
        if not drafters or not all(isinstance(d, Drafter) for d in drafters):
            raise TypeError(f"drafters: expected a non-empty list of parallelspec Drafters, got "
                            f"{[type(d).__name__ for d in drafters]}")
        self.drafters = drafters
        self.needs_features = any(d.needs_features for d in drafters)

    def reset(self, batch_size, max_len, device, dtype):
        for d in self.drafters:
            d.reset(batch_size, max_len, device, dtype)

    def check_target(self, model) -> None:
        for d in self.drafters:
            d.check_target(model)

    def step(self, tokens, features, lens) -> DraftCandidates:
        results = [d.step(tokens, features if d.needs_features else None, lens) for d in self.drafters]
        per_depth = [c for c in results if c.paths is None]
        chains = [c for c in results if c.paths is not None]
        B = tokens.shape[0]
        views = per_depth or chains  # chains only: their own per-depth view, flagged as such
        k = max(c.tokens.shape[1] for c in views)
        tok = torch.cat([_pad_depth(c.tokens, k, 0) for c in views], dim=2)
        lp = torch.cat([_pad_depth(c.logprobs, k, -math.inf) for c in views], dim=2)
        paths = [[p for c in chains for p in c.paths[b]] for b in range(B)] if chains else None
        return DraftCandidates(tok, lp, paths, per_depth_in_paths=not per_depth)


def _pad_depth(x: torch.Tensor, k: int, value) -> torch.Tensor:
    if x.shape[1] == k:
        return x
    pad = torch.full((x.shape[0], k - x.shape[1], x.shape[2]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)
