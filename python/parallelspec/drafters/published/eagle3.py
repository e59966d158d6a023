"""EAGLE-3 and P-EAGLE heads as their publishers write them, run over this package's KV cache.

The network (SafeAILab/EAGLE ``eagle/model/cnets.py``, SpecForge ``llama3_eagle.py`` /
``peagle.py``, AngelSlim ``llama_eagle3.py``, vLLM ``llama_eagle3.py``: one definition read five
times, every one the same up to names)::

    f_t   = fc([a_1; a_2; a_3])            the three auxiliary hidden states of the target
                                           (3 * target_hidden -> hidden); without aux hidden
                                           states (eagle_config.use_aux_hidden_state false) the
                                           target's last hidden state, no fc
    layer 0: residual = f_t (norm_before_residual: hidden_norm(f_t))
             q/k/v over [input_layernorm(embed(x_{t+1})); hidden_norm(f_t)]   (2 * hidden wide)
             h = residual + o_proj(attn); h += mlp(post_attention_layernorm(h))
    layers 1..: plain Llama decoder layers (P-EAGLE's multi-layer heads)
    logits = lm_head(norm(h)) over the draft vocabulary; target id = draft id + d2t[draft id]

EAGLE-3 drafts k tokens in k passes: pass j > 1 feeds (the depth j - 1 top-1 token, the head's
own pre-norm output h) at the next position (``topK_genrate``). P-EAGLE drafts them in one pass:
k - 1 mask slots after the real tokens, each fed (mask token id, fc(mask_hidden)) at positions
last + 1 .. last + k - 1 (SpecForge's ``OnlinePEagleModel``, vLLM's parallel drafting).

The embedding is the checkpoint's ``embed_tokens.weight`` when it holds one (AngelSlim saves it),
else the target's input embedding (EAGLE and SpecForge drop it from their files: it is the
target's, frozen). RoPE follows the head's config as vLLM reads it (rope_theta, rope_scaling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ps_kernels

from ...hf.linear import skinny_linears
from ..base import DraftCandidates, Drafter
from ..checkpoint import DraftConfig, default_aux_layers
from ..network import DecoderLayer, RMSNorm, run_layers, top_candidates

#: architectures the publishers write into config.json
ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "PEagleDraftModel")
#: config keys holding the P-EAGLE mask token id, in vLLM's order of preference
MASK_TOKEN_KEYS = ("dflash_config.mask_token_id", "mask_token_id", "dspark_noise_token_id", "pard_token",
                   "ptd_token_id")


def aux_layer_ids(config: dict, num_layers: int, override=None) -> tuple[int, ...]:
    """The target layers whose input hidden states the head reads, in vLLM's numbering (layer i's
    input = layer i - 1's output; 0 = the embeddings): `override`, else the config's
    ``eagle_aux_hidden_state_layer_ids`` (top level or in ``eagle_config``; vLLM's numbering), else
    AngelSlim's ``aux_hidden_states_layer_ids`` (outputs of layers: HF hidden_states index id + 1,
    so + 1 here), else EAGLE-3's default."""
    if override is not None:
        return tuple(int(i) for i in override)
    eagle = config.get("eagle_config") or {}
    ids = config.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    if ids:
        return tuple(int(i) for i in ids)
    ids = config.get("aux_hidden_states_layer_ids")
    if ids:
        return tuple(int(i) + 1 for i in ids)
    return default_aux_layers(num_layers)


def mask_token_id(config: dict, arg: str = "drafter") -> int:
    for key in MASK_TOKEN_KEYS:
        scope, _, name = key.rpartition(".")
        value = (config.get(scope) or {}).get(name) if scope else config.get(name)
        if value is not None:
            return int(value)
    raise ValueError(f"{arg}: a P-EAGLE head needs its mask token id in config.json; looked for "
                     f"{', '.join(MASK_TOKEN_KEYS)} and found none")


def vocab_map(state: dict, draft_vocab: int, vocab: int, arg: str = "drafter") -> torch.Tensor:
    """Draft id -> target id [draft_vocab]. The publishers' convention (EAGLE's topK_genrate,
    SpecForge, AngelSlim, vLLM's compute_logits): target id = draft id + d2t[draft id]; t2d [vocab]
    bool marks the target ids in the draft vocabulary. A d2t holding the target ids themselves is
    taken when t2d says so; a full vocabulary needs neither."""
    d2t, t2d = state.get("d2t"), state.get("t2d")
    listed = None if t2d is None else t2d.reshape(-1).bool().nonzero().reshape(-1)
    if d2t is None:
        if listed is not None and listed.numel() == draft_vocab:
            return listed
        if draft_vocab == vocab:
            return torch.arange(vocab)
        raise ValueError(f"{arg}: missing tensors ['d2t']: the draft vocabulary ({draft_vocab} ids) differs from "
                         f"the target's ({vocab}) and the checkpoint has no d2t map")
    d2t = d2t.reshape(-1).long()
    if d2t.numel() != draft_vocab:
        raise ValueError(f"{arg}: d2t has {d2t.numel()} entries, the config's draft_vocab_size is {draft_vocab}")
    offset = torch.arange(draft_vocab) + d2t
    if listed is not None and not torch.equal(offset, listed):
        if torch.equal(d2t, listed):
            return d2t
        raise ValueError(f"{arg}: d2t and t2d disagree: neither target = draft + d2t[draft] nor target = d2t[draft] "
                         "gives the ids t2d marks; the checkpoint is inconsistent")
    if int(offset.min()) < 0 or int(offset.max()) >= vocab:
        raise ValueError(f"{arg}: d2t maps draft ids outside the target vocabulary [0, {vocab}) "
                         f"(draft id + d2t ranges over [{int(offset.min())}, {int(offset.max())}])")
    return offset


def embedding(state: dict, model) -> torch.Tensor:
    """The head's token embedding: its own when the checkpoint has one, else the target's."""
    own = state.get("embed_tokens.weight")
    return own if own is not None else model.get_input_embeddings().weight.detach()


def check_target(target: dict, aux_layers, model, source: str = "") -> None:
    """Raise a ValueError naming both sides when the head was made for another target."""
    c = model.config
    bad = []
    if target["hidden_size"] != c.hidden_size:
        bad.append(f"hidden size: the drafter reads {target['hidden_size']}-wide target features, "
                   f"the model's hidden_size is {c.hidden_size}")
    if target["vocab_size"] != c.vocab_size:
        bad.append(f"vocabulary: the drafter's vocab_size is {target['vocab_size']}, the model's is {c.vocab_size}")
    if aux_layers and max(aux_layers) >= c.num_hidden_layers:
        bad.append(f"layers: the drafter reads the inputs of target layers {list(aux_layers)}, the model has "
                   f"{c.num_hidden_layers}")
    if bad:
        raise ValueError(f"drafter {source}: made for another target than this {getattr(c, 'model_type', '')} "
                         "model: " + "; ".join(bad))


class FirstLayer(DecoderLayer):
    """EAGLE-3's layer 0 (``midlayer``): [e; f] in, residual f, or hidden_norm(f) with
    norm_before_residual (vLLM's and SpecForge's option)."""

    def __init__(self, cfg: DraftConfig, norm_before_residual: bool):
        super().__init__(cfg, two_inputs=True)
        self.norm_before_residual = norm_before_residual

    def residual(self, x):
        f = x[..., x.shape[-1] // 2:]
        return self.hidden_norm(f) if self.norm_before_residual else f


def _rope(config: dict, head_dim: int, num_heads: int, num_kv_heads: int, hidden: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    keys = {k: config[k] for k in ("rope_theta", "rope_scaling", "max_position_embeddings")
            if config.get(k) is not None}
    conf = LlamaConfig(hidden_size=hidden, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       head_dim=head_dim, **keys)
    return LlamaRotaryEmbedding(conf)


class Eagle3Head(nn.Module):
    """The published network (module docstring), weights named as this package's DecoderLayer."""

    def __init__(self, config: dict, *, target_hidden: int, draft_vocab: int, use_aux: bool, num_aux: int,
                 mask_hidden: bool):
        super().__init__()
        d = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or d // heads
        self.cfg = DraftConfig(hidden_size=d, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                               intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
                               rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                               num_layers=config.get("num_hidden_layers", 1))
        self.target_hidden = target_hidden
        self.use_aux = use_aux
        fc_in = num_aux * target_hidden if use_aux else target_hidden
        if not use_aux and target_hidden != d:
            raise ValueError(f"drafter: without auxiliary hidden states the head reads the target's last hidden "
                             f"state directly: its hidden_size ({d}) must equal target_hidden_size ({target_hidden})")
        self.fc = nn.Linear(fc_in, d, bias=False) if use_aux else None
        norm_before = bool(config.get("norm_before_residual", False))
        self.layers = nn.ModuleList([FirstLayer(self.cfg, norm_before)] +
                                    [DecoderLayer(self.cfg) for _ in range(self.cfg.num_layers - 1)])
        self.norm = RMSNorm(d, self.cfg.rms_norm_eps)
        self.lm_head = nn.Linear(d, draft_vocab, bias=False)
        self.mask_hidden = nn.Parameter(torch.zeros(fc_in)) if mask_hidden else None
        self.register_buffer("embed_weight", torch.empty(0), persistent=False)
        self.register_buffer("draft_to_target", torch.arange(draft_vocab), persistent=False)
        # not a submodule: .to(dtype) must not round its inverse frequencies (it computes in fp32)
        self.__dict__["rotary"] = _rope(config, head_dim, heads, kv_heads, d)

    def features(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [B, R, (1 + aux) * target_hidden] ([last; aux...], TargetModel.
        aux_hidden_states) -> the head's f [B, R, hidden]."""
        th = self.target_hidden
        if not self.use_aux:
            return features[..., :th]
        return self.fc(features[..., th:])

    def mask_input(self, mask_id: int, dtype) -> torch.Tensor:
        """[embed(mask token); fc(mask_hidden)] [2 * hidden]: every P-EAGLE mask slot's input."""
        f = self.mask_hidden.to(dtype)
        f = self.fc(f) if self.fc is not None else f
        return torch.cat([self.embed_weight[mask_id].to(dtype), f])

    def inputs(self, tokens: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        e = F.embedding(tokens, self.embed_weight)
        return torch.cat([e, f.to(e.dtype)], dim=-1)

    def run(self, x, positions, attend, out_rows=None):
        """x [B, T, 2 * hidden] at positions [B, T]; attend(layer, q, k, v) -> [B, H, T, D]. Returns
        the pre-norm output h [B, T', hidden] (only out_rows when given)."""
        cos, sin = self.rotary(x, positions)
        return run_layers(self.layers, x, cos, sin, attend, out_rows)

    def logits(self, h):
        return self.lm_head(self.norm(h)).float()


class PublishedHeadDrafter(Drafter):
    """What the EAGLE-3 and P-EAGLE drafters share: the head, its KV cache kv[L, 2, B, Hkv, S, D]
    + cache_lens[B], the target check and the aux layers the decoding loop gathers."""

    needs_features = True
    extra_rows = 0

    def __init__(self, head: Eagle3Head, *, depth: int, top_m: int, aux_layers: tuple[int, ...], target: dict,
                 mask_token: int | None = None, source: str = ""):
        if depth < 1:
            raise ValueError(f"depth: expected >= 1, got {depth}")
        self.head = head
        self.depth = depth
        self.top_m = top_m
        self.aux_layers = tuple(aux_layers) if head.use_aux else ()
        self.target = target   # what check_target compares: hidden_size, vocab_size, num_hidden_layers
        self.mask_token = mask_token
        self.source = source
        self.kv = None
        self.cache_lens = None

    def check_target(self, model) -> None:
        check_target(self.target, self.aux_layers, model, self.source)

    def reset(self, batch_size, max_len, device, dtype) -> None:
        cfg = self.head.cfg
        self.head.to(device=device, dtype=dtype).eval()
        self.kv = torch.zeros(cfg.num_layers, 2, batch_size, cfg.num_kv_heads, max_len + self.extra_rows,
                              cfg.head_dim, device=device, dtype=dtype)
        self.cache_lens = torch.zeros(batch_size, dtype=torch.int64, device=device)

    def step(self, tokens, features, lens) -> DraftCandidates:
        if self.kv is None:
            raise RuntimeError("call reset(batch_size, max_len, device, dtype) before step()")
        th = self.head.target_hidden
        width = th * (1 + len(self.aux_layers))
        if features is None or features.shape[:2] != tokens.shape or features.shape[-1] < width:
            got = None if features is None else tuple(features.shape)
            raise ValueError(f"features: expected [B, R, {width}] (the target's last hidden state and the inputs of "
                             f"layers {list(self.aux_layers)}, as parallelspec.generate gathers them), got {got}")
        with torch.no_grad(), skinny_linears(self.head):
            return self._step(tokens, features, lens)

    def _step(self, tokens, features, lens) -> DraftCandidates:
        raise NotImplementedError

    def _attend(self, cache_lens, new_lens, num_masks):
        def attend(i, q, k, v):
            return ps_kernels.draft_attention(q, k, v, self.kv[i, 0], self.kv[i, 1], cache_lens, new_lens, num_masks,
                                              validate=False)
        return attend

    def _top(self, h):
        return top_candidates(self.head.logits(h), self.head.draft_to_target, self.top_m)


class Eagle3Drafter(PublishedHeadDrafter):
    """EAGLE-3: k sequential passes along the top-1 chain (as EagleDrafter); candidates are each
    depth's top-m, depths > 1 conditioned on the chain."""

    @property
    def extra_rows(self) -> int:
        return self.depth - 1

    def _step(self, tokens, features, lens) -> DraftCandidates:
        head = self.head
        R = tokens.shape[1]
        positions = self.cache_lens[:, None] + torch.arange(R, device=tokens.device)
        x = head.inputs(tokens, head.features(features))
        h = head.run(x, positions, self._attend(self.cache_lens, lens, 0), out_rows=(lens - 1).clamp(min=0)[:, None])
        self.cache_lens += lens
        one = torch.ones_like(lens)
        ids, logps = [], []
        for j in range(self.depth):
            tok, logp = self._top(h)
            ids.append(tok)
            logps.append(logp)
            if j + 1 == self.depth:
                break
            scratch = self.cache_lens + j   # a row past the committed ones: the next step overwrites it
            h = head.run(head.inputs(tok[:, :, 0], h), scratch[:, None], self._attend(scratch, one, 0))
        return DraftCandidates(torch.cat(ids, dim=1), torch.cat(logps, dim=1), conditioned_depths=self.depth - 1)


class PEagleDrafter(PublishedHeadDrafter):
    """P-EAGLE: one pass over the new real tokens and k - 1 mask slots (as ParallelDrafter)."""

    def _step(self, tokens, features, lens) -> DraftCandidates:
        head, M = self.head, self.depth - 1
        B, R = tokens.shape
        dev = tokens.device
        x = head.inputs(tokens, head.features(features))
        if M:
            x = torch.cat([x, head.mask_input(self.mask_token, x.dtype).expand(B, M, -1)], dim=1)
        real_pos = self.cache_lens[:, None] + torch.arange(R, device=dev)
        last = self.cache_lens + lens - 1
        mask_pos = last[:, None] + torch.arange(1, M + 1, device=dev)
        rows = torch.cat([(lens - 1).clamp(min=0)[:, None], torch.arange(R, R + M, device=dev).expand(B, -1)], dim=1)
        h = head.run(x, torch.cat([real_pos, mask_pos], dim=1), self._attend(self.cache_lens, lens, M), out_rows=rows)
        self.cache_lens += lens
        ids, logp = self._top(h)
        return DraftCandidates(ids, logp)


_LAYER_NAMES = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
                "mlp.down_proj": "down_proj", "input_layernorm": "input_norm", "hidden_norm": "hidden_norm",
                "post_attention_layernorm": "post_norm"}
#: tensors read apart from the module's parameters
SPECIAL = ("d2t", "t2d", "embed_tokens.weight", "mask_hidden")


def canonical(name: str) -> str:
    """A publisher's tensor name -> the name in its plain form: no ``model.`` prefix (speculators /
    Automodel exports), ``midlayer.`` (EAGLE, SpecForge, AngelSlim) as ``layers.0.``."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("midlayer."):
        name = "layers.0." + name[len("midlayer."):]
    return name


def module_name(name: str) -> str | None:
    """Plain publisher name -> Eagle3Head parameter name (None: not a parameter of the head)."""
    if name in ("fc.weight", "norm.weight", "lm_head.weight"):
        return name
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[1].isdigit() and parts[-1] == "weight":
        inner = _LAYER_NAMES.get(".".join(parts[2:-1]))
        if inner is not None:
            return f"layers.{parts[1]}.{inner}.weight"
    return None


def publisher_name(param: str) -> str:
    """Eagle3Head parameter name -> the name a publisher's file uses (for messages)."""
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    parts = param.split(".")
    if parts[0] == "layers":
        return f"layers.{parts[1]}.{inverse[parts[2]]}.weight" if parts[1] != "0" else \
            f"midlayer.{inverse[parts[2]]}.weight (or layers.0....)"
    return param


def load_head(config: dict, state: dict, model, *, parallel: bool, source: str, depth: int | None = None,
              top_m: int = 8, aux_layers=None, arg: str = "drafter") -> PublishedHeadDrafter:
    """An Eagle3Drafter (parallel=False) or PEagleDrafter from a publisher's config and tensors."""
    state = {canonical(k): v for k, v in state.items()}
    vocab = config.get("vocab_size")
    missing_keys = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
                    if config.get(k) is None]
    if missing_keys:
        raise ValueError(f"{arg}: {source}config.json lacks {missing_keys}, which an EAGLE-3 head's config holds")
    target_hidden = config.get("target_hidden_size") or config["hidden_size"]
    eagle = config.get("eagle_config") or {}
    use_aux = bool(eagle.get("use_aux_hidden_state", True))
    lm_head = state.get("lm_head.weight")
    draft_vocab = config.get("draft_vocab_size") or (lm_head.shape[0] if lm_head is not None else vocab)
    num_layers = model.config.num_hidden_layers
    layers = aux_layer_ids(config, num_layers, aux_layers)
    head = Eagle3Head(config, target_hidden=target_hidden, draft_vocab=draft_vocab, use_aux=use_aux,
                      num_aux=len(layers), mask_hidden=parallel)
    expected = {n for n in head.state_dict() if n not in ("mask_hidden",)}
    given = {}
    extra = []
    for name, tensor in state.items():
        target_name = module_name(name)
        if target_name is not None and target_name in expected:
            given[target_name] = tensor
        elif name not in SPECIAL:
            extra.append(name)
    if lm_head is None and draft_vocab == vocab:   # vLLM shares the target's head then
        given["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    missing = sorted(publisher_name(n) for n in expected - set(given))
    if parallel and "mask_hidden" not in state:
        missing.append("mask_hidden")
    if not use_aux and "fc.weight" in extra:
        extra.remove("fc.weight")   # vLLM skips fc without aux hidden states
    if missing or extra:
        raise ValueError(f"{arg}: {source}the weights do not match an EAGLE-3 {'P-EAGLE ' if parallel else ''}head "
                         f"with the config's {head.cfg.num_layers} layer(s)"
                         f"{'' if use_aux else ' and no auxiliary hidden states'}: missing tensors {missing}, "
                         f"extra tensors {sorted(extra)}")
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    wrong = [f"{publisher_name(k)}: expected {shapes[k]}, got {tuple(v.shape)}" for k, v in given.items()
             if tuple(v.shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{arg}: {source}tensor shapes do not match config.json: " + "; ".join(wrong))
    head.load_state_dict({k: v.float() for k, v in given.items()}, strict=False)
    if parallel:
        mh = state["mask_hidden"].reshape(-1).float()
        if mh.numel() != head.mask_hidden.numel():
            raise ValueError(f"{arg}: {source}mask_hidden has {mh.numel()} values, expected {head.mask_hidden.numel()} "
                             f"({'fc input: aux layers x target hidden' if use_aux else 'the hidden size'})")
        with torch.no_grad():
            head.mask_hidden.copy_(mh)
    target = {"hidden_size": target_hidden, "vocab_size": vocab}
    check_target(target, layers if use_aux else (), model, source.rstrip(": "))
    head.draft_to_target = vocab_map(state, draft_vocab, vocab, arg)
    emb = embedding(state, model)
    if emb.shape != (vocab, head.cfg.hidden_size):
        where = "its embed_tokens.weight" if "embed_tokens.weight" in state else "the target's input embedding"
        raise ValueError(f"{arg}: {source}the head embeds tokens with {where} of shape {tuple(emb.shape)}; expected "
                         f"[{vocab}, {head.cfg.hidden_size}] (vocab_size, hidden_size of config.json)"
                         + ("" if "embed_tokens.weight" in state else
                            ": a head narrower than its target must ship its own embed_tokens.weight"))
    head.embed_weight = emb.float() if "embed_tokens.weight" in state else emb   # the target's: no copy
    if parallel:
        # k as trained, where the file says it (parallelspec's vLLM export; speculators' configs)
        spec = (config.get("parallelspec") or {}).get("speculative_config") or config.get("speculators_config") or {}
        cls, default_depth = PEagleDrafter, int(spec.get("num_speculative_tokens") or 4)
        token = mask_token_id(config, arg)
        if not 0 <= token < vocab:
            raise ValueError(f"{arg}: {source}mask token id {token} is outside the vocabulary [0, {vocab})")
    else:
        cls, default_depth, token = Eagle3Drafter, 4, None
    return cls(head.eval(), depth=depth or default_depth, top_m=top_m, aux_layers=layers, target=target,
               mask_token=token, source=source.rstrip(": "))
