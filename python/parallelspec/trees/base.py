"""The tree and the builder protocol every tree builder follows (docs/DESIGN.md, "Tree convention").

A tree node below the root is a path of candidate indices (i_1, .., i_d): its token is
``tokens[b, d-1, i_d]``, its draft score ``sum_j logprobs[b, j-1, i_j]``. Node 0 is the root, the
last committed token; nodes are in topological order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..drafters.base import DraftCandidates


@dataclass
class Tree:
    """One verification tree per sequence (shared shape N, root included).

    tokens:  [B, N] int64
    parents: [N] or [B, N] int64, parents[..., 0] = -1
    depths:  [N] or [B, N] int64 (root 0); node i sits at position cache_lens[b] + depths[.., i]
    mask:    [N, W] / [B, N, W] packed ancestor-or-self bits, or None (a chain: causal)
    """
    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor | None

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


class TreeBuilder:
    def reset(self) -> None:
        """A new generate call starts (its prompts may draft nothing like the last ones'):
        builders that learn from observe() start their record over."""

    def build(self, root: torch.Tensor, candidates: DraftCandidates | None) -> Tree:
        raise NotImplementedError

    def observe(self, accept_lens: torch.Tensor, accept_index: torch.Tensor | None = None) -> None:
        """What the last tree earned (tokens accepted per sequence, root included, and the
        accepted nodes' indices in path order); builders that adapt their size to it override this."""

    def max_size(self, depth: int | None) -> int | None:
        """The most nodes (root included) a tree of this builder may have with a drafter drafting
        `depth` tokens ahead (None: unknown), or None when it cannot tell: the loop sizes the KV
        cache once with it."""
        return None

    def host_request(self, candidates: DraftCandidates | None) -> list[torch.Tensor]:
        """Device tensors this builder needs on the host for the coming build(); the decoding loop
        copies them in its one host sync a step and hands them to receive() (AutoTree)."""
        return []

    def receive(self, host: list) -> None:
        """The host copies (nested lists) of what host_request asked for, in its order."""


class RootOnly(TreeBuilder):
    """No drafter: the tree is the root alone, so a step is one plain decoding step."""

    def __init__(self):
        self._buffers: dict = {}

    def build(self, root, candidates=None):
        key = root.device
        if key not in self._buffers:
            self._buffers[key] = (torch.full((1,), -1, dtype=torch.int64, device=root.device),
                                  torch.zeros(1, dtype=torch.int64, device=root.device))
        parents, depths = self._buffers[key]
        return Tree(root[:, None], parents, depths, None)

    def max_size(self, depth):
        return 1


def check_depth(depth: int | None) -> int | None:
    """A tree builder's depth limit (generate's tree_depth): None (the drafter's) or an int >= 1."""
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"tree_depth: expected at least 1, got {depth!r}")
    return depth


# floor for draft log-probabilities (empty slots are -inf): keeps scores finite, so the
# tie-break below still orders paths made of empty slots
_LOGPROB_FLOOR = -1e4
# per-depth penalty: a child scores strictly below its parent even when its own log-probability
# is 0, which makes every top-N set by score prefix-closed
_DEPTH_EPS = 1e-6


def beam_levels(logprobs: torch.Tensor, k: int, width: int, depth_eps: float = 0.0):
    """Level-by-level beam over per-depth candidates [B, k, m]: for each depth d < k, the best
    `width` partial paths as (scores [B, w] float64 sorted, parent [B, w] position in the
    previous level's beam, choice [B, w] candidate index at depth d). A path's score is its
    summed log-probability (floored at _LOGPROB_FLOOR), minus depth_eps per level."""
    B, _, m = logprobs.shape
    lp = logprobs[:, :k].to(torch.float64).clamp(min=_LOGPROB_FLOOR)
    scores = torch.zeros(B, 1, dtype=torch.float64, device=logprobs.device)  # the root's beam
    levels = []
    for d in range(k):
        expanded = (scores[:, :, None] + lp[:, d, None, :] - depth_eps).reshape(B, -1)  # [B, w*m]
        scores, flat = expanded.topk(min(width, expanded.shape[1]), dim=1)  # sorted by score
        levels.append((scores, flat // m, flat % m))
    return levels
