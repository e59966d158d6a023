"""Tree builders of a fixed rule over per-depth draft candidates (DraftCandidates [B, k, m]).

- ``ChainTree``: top-1 at every depth.
- ``StaticTree``: a fixed, prefix-closed list of paths (Medusa-style "choices").
- ``DynamicTree``: per step, the best ``nodes - 1`` paths by draft score over the whole batch at
  once (EAGLE-2-style global top-N), on the device with no host sync.

Static shapes (chain, static) build their buffers once per (k, m, device) and only gather the
tokens each step. Every builder returns a ``Tree`` whose N includes the root.
"""
from __future__ import annotations

from typing import Sequence

import torch
from ps_kernels import tree_mask_from_parents

from ..drafters.base import DraftCandidates, to_device
from .base import _DEPTH_EPS, Tree, TreeBuilder, beam_levels, check_depth

#: a default static tree (10 nodes with the root): wide near the root, where acceptance is likeliest
DEFAULT_STATIC_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0))


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
