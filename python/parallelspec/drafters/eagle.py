"""EagleDrafter: the same network drafting autoregressively, k sequential passes (the
EAGLE-style baseline ParallelSpec has to beat).

Pass 1 runs over the new real (token, feature) pairs and appends their K/V to the cache; its
output at the last real token gives depth 1. Pass j > 1 feeds one pair: the previous depth's
top-1 token and the drafter's own output feature (its estimate of the target's feature), at
the next position; those K/V rows are scratch past cache_lens, overwritten by the next step.
Candidates are the top-m at each depth along the top-1 chain.

Training (``eagle_train_forward`` in parallelspec.tools.training.forwards) unrolls the same k passes over a whole sequence in
parallel over anchors, EAGLE-3 "training-time test" style: pass j adds one slot per anchor
whose input is (the token j places after the anchor, the drafter's own output feature from
pass j - 1), attending the real prefix up to its anchor and its earlier slots. The tokens fed
are the data's (self-distilled data holds the target's greedy choices, the only tokens whose
continuation matters for acceptance); step() feeds its own top-1, which is the same whenever
the chain is still being accepted.
"""
from __future__ import annotations

import torch

from .base import DraftCandidates
from .network import NetworkDrafter, top_candidates


class EagleDrafter(NetworkDrafter):
    kind = "eagle"

    @property
    def extra_rows(self) -> int:
        return self.depth - 1

    def _step(self, tokens: torch.Tensor, features: torch.Tensor, lens: torch.Tensor) -> DraftCandidates:
        net = self.net
        R = tokens.shape[1]
        dev = tokens.device
        positions = self.cache_lens[:, None] + torch.arange(R, device=dev)
        h = net.run(net.fuse(tokens, features), positions, self._cached_attention(self.cache_lens, lens, 0),
                    out_rows=(lens - 1).clamp(min=0)[:, None])   # the last real row's output only
        self.cache_lens += lens
        g = net.features_out(h)
        one = torch.ones_like(lens)
        ids, logps = [], []
        for j in range(self.depth):
            tok, logp = top_candidates(self._logits(g), net.draft_to_target, self.top_m)
            ids.append(tok)
            logps.append(logp)
            if j + 1 == self.depth:
                break
            # scratch row cache_lens + j: not committed, the next step overwrites it
            scratch = self.cache_lens + j
            h = net.run(net.fuse(tok[:, :, 0], g), scratch[:, None], self._cached_attention(scratch, one, 0))
            g = net.features_out(h)
        return DraftCandidates(torch.cat(ids, dim=1), torch.cat(logps, dim=1), conditioned_depths=self.depth - 1)
