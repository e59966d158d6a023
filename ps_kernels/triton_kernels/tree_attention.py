"""tree_attention in Triton: flash-decoding over the cache prefix plus the N tree nodes, the
tree mask read as packed bits per (query row, key tile). The kernel is shared with
draft_attention (attention_core.py)."""
from .attention_core import MASK_CAUSAL, MASK_TREE, attention_forward, aot_specs


def tree_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, scale, window, softcap, sinks, out, lse,
                   num_splits=None, split_rows=None, workspace=None) -> None:
    """Fill out [B, Hq, N, D] and lse [B, Hq, N] (fp32, contiguous) and write k_new/v_new to
    cache rows cache_lens[b]..+N. tree_mask: None (causal) or int64 [B, N, W] words with a
    contiguous last dim (a batch stride of 0 is fine). window (0 = none), softcap (0.0 = none),
    sinks (fp32 [Hq] or None): the attention features (attention_core.py). num_splits,
    split_rows, workspace: a plan made once per step (None = planned here)."""
    kind = MASK_CAUSAL if tree_mask is None else MASK_TREE
    attention_forward(q, k_new, v_new, k_cache, v_cache, cache_lens, tree_mask, kind, 0, scale, window, softcap,
                      sinks, out, lse, num_splits, split_rows, workspace)


_CAUSAL = [spec for spec in aot_specs(MASK_CAUSAL) if spec[2].get("MASK") == MASK_CAUSAL]
# the causal mask: two plain variants, and the window (its positions differ from the tree's)
AOT_SPECS = aot_specs(MASK_TREE) + _CAUSAL[:2] + [spec for spec in _CAUSAL if spec[2]["WINDOW"]][:1]
