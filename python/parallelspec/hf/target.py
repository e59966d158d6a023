"""Running a Hugging Face causal LM over our KV cache, without forking its modeling code.

transformers dispatches every attention call through ``ALL_ATTENTION_FUNCTIONS[
config._attn_implementation]``. We register one more entry, ``"parallelspec"``, whose function
calls ``ps_kernels.tree_attention`` on the layer's slice of our cache, and the model's config
answers it to the threads running our forward passes only (``TargetModel.attention()``: other
threads see the config's own value, and the model is as it was once the last call ends).

No mask is built for it: ``create_causal_mask`` returns the given 2-D mask (we pass None) as it
is for any implementation missing from ``AttentionMaskInterface`` ("custom attention without
equivalent mask creation"), so no dense [B, 1, N, S] mask is ever made. The tree mask, cache and
lengths reach our function in one ``ForwardContext`` passed as a keyword argument of the base
model's forward; transformers forwards such keywords to every attention call.

The base model (``model.model``) runs with ``use_cache=False``, so transformers keeps no cache of
its own; its output is the last hidden state after the final norm (the drafter's features), and
the LM head is applied only to the rows whose logits are needed, followed by what the model's
``*ForCausalLM.forward`` applies to its output (soft-capping, scaling: ``architectures``).

What each architecture needs in the attention call (per-layer sliding windows, logit soft-cap,
sinks) comes from its entry in ``architectures.ARCHITECTURES``; the query scale is the module's
own ``scaling``. With a sliding window the KV cache still keeps every row (the kernel skips the
rows outside the window): memory grows with the sequence as for full attention.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import ps_kernels
import torch

from ..cache import KVCache
from .architectures import ARCHITECTURES, check_target
from .linear import skinny_linears

ATTENTION_NAME = "parallelspec"
CONTEXT_KWARG = "parallelspec_context"
#: model_type values whose decoder layers we have checked (architectures.ARCHITECTURES): RoPE or
#: NoPE applied before the attention call, K and V heads of one size, layer_idx on every layer
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
#: devices whose attention kernels take a plan made once per forward (ps_kernels.attention_plan):
#: the GPU backends split the prefix and allocate scratch; on the CPU a plan changes nothing
PLANNED_DEVICES = ("cuda",)


@dataclass
class ForwardContext:
    """What our attention function needs besides q/k/v, for one forward pass."""
    cache: KVCache
    tree_mask: torch.Tensor | None  # [N, W] / [B, N, W] packed bits; None = causal
    windows: list                   # per layer: its sliding window, or None
    softcap: float | None = None    # attention logit soft-cap (every layer)
    sinks: bool = False             # the attention modules hold per-head sink logits (module.sinks)
    plans: dict | None = None       # window -> ps_kernels.AttentionPlan, made once for the pass's layers


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
    sinks = module.sinks if context.sinks else None
    if sinks is not None and sinks.dtype != torch.float32:
        sinks = sinks.float()
    window = context.windows[module.layer_idx]
    out = ps_kernels.tree_attention(query, key, value, k_cache, v_cache, context.cache.lens, context.tree_mask,
                                    scale=scaling, window=window, softcap=context.softcap, sinks=sinks, validate=False,
                                    plan=context.plans[window] if context.plans else None)
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, parallelspec_attention)


_register()


class TargetModel:
    """The target: an HF causal LM of a supported architecture, run over a KVCache."""

    def __init__(self, model: torch.nn.Module):
        config = getattr(model, "config", None)
        self.architecture = check_target(model)
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
        arch = self.architecture
        self.layer_windows = arch.layer_windows(config)
        self.attn_softcap = getattr(config, arch.attn_softcap, None) if arch.attn_softcap else None
        # what *ForCausalLM.forward applies to the LM head's output, in the model's dtype
        self.final_softcap = getattr(config, arch.final_softcap, None) if arch.final_softcap else None
        self.logits_divide = getattr(config, arch.logits_divide, None) if arch.logits_divide else None
        self.logits_multiply = getattr(config, arch.logits_multiply, None) if arch.logits_multiply else None

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

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(self.num_layers, batch_size, self.num_kv_heads, self.head_dim, capacity,
                       device=self.device, dtype=self.dtype)

    @contextlib.contextmanager
    def attention(self):
        """Run the model with our attention function, and its linear layers with the few-row
        kernel (parallelspec.linear), in the calling thread for the duration of the block. Other
        threads running the same model meanwhile get transformers' own attention, masks and
        linears; the model is as it was when the last block ends (_attention_in_this_thread)."""
        with _attention_in_this_thread(_configs_read_by(self.model)), skinny_linears(self.model):
            yield

    @contextlib.contextmanager
    def aux_hidden_states(self, layers=()):
        """While open, forward() returns [last hidden state; the hidden states entering decoder
        layers `layers`, in that order] concatenated on the last axis ([B, N, (1 + len(layers)) d]):
        the features EAGLE-3 drafters read, gathered in the same pass by forward pre-hooks (no
        second pass, no host sync). Layer i's input is the output of layer i - 1 (0: the
        embeddings), vLLM's numbering of ``eagle_aux_hidden_state_layer_ids``. logits() reads the
        first d columns. No layers: forward() is unchanged."""
        layers = tuple(int(i) for i in layers or ())
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"aux layers: expected decoder layer indices in [0, {self.num_layers}) of this "
                             f"{self.num_layers}-layer model, got {list(layers)}")
        if not layers:
            yield
            return
        with layer_inputs(self.base.layers, layers) as store:
            self._aux = (layers, store)
            try:
                yield
            finally:
                self._aux = None

    def _with_aux(self, hidden: torch.Tensor) -> torch.Tensor:
        aux = getattr(self, "_aux", None)
        if aux is None:
            return hidden
        layers, store = aux
        return torch.cat([hidden] + [store[i] for i in layers], dim=-1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Run N tokens per sequence at the given positions; node i attends the committed rows and
        the nodes tree_mask allows (None = causal); their K/V land in rows lens..lens+N-1.
        Returns the last hidden states [B, N, d] (after the final norm). Call inside attention()."""
        context = ForwardContext(cache, tree_mask, self.layer_windows, self.attn_softcap, self.architecture.sinks,
                                 self._plans(input_ids.shape, cache))
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=False, **{CONTEXT_KWARG: context})
        return self._with_aux(out.last_hidden_state)

    def _plans(self, shape: torch.Size, cache: KVCache) -> dict | None:
        """The attention kernels' split plan and scratch, made once per forward for all its layers
        (one per distinct sliding window) where the backends use one (PLANNED_DEVICES); None elsewhere."""
        if self.device.type not in PLANNED_DEVICES:
            return None
        batch, rows = shape
        return {w: ps_kernels.attention_plan("tree_attention", batch=batch, q_heads=self.config.num_attention_heads,
                                             kv_heads=self.num_kv_heads, rows=rows, head_dim=self.head_dim,
                                             max_prefix=cache.capacity, window=w, device=self.device)
                for w in set(self.layer_windows)}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head and what the model's *ForCausalLM.forward applies after it (final soft-cap,
        logits scaling) in the model's dtype, in its order, then fp32 (as transformers' generate does)."""
        if hidden.shape[-1] != self.hidden_size:   # [last hidden; aux hidden states] (aux_hidden_states)
            hidden = hidden[..., :self.hidden_size]
        return self.finish_logits(self.lm_head(hidden)).float()

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's *ForCausalLM.forward applies to the LM head's output (final soft-cap,
        logits scaling), in its order, in the logits' dtype."""
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        if self.logits_divide is not None:
            logits = logits / self.logits_divide
        if self.logits_multiply is not None:
            logits = logits * self.logits_multiply
        return logits


@contextlib.contextmanager
def layer_inputs(layers, indices):
    """While open, the hidden states entering ``layers[i]`` for each i in `indices`, caught by
    forward pre-hooks in the dict yielded (i -> the latest forward's input), in the model's own
    pass: no second pass, and only these layers' states are kept."""
    store = {}

    def keep(index, module, args, kwargs):
        store[index] = args[0] if args else kwargs["hidden_states"]
    handles = [layers[i].register_forward_pre_hook(functools.partial(keep, i), with_kwargs=True)
               for i in sorted(set(indices))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# The attention implementation, per thread. transformers reads `config._attn_implementation` (a
# property of PreTrainedConfig) in every attention layer and in create_causal_mask. While any
# parallelspec block runs on a model, its configs get a subclass whose property answers
# ATTENTION_NAME to the threads inside a block and the config's own value to every other thread
# (which then runs the model exactly as transformers does: its attention function, its masks).
# The class is swapped once, when the first block on the config starts, under a lock, and
# swapped back when the last one ends, also on an exception; the config's attributes are never
# written.
_view_lock = threading.Lock()
_view_local = threading.local()      # .configs: {id(config): active blocks} of the calling thread
_views: dict[int, list] = {}         # id(config) -> [config, its own class, active blocks (all threads)]
_view_classes: dict[type, type] = {}


def _view_class(cls: type) -> type:
    """cls with `_attn_implementation` answered per thread (see above); one subclass per class."""
    view = _view_classes.get(cls)
    if view is None:
        own = getattr(cls, "_attn_implementation")

        def get(config):
            active = getattr(_view_local, "configs", None)
            return ATTENTION_NAME if active and id(config) in active else own.fget(config)
        view = type(cls.__name__, (cls,), {"_attn_implementation": property(get, own.fset),
                                           "__qualname__": cls.__qualname__, "__module__": cls.__module__})
        _view_classes[cls] = view
    return view


def _configs_read_by(model: torch.nn.Module) -> list:
    """The config objects the model's modules read the attention implementation from."""
    found = {}
    for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]:
        if isinstance(getattr(type(c), "_attn_implementation", None), property):
            found[id(c)] = c
    if not found:
        raise ValueError(f"model: expected a transformers model whose config has an _attn_implementation "
                         f"property, got {type(model).__name__}")
    return list(found.values())


@contextlib.contextmanager
def _attention_in_this_thread(configs: list):
    """Inside the block, the calling thread sees ATTENTION_NAME in these configs; others do not."""
    with _view_lock:
        for c in configs:
            entry = _views.get(id(c))
            if entry is None:
                entry = _views[id(c)] = [c, type(c), 0]
                object.__setattr__(c, "__class__", _view_class(type(c)))
            entry[2] += 1
    active = _view_local.__dict__.setdefault("configs", {})
    for c in configs:
        active[id(c)] = active.get(id(c), 0) + 1
    try:
        yield
    finally:
        for c in configs:
            active[id(c)] -= 1
            if not active[id(c)]:
                del active[id(c)]
        with _view_lock:
            for c in configs:
                entry = _views[id(c)]
                entry[2] -= 1
                if not entry[2]:
                    del _views[id(c)]
                    object.__setattr__(c, "__class__", entry[1])
