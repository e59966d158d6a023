"""HybridDrafter: several drafters feeding ONE verification tree.

Each source is stepped with the same committed tokens (and features, for those that need
them). Sources whose candidates are whole chains (prompt lookup: ``DraftCandidates.paths``)
contribute those chains; the others contribute per-depth candidates, concatenated along the
candidate axis. ``AutoTree`` (tree="auto") merges both into one prefix-closed trie scored by
draft probability and sized by the verify cost; verification and acceptance do not care where
a branch came from, so the output stays exactly the target's. Other tree builders see only the
per-depth candidates.

``defer_after``: while every sequence's last step committed at least that many tokens (the
chain sources are being accepted whole: a copying stretch), the sources that need the
target's features (the network drafters, the costly ones) sit the next step out.
``defer_on_match``: the same when every sequence's prompt lookup (a source exposing
``last_match_n``) matched at least that many trailing tokens this step. Either way the
skipped sources' new (token, feature) pairs are kept and fed with the next step's in one
call, so their caches see the same stream as if they had never paused (a step over a few
more rows costs about the same on a CPU).
"""
from __future__ import annotations

import math

import torch

from .base import DraftCandidates, Drafter

_MAX_DEFERRED_ROWS = 32


class HybridDrafter(Drafter):
    def __init__(self, drafters, defer_after: int | None = None, defer_on_match: int | None = None):
        drafters = list(drafters)
        if not drafters or not all(isinstance(d, Drafter) for d in drafters):
            raise TypeError(f"drafters: expected a non-empty list of parallelspec Drafters, got "
                            f"{[type(d).__name__ for d in drafters]}")
        for name, value, lo, what in (("defer_after", defer_after, 2, "an int >= 2 (tokens committed by one step)"),
                                      ("defer_on_match", defer_on_match, 1, "an n-gram length >= 1")):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected None or {what}, got {value!r}")
            if all(d.needs_features for d in drafters):
                raise ValueError(f"{name}: needs a source that never sits out (one without features, "
                                 f"e.g. NgramDrafter), got only {[type(d).__name__ for d in drafters]}")
        self.drafters = drafters
        self.needs_features = any(d.needs_features for d in drafters)
        self.defer_after = defer_after
        self.defer_on_match = defer_on_match
        self._pending = None      # (tokens, features, lens) the deferred drafters have not seen yet
        self._steps = 0
        self.deferred_steps = 0

    def reset(self, batch_size, max_len, device, dtype):
        for d in self.drafters:
            d.reset(batch_size, max_len, device, dtype)
        self._pending = None
        self._steps = 0
        self.deferred_steps = 0

    def check_target(self, model) -> None:
        for d in self.drafters:
            d.check_target(model)

    def step(self, tokens, features, lens) -> DraftCandidates:
        stream = (tokens, features, lens) if self._pending is None else _join(self._pending, (tokens, features, lens))
        results = [d.step(tokens, None, lens) for d in self.drafters if not d.needs_features]
        live = lens > 0
        # never on a sequence's first step (its prompt); the whole batch must be copying; the
        # deferred rows stay within what one drafter step handles cheaply
        copying = False
        if self.defer_after is not None:
            copying = bool(((lens >= self.defer_after) | ~live).all())
        if self.defer_on_match is not None and not copying:
            matched = [getattr(d, "last_match_n", None) for d in self.drafters if not d.needs_features]
            matched = [m for m in matched if m is not None]
            rows = live.tolist()
            copying = bool(matched) and all(max(m[b] for m in matched) >= self.defer_on_match
                                            for b in range(len(rows)) if rows[b])
        defer = (copying and self._steps > 0 and self.needs_features
                 and stream[0].shape[1] <= _MAX_DEFERRED_ROWS)
        self._steps += 1
        if not defer:
            results += [d.step(*stream) for d in self.drafters if d.needs_features]
        self._pending = stream if defer else None
        self.deferred_steps += defer
        per_depth = [c for c in results if c.paths is None]
        chains = [c for c in results if c.paths is not None]
        B = tokens.shape[0]
        views = per_depth or chains  # chains only: their own per-depth view, flagged as such
        k = max(c.tokens.shape[1] for c in views)
        tok = torch.cat([_pad_depth(c.tokens, k, 0) for c in views], dim=2)
        lp = torch.cat([_pad_depth(c.logprobs, k, -math.inf) for c in views], dim=2)
        paths = [[p for c in chains for p in c.paths[b]] for b in range(B)] if chains else None
        # one per-depth source keeps its conditioning (its candidates come first, slot 0 is its
        # top-1); with several, slot 0 is only the first one's: treated as independent
        conditioned = per_depth[0].conditioned_depths if len(per_depth) == 1 else 0
        return DraftCandidates(tok, lp, paths, per_depth_in_paths=not per_depth, conditioned_depths=conditioned)


def _join(first, second):
    """Two ragged (tokens [B, R], features [B, R, d], lens [B]) batches -> one, each row's first
    entries followed by its second ones."""
    (t1, f1, l1), (t2, f2, l2) = first, second
    R1 = t1.shape[1]
    R = int((l1 + l2).max()) if l1.numel() else 0
    j = torch.arange(max(R, 1), device=t1.device)[None, :]
    idx = torch.where(j < l1[:, None], j, R1 + j - l1[:, None]).clamp(max=R1 + t2.shape[1] - 1)
    tokens = torch.cat([t1, t2], dim=1).gather(1, idx)
    feats = torch.cat([f1, f2], dim=1)
    feats = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))
    return tokens, feats, l1 + l2


def _pad_depth(x: torch.Tensor, k: int, value) -> torch.Tensor:
    if x.shape[1] == k:
        return x
    pad = torch.full((x.shape[0], k - x.shape[1], x.shape[2]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)
