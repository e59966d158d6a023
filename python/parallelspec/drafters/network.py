"""The network shared by the parallel and the EAGLE-style drafter, and its two attention modes.

    input   x_t = W_fc [e(x_{t+1}); f_t]                 (2d -> d; e = the target's frozen embedding)
    layers  L x Llama decoder layer (RMSNorm, GQA attention with the target's head layout and
            RoPE settings, SwiGLU MLP), own weights; L = 1 by default
    output  g_t = RMSNorm(h_t): the drafter's estimate of the target's next feature f_{t+1}
            (the input of the target's LM head), and logits = head(g_t) over a draft vocabulary

That is the default layout, ``layout="fused"`` (mask slot j fed its own learned vector m_j in
the fused-input space). ``layout="eagle3"`` is the one vLLM serves (its EAGLE-3 decoder layer
without auxiliary hidden states, with its parallel drafting; ``parallelspec.tools.export``):

    layer 0 q/k/v = W_{q,k,v} [input_norm(e(x_{t+1})); hidden_norm(f_t)]   (2d wide, no fc)
            residual = f_t, then o_proj, post norm, SwiGLU MLP as in a Llama layer
    mask    every slot is fed (e(mask_token_id), mask_hidden): one learned feature vector and one
            reserved token id for all slots; the position tells the slots apart

``layout="peagle"`` is that layer fed EAGLE-3's features (vLLM's P-EAGLE with
``use_aux_hidden_state``; exported by ``parallelspec export`` for vLLM and SpecForge):

    f_t     = W_fc [a_1; ...; a_n]          (n d -> d) the hidden states entering the target layers
                                            ``DraftConfig.aux_layers`` at t (3 of them by default)
    layer 0 as in eagle3, over [input_norm(e(x_{t+1})); hidden_norm(f_t)], residual f_t
    mask    every slot is fed (e(mask_token_id), W_fc mask_hidden), mask_hidden n d wide

RMSNorm is nonlinear, so no layout converts into another: a drafter is trained in one.

The head is either the target's own LM head restricted to the draft vocabulary (frozen, not
stored: ``head="target"``), or a trained matrix initialised from those rows (``head="trained"``).
The draft vocabulary is a list of target ids (``draft_to_target``); ``None`` means all of them.

Attention runs through a callback, so that one definition of the network serves
  * inference: ``ps_kernels.draft_attention`` over the drafter's KV cache (kv[l, 0] / kv[l, 1]
    are its k_cache / v_cache: contiguous views), and
  * training: SDPA over a whole sequence with a dense boolean mask (``group_layout``), where
    every anchor gets its own group of extra slots (mask slots for the parallel drafter, the
    drafter's own autoregressive steps for the EAGLE-style one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ps_kernels

from ..hf.linear import linear, native_serves, skinny_linears
from .base import DraftCandidates, Drafter
from .checkpoint import DraftConfig, check_signature, default_aux_layers, read_checkpoint, write_checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [..., head_dim] for integer positions, HF Llama convention (halves rotated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, T, D], cos/sin [B, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class DecoderLayer(nn.Module):
    """A Llama decoder layer; with ``two_inputs`` (layer 0 of the eagle3 layout) its input is
    [e; f] (2d): q/k/v over [input_norm(e); hidden_norm(f)], and the residual stream starts at f."""

    def __init__(self, cfg: DraftConfig, two_inputs: bool = False):
        super().__init__()
        d, H, Hkv, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.two_inputs = two_inputs
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps) if two_inputs else None
        width = 2 * d if two_inputs else d
        self.q_proj = nn.Linear(width, H * D, bias=False)
        self.k_proj = nn.Linear(width, Hkv * D, bias=False)
        self.v_proj = nn.Linear(width, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        self.post_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def qkv(self, x, cos, sin):
        """x [B, T, d] -> q [B, H, T, D], k/v [B, Hkv, T, D] (RoPE applied to q and k)."""
        B, T, _ = x.shape
        if self.two_inputs:
            e, f = x.chunk(2, dim=-1)
            h = torch.cat([self.input_norm(e), self.hidden_norm(f)], dim=-1)
        else:
            h = self.input_norm(x)
        q = self.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def residual(self, x):
        """The residual stream of input x: the feature half of [e; f] for a two-input layer."""
        return x[..., x.shape[-1] // 2:] if self.two_inputs else x

    def finish(self, x, attn):
        """Residual + output projection, then the SwiGLU MLP block. attn [B, H, T, D]."""
        B, H, T, D = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, T, H * D))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def run_layers(layers, x, cos, sin, attend, out_rows=None):
    """The decoder layers over x: attend(layer index, q, k, v) -> [B, H, T, D] is the caller's
    attention over its cache. out_rows [B, T'] (int64): the last layer's output projection and MLP
    run on these rows alone (the others still attend), returning [B, T', d]."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        q, k, v = layer.qkv(x, cos, sin)
        x = layer.residual(x)
        attn = attend(i, q, k, v)
        if i == last and out_rows is not None:
            x = x.gather(1, out_rows[:, :, None].expand(-1, -1, x.shape[-1]))
            attn = attn.gather(2, out_rows[:, None, :, None].expand(-1, attn.shape[1], -1, attn.shape[-1]))
        x = layer.finish(x, attn)
    return x


class DraftNetwork(nn.Module):
    """Fused input, decoder layers, final norm and head. The target's embedding (and, with
    head="target", its LM head rows) are attached by `attach_target` and never saved."""

    def __init__(self, cfg: DraftConfig, draft_to_target: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        vd = cfg.draft_vocab_size or cfg.vocab_size
        if draft_to_target is None:
            draft_to_target = torch.arange(vd) if cfg.draft_vocab_size is None else None
        if draft_to_target is None or draft_to_target.shape != (vd,):
            raise ValueError(f"draft_to_target: expected {vd} target ids, got "
                             f"{None if draft_to_target is None else tuple(draft_to_target.shape)}")
        self.register_buffer("draft_to_target", draft_to_target.long().clone())
        fused = cfg.layout == "fused"
        # fused: fc([e; f]); peagle: fc over the aux features; eagle3: none (layer 0 reads [e; f])
        fc_in = {"fused": 2 * d, "eagle3": 0, "peagle": self.aux_width}[cfg.layout]
        self.fc = nn.Linear(fc_in, d, bias=False) if fc_in else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, two_inputs=not fused and i == 0) for i in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = nn.Linear(d, vd, bias=False) if cfg.head == "trained" else None
        # fused: one learned input vector per mask-slot index (in the fused-input space);
        # eagle3 / peagle: one learned feature (fc input) for every slot, paired with e(mask_token_id)
        self.mask_embed = (nn.Parameter(torch.zeros(cfg.mask_slots, d)) if cfg.mask_slots and fused else None)
        self.mask_hidden = (nn.Parameter(torch.zeros(fc_in or d)) if cfg.mask_slots and not fused else None)
        # frozen target tensors, non-persistent: referenced from the target, never stored
        self.register_buffer("embed_weight", torch.empty(0), persistent=False)
        self.register_buffer("target_head_weight", torch.empty(0), persistent=False)

    @property
    def aux_width(self) -> int:
        """Width of the auxiliary features the peagle layout reads (0 for the others)."""
        return len(self.cfg.aux_layers or ()) * self.cfg.hidden_size

    @property
    def draft_vocab_size(self) -> int:
        return self.draft_to_target.shape[0]

    def attach_target(self, model, init_head: bool = False) -> None:
        """Reference the target's embedding (and head rows); init_head copies those rows into a
        trained head (its initialisation before training)."""
        emb = model.get_input_embeddings().weight.detach()
        out = model.get_output_embeddings().weight.detach()
        dev = self.norm.weight.device
        dtype = self.norm.weight.dtype
        self.embed_weight = emb.to(dev, dtype)
        rows = out.to(dev)[self.draft_to_target.to(dev)].to(dtype)
        if self.head is None:
            self.target_head_weight = rows
        elif init_head:
            with torch.no_grad():
                self.head.weight.copy_(rows)

    def set_draft_vocab(self, draft_to_target: torch.Tensor, target) -> None:
        """Swap the draft vocabulary of a network whose head is the target's (its outputs live in
        the target's feature space, so any subset of the target's head applies)."""
        if self.head is not None:
            raise ValueError("set_draft_vocab: a trained head is tied to its vocabulary (head='trained')")
        self.draft_to_target = draft_to_target.long().clone().to(self.draft_to_target.device)
        self.cfg.draft_vocab_size = int(draft_to_target.numel())
        self.attach_target(target)

    def fuse(self, tokens, features):
        """tokens [B, T] (target ids), features [B, T, d] -> the inputs of layer 0: fused [B, T, d],
        or [e; f] [B, T, 2d] for the eagle3 and peagle layouts (their layer 0 normalises the halves
        itself). The peagle layout reads the last aux_width columns of features: the aux hidden
        states alone (training data), or after the last hidden state (the decoding loop's
        [last; aux], TargetModel.aux_hidden_states), and takes f = fc(aux)."""
        if self.embed_weight.numel() == 0:
            raise RuntimeError("drafter has no target attached: call attach_target(model) "
                               "(from_pretrained(path, target) does it)")
        e = F.embedding(tokens, self.embed_weight)
        if self.cfg.layout == "peagle":
            return torch.cat([e, self.fc(features[..., -self.aux_width:].to(e.dtype))], dim=-1)
        x = torch.cat([e, features.to(e.dtype)], dim=-1)
        return x if self.fc is None else self.fc(x)

    def mask_inputs(self, dtype=None) -> torch.Tensor:
        """The layer-0 inputs of mask slots 1..k-1 [k-1, width]: their learned vectors (fused), or
        (e(mask_token_id), mask_hidden) for every slot (eagle3; peagle: fc(mask_hidden))."""
        if self.mask_hidden is None:
            x = self.mask_embed
        else:
            e = self.embed_weight[self.cfg.mask_token_id]
            f = self.mask_hidden.to(e.dtype)
            f = self.fc(f) if self.cfg.layout == "peagle" else f
            x = torch.cat([e, f]).expand(self.cfg.mask_slots, -1)
        return x if dtype is None else x.to(dtype)

    def run(self, x, positions, attend, out_rows=None):
        """x [B, T, d] at integer positions [B, T]; attend(layer_index, q, k, v) -> [B, H, T, D].

        out_rows [B, T'] (int64): only these rows' outputs are wanted, so the last layer runs its
        output projection and MLP on them alone (the other rows still attend: their K/V are
        what a step leaves in the cache). Returns [B, T', d] then, else [B, T, d]. A step over a
        long prompt wants 1 + k - 1 rows of hundreds: this skips most of its work."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        return run_layers(self.layers, x, cos, sin, attend, out_rows)

    def features_out(self, h):
        """The drafter's estimate of the target's next feature (input of the LM head)."""
        return self.norm(h)

    def logits(self, g):
        """g = features_out(h) -> logits over the draft vocabulary (float32)."""
        w = self.head.weight if self.head is not None else self.target_head_weight
        return linear(g, w).float()


def top_candidates(logits: torch.Tensor, draft_to_target: torch.Tensor, m: int):
    """logits [..., Vd] -> (target ids [..., m], log-probs [..., m] float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    m = min(m, logp.shape[-1])
    lp, idx = logp.topk(m, dim=-1)
    return draft_to_target[idx], lp


def save_network(path, net: DraftNetwork, kind: str, extra: dict | None = None, dtype=torch.float16):
    """safetensors weights (the target's tensors excluded) + config.json."""
    write_checkpoint(path, net.cfg, net.state_dict(), kind, extra, dtype)


def load_network(path, kind: str):
    """(DraftNetwork in float32 on CPU, the extra config entries) from save_network's files."""
    cfg, state, extra = read_checkpoint(path, kind)
    net = DraftNetwork(cfg, draft_to_target=state["draft_to_target"])
    missing, unexpected = net.load_state_dict({k: v.float() if v.is_floating_point() else v
                                               for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return net, extra


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)
        elif isinstance(mod, RMSNorm):
            nn.init.ones_(mod.weight)


class NetworkDrafter(Drafter):
    """What the two network drafters share: the network, its KV cache
    kv[L, 2, B, Hkv, S, D] + cache_lens[B], persistence and the target check."""

    needs_features = True
    kind = ""          # "parallel" / "eagle": recorded in config.json, checked on load
    extra_rows = 0     # cache rows past max_len the drafter writes as scratch

    def __init__(self, net: DraftNetwork, top_m: int = 8, head_dtype: torch.dtype | None = None):
        if net.cfg.parallel != (self.kind == "parallel"):
            raise ValueError(f"net: a {self.kind} drafter needs DraftConfig(parallel="
                             f"{self.kind == 'parallel'}), got parallel={net.cfg.parallel}")
        if head_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"head_dtype: expected None, torch.bfloat16 or torch.float16, got {head_dtype!r}")
        self.net = net
        self.top_m = top_m
        # the head is most of a drafter step's memory traffic (draft vocabulary x hidden); a
        # half-precision copy halves it on a CPU (skinny_linear widens it as it loads). Drafts
        # only: the target's output does not depend on them.
        self.head_dtype = head_dtype
        self._head = None
        self.kv = None
        self.cache_lens = None

    @property
    def depth(self) -> int:
        return self.net.cfg.depth

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """The target layers whose input hidden states the network reads after the last hidden
        state (the peagle layout; the decoding loop gathers them: TargetModel.aux_hidden_states)."""
        return tuple(self.net.cfg.aux_layers or ())

    def reset(self, batch_size: int, max_len: int, device, dtype) -> None:
        cfg = self.net.cfg
        self.net.to(device=device, dtype=dtype).eval()
        self.kv = torch.zeros(cfg.num_layers, 2, batch_size, cfg.num_kv_heads, max_len + self.extra_rows,
                              cfg.head_dim, device=device, dtype=dtype)
        self.cache_lens = torch.zeros(batch_size, dtype=torch.int64, device=device)
        w = self.net.head.weight if self.net.head is not None else self.net.target_head_weight
        low = (self.head_dtype is not None and w.dtype != self.head_dtype and w.device.type == "cpu"
               and native_serves(w.device))
        self._head = w.detach().to(self.head_dtype) if low else None

    def _logits(self, g: torch.Tensor) -> torch.Tensor:
        """Draft logits at inference: the network's head, or its half-precision copy (head_dtype)."""
        if self._head is None:
            return self.net.logits(g)
        return ps_kernels.skinny_linear(g, self._head, backend="cpu", validate=False).float()

    def step(self, tokens: torch.Tensor, features: torch.Tensor, lens: torch.Tensor) -> DraftCandidates:
        self._check_step(tokens, features, lens)
        with torch.no_grad(), skinny_linears(self.net):  # few rows per step: the native kernel
            return self._step(tokens, features, lens)

    def _step(self, tokens, features, lens) -> DraftCandidates:
        raise NotImplementedError

    def _check_step(self, tokens, features, lens):
        if self.kv is None:
            raise RuntimeError("call reset(batch_size, max_len, device, dtype) before step()")
        B = self.kv.shape[2]
        if features is None:
            raise ValueError(f"features: the {self.kind} drafter needs the target's features, got None")
        if tokens.dim() != 2 or tokens.shape[0] != B:
            raise ValueError(f"tokens: expected [B={B}, R], got {tuple(tokens.shape)}")
        width = self.net.cfg.hidden_size + self.net.aux_width
        if features.shape != (*tokens.shape, width):
            what = (f" (the last hidden state and the inputs of target layers {list(self.aux_layers)}, as "
                    "parallelspec.generate gathers them)" if self.aux_layers else "")
            raise ValueError(f"features: expected {(*tokens.shape, width)}{what}, got {tuple(features.shape)}")
        if lens.shape != (B,):
            raise ValueError(f"lens: expected [B={B}], got {tuple(lens.shape)}")

    def _cached_attention(self, cache_lens, new_lens, num_masks):
        # inputs are built here, in range by construction: skip the op's host-syncing checks
        def attend(i, q, k, v):
            return ps_kernels.draft_attention(q, k, v, self.kv[i, 0], self.kv[i, 1], cache_lens, new_lens, num_masks,
                                   validate=False)
        return attend

    def check_target(self, model) -> None:
        check_signature(self.net.cfg.target, model)

    def save_pretrained(self, path, dtype=torch.float16) -> None:
        save_network(path, self.net, self.kind, {"top_m": self.top_m}, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, target=None, top_m: int | None = None, head_dtype: torch.dtype | None = None):
        """Load a saved drafter; with `target`, check it and attach its embedding / head."""
        net, extra = load_network(path, cls.kind)
        drafter = cls(net, top_m=top_m or extra.get("top_m", 8), head_dtype=head_dtype)
        if target is not None:
            drafter.check_target(target)
            net.attach_target(target)
        return drafter


def build_network(target, *, parallel: bool, depth: int = 4, draft_to_target: torch.Tensor | None = None,
                  head: str = "target", num_layers: int = 1, slot1: str = "mask", layout: str = "fused",
                  mask_token_id: int | None = None, aux_layers=None, seed: int = 0) -> DraftNetwork:
    """A freshly initialised network for `target` (random init: it learned faster than a warm
    start from the target's last layer in this project's training runs), target tensors attached.
    layout / mask_token_id / aux_layers: ``DraftConfig`` (eagle3, peagle: the id defaults to the
    target's last one; peagle: the layers default to EAGLE-3's, entering 2, L // 2 and L - 3)."""
    if layout == "peagle" and aux_layers is None:
        aux_layers = list(default_aux_layers(target.config.num_hidden_layers))
    cfg = DraftConfig.for_target(target, depth=depth, head=head, num_layers=num_layers, parallel=parallel,
                                 slot1=slot1, layout=layout, mask_token_id=mask_token_id, aux_layers=aux_layers,
                                 draft_vocab_size=None if draft_to_target is None else int(draft_to_target.numel()))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = DraftNetwork(cfg, draft_to_target)
    init_weights(net)
    for vectors in (net.mask_embed, net.mask_hidden):
        if vectors is not None:
            nn.init.normal_(vectors, std=0.02)
    torch.random.set_rng_state(gen_state)
    net.attach_target(target, init_head=True)
    return net
