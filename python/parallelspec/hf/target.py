"""Running a Hugging Face causal LM over our KV cache, without forking its modeling code.

transformers dispatches every attention call through ``ALL_ATTENTION_FUNCTIONS[
config._attn_implementation]``. We register one more entry, ``"parallelspec"``, whose function
calls ``ps_kernels.tree_attention`` on the layer's slice of our cache, and switch the model's
config to it while we run (``TargetModel.attention()``; the previous value is restored after).

No mask is built for it: ``create_causal_mask`` returns the given 2-D mask (we pass None) as it
is for any implementation missing from ``AttentionMaskInterface`` ("custom attention without
equivalent mask creation"), so no dense [B, 1, N, S] mask is ever made. The tree mask, cache and
lengths reach our function in one ``ForwardContext`` passed as a keyword argument of the base
model's forward; transformers forwards such keywords to every attention call.

The base model (``model.model``) runs with ``use_cache=False``, so transformers keeps no cache of
its own; its output is the last hidden state after the final norm (the drafter's features), and
the LM head is applied only to the rows whose logits are needed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import ps_kernels
import torch

from ..cache import KVCache
from .linear import skinny_linears

ATTENTION_NAME = "parallelspec"
CONTEXT_KWARG = "parallelspec_context"
#: model_type values whose decoder layers we have checked: RoPE applied before the attention
#: call, no attention sinks/softcapping/ALiBi, K and V heads of one size, layer_idx on every layer
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ForwardContext:
    """What our attention function needs besides q/k/v, for one forward pass."""
    cache: KVCache
    tree_mask: torch.Tensor | None  # [N, W] / [B, N, W] packed bits; None = causal


def parallelspec_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry. query [B, Hq, N, D], key/value [B, Hkv, N, D] (RoPE applied);
    returns attn_output [B, N, Hq, D] like transformers' sdpa_attention_forward, and no weights."""
    context: ForwardContext | None = kwargs.get(CONTEXT_KWARG)
    if context is None:
        raise RuntimeError(f"the '{ATTENTION_NAME}' attention implementation only runs inside parallelspec's "
                           "forward passes (it needs the KV cache); set the model's attn_implementation back "
                           "to 'sdpa' or 'eager' to call it directly")
    k_cache, v_cache = context.cache.layer(module.layer_idx)
    out = ps_kernels.tree_attention(query, key, value, k_cache, v_cache, context.cache.lens, context.tree_mask,
                                    scale=scaling, validate=False)
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, parallelspec_attention)


_register()


class TargetModel:
    """The target: an HF causal LM of a supported architecture, run over a KVCache."""

    def __init__(self, model: torch.nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model: expected a causal LM of type {'/'.join(SUPPORTED_MODEL_TYPES)}, got "
                             f"{type(model).__name__} (model_type={model_type!r}); other architectures are not "
                             "supported by parallelspec")
        if not hasattr(model, "model") or model.get_output_embeddings() is None:
            raise ValueError(f"model: expected a *ForCausalLM with a base model at .model and an LM head, "
                             f"got {type(model).__name__}")
        self.model = model
        self.config = config
        self.base = model.model
        self.lm_head = model.get_output_embeddings()
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.max_positions = getattr(config, "max_position_embeddings", None)
        layer_types = getattr(config, "layer_types", None) or ()
        uses_window = "sliding_attention" in layer_types or model_type == "mistral"
        self.sliding_window = getattr(config, "sliding_window", None) if uses_window else None

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def check_length(self, prompt_len: int, total: int) -> None:
        """Refuse sequences the model cannot attend as it would on its own."""
        if self.max_positions is not None and prompt_len > self.max_positions:
            raise ValueError(f"input_ids: the prompt has {prompt_len} tokens, more than the model's "
                             f"max_position_embeddings = {self.max_positions}")
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"max_new_tokens: prompt + new tokens = {total} exceed the model's "
                             f"max_position_embeddings = {self.max_positions}")
        if self.sliding_window is not None and total > self.sliding_window:
            raise ValueError(f"max_new_tokens: prompt + new tokens = {total} exceed the model's sliding_window = "
                             f"{self.sliding_window}; sliding-window attention is not supported, only sequences "
                             "that fit in the window")

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(self.num_layers, batch_size, self.num_kv_heads, self.head_dim, capacity,
                       device=self.device, dtype=self.dtype)

    @contextlib.contextmanager
    def attention(self):
        """Switch the model to our attention function, and its linear layers to the few-row
        kernel (parallelspec.linear), for the duration of the block."""
        previous = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION_NAME
        try:
            with skinny_linears(self.model):
                yield
        finally:
            self.config._attn_implementation = previous

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Run N tokens per sequence at the given positions; node i attends the committed rows and
        the nodes tree_mask allows (None = causal); their K/V land in rows lens..lens+N-1.
        Returns the last hidden states [B, N, d] (after the final norm). Call inside attention()."""
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                        **{CONTEXT_KWARG: ForwardContext(cache, tree_mask)})
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head in the model's dtype, then fp32 (as transformers' generate does)."""
        return self.lm_head(hidden).float()
