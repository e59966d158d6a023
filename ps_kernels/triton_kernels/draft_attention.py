"""draft_attention in Triton: flash-decoding over the drafter cache plus the new real tokens
and mask slots, the mask pattern computed from indices (attention_core.py)."""
from .attention_core import MASK_DRAFT, attention_forward, aot_specs


def draft_attention(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, num_masks, scale, window, softcap, sinks,
                    out, lse, num_splits=None, split_rows=None, workspace=None) -> None:
    """Fill out [B, Hq, T, D] (padding rows 0) and lse [B, Hq, T] (fp32, contiguous; padding
    rows -inf) and write the new_lens[b] real rows of k_new/v_new to cache rows
    cache_lens[b]... window (0 = none), softcap (0.0 = none), sinks (fp32 [Hq] or None): the
    attention features (attention_core.py). num_splits, split_rows, workspace: a plan made
    once per step (None = planned here)."""
    attention_forward(q, k_new, v_new, k_cache, v_cache, cache_lens, new_lens, MASK_DRAFT, num_masks, scale, window,
                      softcap, sinks, out, lse, num_splits, split_rows, workspace)


AOT_SPECS = aot_specs(MASK_DRAFT)
