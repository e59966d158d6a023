"""Token trees built from per-depth draft candidates (DraftCandidates [B, k, m]).

A tree node below the root is a path of candidate indices (i_1, .., i_d): its token is
``tokens[b, d-1, i_d]``, its draft score ``sum_j logprobs[b, j-1, i_j]`` (the per-depth
distributions of a parallel drafter do not depend on the tokens chosen before). Node 0 is the
root, the last committed token; nodes are in topological order (docs/DESIGN.md).

- ``ChainTree``: top-1 at every depth.
- ``StaticTree``: a fixed, prefix-closed list of paths (Medusa-style "choices").
- ``DynamicTree``: per step, the best ``nodes - 1`` paths by draft score over the whole batch at
  once (EAGLE-2-style global top-N), on the device with no host sync.

Static shapes (chain, static) build their buffers once per (k, m, device) and only gather the
tokens each step. Every builder returns a ``Tree`` whose N includes the root.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from ps_kernels import tree_mask_from_parents

from .drafters.base import DraftCandidates, to_device


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


class StaticTree(TreeBuilder):
    """A fixed tree given as paths of candidate indices, e.g. [[0], [1], [0, 0], [0, 1], [0, 0, 0]].

    Paths deeper than the drafter's k or with an index >= its m are dropped (which keeps the set
    prefix-closed); the rest must be prefix-closed. Buffers are built once per (k, m, device)."""

    def __init__(self, choices: Sequence[Sequence[int]]):
        paths = sorted({tuple(int(i) for i in p) for p in choices}, key=lambda p: (len(p), p))
        if not paths:
            raise ValueError("tree_choices: expected at least one path, got none")
        for p in paths:
            if len(p) == 0 or min(p) < 0:
                raise ValueError(f"tree_choices: expected non-empty paths of non-negative candidate indices, got {list(p)}")
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"tree_choices: the paths must be prefix-closed, but {list(p)} is there and its "
                                 f"prefix {list(p[:-1])} is not")
        self.paths = paths
        self._buffers: dict = {}

    def _buffers_for(self, k: int, m: int, device: torch.device):
        key = (k, m, device)
        if key not in self._buffers:
            paths = [p for p in self.paths if len(p) <= k and max(p) < m]
            if not paths:
                raise ValueError(f"tree_choices: no path fits the drafter's candidates (depth {k}, {m} per depth)")
            node_of = {(): 0}
            parents, depths, gather = [-1], [0], []
            for p in paths:  # sorted by length: a parent is numbered before its children
                node_of[p] = len(parents)
                parents.append(node_of[p[:-1]])
                depths.append(len(p))
                gather.append((len(p) - 1) * m + p[-1])  # into tokens.view(B, k * m)
            parents_t = to_device(parents, torch.int64, device)
            is_chain = all(par == i - 1 for i, par in enumerate(parents))
            mask = None if is_chain else tree_mask_from_parents(parents_t, validate=False)
            self._buffers[key] = (parents_t, to_device(depths, torch.int64, device),
                                  to_device(gather, torch.int64, device), mask)
        return self._buffers[key]

    def max_size(self, depth):
        return 1 + sum(1 for p in self.paths if depth is None or len(p) <= depth)

    def build(self, root, candidates):
        B, k, m = candidates.tokens.shape
        parents, depths, gather, mask = self._buffers_for(k, m, root.device)
        tokens = torch.cat([root[:, None], candidates.tokens.reshape(B, k * m)[:, gather]], dim=1)
        return Tree(tokens, parents, depths, mask)


def check_depth(depth: int | None) -> int | None:
    """A tree builder's depth limit (generate's tree_depth): None (the drafter's) or an int >= 1."""
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"tree_depth: expected at least 1, got {depth!r}")
    return depth


class ChainTree(TreeBuilder):
    """Top-1 candidate at each of the first `depth` depths (all of the drafter's by default)."""

    def __init__(self, depth: int | None = None):
        self.depth = check_depth(depth)
        self._static: dict[int, StaticTree] = {}

    def build(self, root, candidates):
        k = candidates.depth if self.depth is None else min(self.depth, candidates.depth)
        if k not in self._static:
            self._static[k] = StaticTree([[0] * d for d in range(1, k + 1)])
        return self._static[k].build(root, candidates)

    def max_size(self, depth):
        k = depth if self.depth is None else (self.depth if depth is None else min(self.depth, depth))
        return None if k is None else k + 1


#: a default static tree (10 nodes with the root): wide near the root, where acceptance is likeliest
DEFAULT_STATIC_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0))

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


class DynamicTree(TreeBuilder):
    """EAGLE-2-style: the `nodes - 1` best paths by summed draft log-probability (plus the root),
    up to `depth` deep (the drafter's k by default).

    Level by level, a beam keeps the best `nodes - 1` partial paths of each depth (a path in the
    global top set has every prefix in it and in the beams, so the beams lose nothing); the global
    top set is then chosen among all levels' beams. Vectorised over the batch; every sequence
    gets its own tree of the same size N."""

    def __init__(self, nodes: int = 16, depth: int | None = None):
        if nodes < 2:
            raise ValueError(f"tree_nodes: expected at least 2 (root + 1), got {nodes}")
        self.nodes = nodes
        self.depth = check_depth(depth)
        self._offsets: dict = {}

    def max_size(self, depth):
        return self.nodes

    def build(self, root, candidates):
        tokens, logprobs = candidates.tokens, candidates.logprobs
        B, k, m = tokens.shape
        k = k if self.depth is None else min(self.depth, k)
        width = self.nodes - 1
        dev = root.device
        level_scores, level_parent, level_choice = map(list, zip(*beam_levels(logprobs, k, width, _DEPTH_EPS)))
        sizes = [s.shape[1] for s in level_scores]
        offsets = [sum(sizes[:d]) for d in range(k)]
        all_scores = torch.cat(level_scores, dim=1)  # [B, T], levels in depth order
        n = min(width, all_scores.shape[1])
        chosen = all_scores.topk(n, dim=1).indices.sort(dim=1).values  # depth-major: topological
        key = (tuple(sizes), dev)
        if key not in self._offsets:   # per beam layout, once: no host-to-device copy a step
            self._offsets[key] = (
                torch.cat([torch.full((s,), d, dtype=torch.int64, device=dev) for d, s in enumerate(sizes)]),
                to_device(offsets, torch.int64, dev))
        level_of, offset_of = self._offsets[key]
        choice = torch.cat(level_choice, dim=1).gather(1, chosen)
        parent_pos = torch.cat(level_parent, dim=1).gather(1, chosen)
        depth0 = level_of[chosen]  # 0-based depth of each chosen node
        # node number of every beam entry that was chosen (0 = not chosen / the root)
        node_of = torch.zeros(B, all_scores.shape[1], dtype=torch.int64, device=dev)
        node_of.scatter_(1, chosen, torch.arange(1, n + 1, dtype=torch.int64, device=dev).expand(B, n))
        parent_entry = (offset_of[(depth0 - 1).clamp(min=0)] + parent_pos).clamp(max=all_scores.shape[1] - 1)
        parents = torch.where(depth0 == 0, 0, node_of.gather(1, parent_entry))
        node_tokens = tokens.reshape(B, -1).gather(1, depth0 * m + choice)
        minus_one = torch.full((B, 1), -1, dtype=torch.int64, device=dev)
        parents = torch.cat([minus_one, parents], dim=1)
        depths = torch.cat([torch.zeros_like(minus_one), depth0 + 1], dim=1)
        return Tree(torch.cat([root[:, None], node_tokens], dim=1), parents, depths,
                    tree_mask_from_parents(parents, validate=False))


def make_tree_builder(tree: str | TreeBuilder, *, depth: int | None = None, nodes: int | None = None,
                      choices: Sequence[Sequence[int]] | None = None, model=None) -> TreeBuilder:
    """tree: "auto" | "chain" | "static" | "dynamic" or a TreeBuilder; the options apply to the
    named kinds. "auto" (``AutoTree``, up to ``nodes`` nodes, 32 by default) needs the target
    ``model``: its verify-cost curve is measured once per machine and cached."""
    if isinstance(tree, TreeBuilder):
        return tree
    if tree == "auto":
        if model is None:
            raise ValueError("tree: 'auto' sizes the tree by the target's verify cost and needs model=, got None")
        from .autotree import AutoTree
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise ValueError(f"tree_nodes: expected at least 1 (the root) for tree='auto', got {nodes!r}")
        return AutoTree.for_model(model, max_nodes=32 if nodes is None else nodes, depth=depth)
    if tree == "chain":
        return ChainTree(depth)
    if tree == "static":
        return StaticTree(DEFAULT_STATIC_CHOICES if choices is None else choices)
    if tree == "dynamic":
        return DynamicTree(16 if nodes is None else nodes, depth)
    raise ValueError(f"tree: expected 'auto', 'chain', 'static', 'dynamic' or a TreeBuilder, got {tree!r}")
