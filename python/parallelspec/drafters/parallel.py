"""ParallelDrafter: k tokens from ONE forward pass (ParallelSpec).

The step's input is [the new real (token, feature) pairs, k - 1 learned mask slots] (the
slots' inputs: ``DraftNetwork.mask_inputs``, per layout). Real
token i sits at its cache row's position; mask slot j (1-based) at last_real_position + j.
Real tokens attend causally over the drafter's cache and each other and their K/V are
appended to the cache; mask slots attend every real token and the slots before them, and
their K/V are scratch (``ps_kernels.draft_attention`` implements this pattern). The output at
the last real token is the distribution of depth 1, the output of slot j that of depth j + 1.

Training (``parallel_train_forward`` in parallelspec.tools.training.forwards) runs the same network over a whole sequence where every anchor
gets its own group of k - 1 mask slots (``group_layout``): slot j of the group at anchor
a sees the real prefix 0..a and slots 1..j of its group, exactly what step() sees when a is
the last real token; so the two agree to rounding (tests/test_drafters.py checks it).

With ``DraftConfig.slot1 == "draft"`` a step takes two passes: the real tokens first (depth 1),
then the k - 1 slots, slot 1 fed the depth-1 top-1 token and the drafter's own output feature
(EAGLE's second step) on top of its vector, so depths 2..k see the drafted token; training
feeds the data's next token there (EAGLE-style, ``parallel_train_forward``).
"""
from __future__ import annotations

import torch

from .base import DraftCandidates
from .network import NetworkDrafter, top_candidates


class ParallelDrafter(NetworkDrafter):
    kind = "parallel"

    def _step(self, tokens: torch.Tensor, features: torch.Tensor, lens: torch.Tensor) -> DraftCandidates:
        net, M = self.net, self.depth - 1
        B, R = tokens.shape
        dev = tokens.device
        x = net.fuse(tokens, features)
        draft_fed = net.cfg.slot1 == "draft"
        if M and not draft_fed:
            x = torch.cat([x, net.mask_inputs(x.dtype).expand(B, M, -1)], dim=1)
        real_pos = self.cache_lens[:, None] + torch.arange(R, device=dev)
        last = self.cache_lens + lens - 1
        mask_pos = last[:, None] + torch.arange(1, M + 1, device=dev)
        # outputs wanted: depth 1 from the last real row, depths 2..k from the mask slots
        last_row = (lens - 1).clamp(min=0)[:, None]
        if draft_fed:   # pass 1: the real tokens alone
            h_last = net.run(x, real_pos, self._cached_attention(self.cache_lens, lens, 0), out_rows=last_row)
        else:           # one pass: real tokens and mask slots
            rows = torch.cat([last_row, torch.arange(R, R + M, device=dev).expand(B, -1)], dim=1)
            h = net.run(x, torch.cat([real_pos, mask_pos], dim=1), self._cached_attention(self.cache_lens, lens, M),
                        out_rows=rows)
        self.cache_lens += lens
        if not draft_fed:
            logits = self._logits(net.features_out(h))
            ids, logp = top_candidates(logits, net.draft_to_target, self.top_m)
            return DraftCandidates(ids, logp)
        g1 = net.features_out(h_last)
        ids1, logp1 = top_candidates(self._logits(g1), net.draft_to_target, self.top_m)
        # pass 2: the slots over the committed cache (no real rows), slot 1 fed the depth-1 top-1
        slots = torch.cat([net.fuse(ids1[:, :, 0], g1), x.new_zeros(B, M - 1, x.shape[-1])], dim=1)
        slots = slots + net.mask_embed.to(x.dtype)
        h2 = net.run(slots, mask_pos, self._cached_attention(self.cache_lens, torch.zeros_like(lens), M))
        ids2, logp2 = top_candidates(self._logits(net.features_out(h2)), net.draft_to_target, self.top_m)
        return DraftCandidates(torch.cat([ids1, ids2], dim=1), torch.cat([logp1, logp2], dim=1), conditioned_depths=1)
