"""Plain PyTorch references: the specification of every op. Every faster backend is tested
against these. They favour clarity over speed and run on any device."""
from .draft_attention import draft_attention
from .kv_rollback import kv_rollback
from .skinny_linear import skinny_linear
from .tree_accept import tree_accept
from .tree_attention import pack_tree_mask, tree_attention, tree_mask_from_parents, unpack_tree_mask

__all__ = ["draft_attention", "kv_rollback", "skinny_linear", "tree_accept", "tree_attention", "pack_tree_mask",
           "tree_mask_from_parents", "unpack_tree_mask"]
