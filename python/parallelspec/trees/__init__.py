"""Token trees for verification: the ``Tree``, the ``TreeBuilder`` protocol, and the builders
(``fixed``: chain, static, dynamic; ``auto``: sized by the measured verify cost, ``verify_cost``).
"""
from __future__ import annotations

from typing import Sequence

from .auto import AutoTree
from .base import RootOnly, Tree, TreeBuilder, beam_levels, check_depth
from .fixed import DEFAULT_STATIC_CHOICES, ChainTree, DynamicTree, StaticTree

__all__ = ["AutoTree", "ChainTree", "DEFAULT_STATIC_CHOICES", "DynamicTree", "RootOnly", "StaticTree", "Tree",
           "TreeBuilder", "beam_levels", "check_depth", "make_tree_builder"]


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
