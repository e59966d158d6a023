"""tree_attention in Triton: flash-decoding over the cache prefix plus the N tree nodes, the
tree mask read as packed bits per (query row, key tile). The kernel is shared with
draft_attention (attention_core.py)."""
from .attention_core import MASK_CAUSAL, MASK_TREE, attention_forward, aot_specs


def tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, out, lse,
                   num_splits=None) -> None:
    """Fill out [B, Hq, N, D] and lse [B, Hq, N] (fp32, contiguous) and write k_new/v_new to
    cache rows cache_lens[b]..+N. tree_mask: None (causal) or int64 [B, N, W] words with a
    contiguous last dim (a batch stride of 0 is fine). num_splits: None = heuristic."""
    kind = MASK_CAUSAL if tree_mask is None else MASK_TREE
    attention_forward(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, kind, 0, scale, out, lse,
                      num_splits)


AOT_SPECS = aot_specs(MASK_TREE) + aot_specs(MASK_CAUSAL)[:2]
