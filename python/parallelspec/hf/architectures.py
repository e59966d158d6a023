"""The target architectures parallelspec runs: one table, ``model_type`` -> what differs for us.

transformers runs each model's own code up to its attention call and after it (embedding scaling,
QK-norms, NoPE layers, partial or interleaved rotary, parallel blocks, MoE blocks, residual
multipliers): none of that is declared here. What is declared is what our side must reproduce:

- ``window``: which layers attend through a sliding window, as the model's own mask choice
  decides it (that mask is what sdpa and eager attention apply): ``"layer_types"`` = the layers
  whose ``config.layer_types`` entry is ``"sliding_attention"``, ``"all"`` = every layer when
  ``config.sliding_window`` is set, None = none. The window size is ``config.sliding_window``.
- ``attn_softcap``: the config attribute of attention-logit soft-capping the attention module
  passes as ``softcap`` (Gemma 2); None = the model applies none.
- ``sinks``: the attention module has a learned per-head sink logit ``module.sinks`` (gpt-oss).
- ``final_softcap`` / ``logits_divide`` / ``logits_multiply``: the config attribute of what
  ``*ForCausalLM.forward`` applies to the LM head's output (Gemma 2/3 soft-capping, Granite's
  ``logits_scaling``, Cohere's ``logit_scale``).
- ``refused``: configs of the type that are not run, (attribute, value, reason).

The query scale needs no entry: every module passes its own ``scaling`` (Gemma's
``query_pre_attn_scalar ** -0.5``, Granite's ``attention_multiplier``) and our attention call
uses it. Adding an architecture is one line here plus its case in tests/test_architectures.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str
    window: str | None = None          # None, "layer_types" or "all"
    attn_softcap: str | None = None    # config attribute
    sinks: bool = False
    final_softcap: str | None = None   # config attribute
    logits_divide: str | None = None   # config attribute
    logits_multiply: str | None = None  # config attribute
    refused: tuple = ()                # ((config attribute, refused value, why), ...)
    notes: str = ""                    # what transformers' own code does around our call (docs/MODELS.md)

    def layer_windows(self, config) -> list[int | None]:
        """The sliding window of every layer (None = full attention), as the model's masks have it."""
        n = config.num_hidden_layers
        size = getattr(config, "sliding_window", None) or None
        longest = getattr(config, "max_position_embeddings", None)
        if self.window is None or size is None or (longest is not None and size >= longest):
            return [None] * n       # (a window as long as every sequence the model takes never bites: Phi-4-mini's)
        if self.window == "all":
            return [int(size)] * n
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        return [int(size) if t == "sliding_attention" else None for t in types]

    def features(self, config) -> list[str]:
        """The features this config uses, in words (docs, errors)."""
        out = []
        windows = [w for w in self.layer_windows(config) if w is not None]
        if windows:
            out.append(f"sliding window {windows[0]} on {len(windows)}/{config.num_hidden_layers} layers")
        for label, attr in (("attention soft-cap", self.attn_softcap), ("final logit soft-cap", self.final_softcap),
                            ("logits divided by", self.logits_divide), ("logits multiplied by", self.logits_multiply)):
            value = getattr(config, attr, None) if attr else None
            if value is not None:
                out.append(f"{label} {value}")
        if self.sinks:
            out.append("attention sinks")
        return out


_TABLE = (
    Architecture("llama", notes="RoPE (default or llama3 scaling)"),
    Architecture("mistral", window="all", notes="sliding window on every layer when set"),
    Architecture("mixtral", window="all", notes="MoE blocks (experts as 3-D parameters)"),
    Architecture("qwen2", window="layer_types", notes="QKV bias"),
    Architecture("qwen2_moe", window="layer_types", notes="MoE blocks with a shared expert, QKV bias"),
    Architecture("qwen3", window="layer_types", notes="QK-norm"),
    Architecture("qwen3_moe", window="all", notes="QK-norm, MoE blocks"),
    Architecture("gemma", notes="scaled embedding, (1 + w) RMSNorm, query_pre_attn_scalar"),
    Architecture("gemma2", window="layer_types", attn_softcap="attn_logit_softcapping",
                 final_softcap="final_logit_softcapping",
                 notes="local/global layers, query_pre_attn_scalar, pre/post norms"),
    Architecture("gemma3_text", window="layer_types", final_softcap="final_logit_softcapping",
                 refused=(("use_bidirectional_attention", True, "bidirectional attention (an encoder)"),),
                 notes="local/global layers with their own RoPE bases, QK-norm, query_pre_attn_scalar"),
    Architecture("granite", logits_divide="logits_scaling",
                 notes="attention_multiplier as the query scale, embedding and residual multipliers"),
    Architecture("granitemoe", logits_divide="logits_scaling",
                 notes="as granite, with MoE blocks"),
    Architecture("olmo", notes="non-parametric LayerNorm, optional QKV clipping"),
    Architecture("olmo2", notes="QK-norm, post-norms"),
    Architecture("olmo3", window="layer_types", notes="QK-norm, post-norms, local/global layers"),
    Architecture("smollm3", window="layer_types", notes="NoPE layers (no RoPE every 4th layer)"),
    Architecture("phi", notes="partial rotary, parallel attention and MLP, LayerNorm, LM head bias"),
    Architecture("phi3", window="all", notes="fused qkv and gate_up projections, partial rotary (Phi-4-mini)"),
    Architecture("starcoder2", window="all", notes="LayerNorm, biases"),
    Architecture("gpt_oss", window="layer_types", sinks=True,
                 notes="attention sinks, MoE blocks with biases and clamped SwiGLU, YaRN RoPE"),
    Architecture("cohere", logits_multiply="logit_scale",
                 notes="parallel attention and MLP, LayerNorm, interleaved RoPE"),
    Architecture("cohere2", window="layer_types", logits_multiply="logit_scale",
                 notes="local layers with RoPE, global layers without, parallel blocks, LayerNorm"),
)

#: model_type -> Architecture: every model type parallelspec runs
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in _TABLE}


def _config_of(model_or_config):
    config = getattr(model_or_config, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return config
    return model_or_config


def check_target(model_or_config) -> Architecture:
    """The Architecture of a transformers causal LM (or of its config), or a ValueError saying
    that parallelspec does not run it and what it runs. Call it before any work on a target."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        what = type(model_or_config).__name__
        raise ValueError(f"model: expected a causal LM of a model type parallelspec runs ({', '.join(ARCHITECTURES)}), "
                         f"got {what} (model_type={model_type!r}); other architectures are not supported")
    for attr, value, why in arch.refused:
        if getattr(config, attr, None) == value:
            raise ValueError(f"model: {model_type} with {attr}={value!r} ({why}) is not supported by parallelspec, "
                             "only causal decoding")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: expected a decoder-only causal LM, got an encoder-decoder {model_type}")
    return arch
