"""A drafter network's configuration and its files: ``DraftConfig``, the target it was made for
(``target_signature``: architecture and a weight fingerprint, checked on load) and the
safetensors + config.json pair ``save_pretrained`` writes (``write_checkpoint`` / ``read_checkpoint``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Rows of the target's embedding whose argmax columns fingerprint its weights (robust to the
# dtype the target is loaded in; tells e.g. a base model from its instruct variant).
_FINGERPRINT_ROWS = 32


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's choice (EAGLE's modeling_*_kv.py, vLLM): the hidden states entering decoder layers
    2, L // 2 and L - 3 (= the outputs of layers 1, L // 2 - 1 and L - 4)."""
    return (2, num_layers // 2, num_layers - 3)


#: the network layouts (DraftConfig.layout; drafters/network.py draws them)
LAYOUTS = ("fused", "eagle3", "peagle")


@dataclass
class DraftConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                      # the target's vocabulary
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    num_layers: int = 1
    depth: int = 4                       # k: tokens drafted per step
    head: str = "target"                 # "target" (frozen, not stored) or "trained"
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    parallel: bool = True                # mask slots (ParallelDrafter) or autoregressive (EagleDrafter)
    # ParallelDrafter only: what mask slot 1 is fed. "mask": its learned vector (one pass per step,
    # ParallelSpec as published); "draft": the depth-1 top-1 token with the drafter's own output
    # feature (EAGLE's second step) plus that vector, in a second pass with the other slots, so
    # depths 2..k are conditioned on the drafted token (two passes per step instead of k).
    slot1: str = "mask"
    # "fused": fc([e; f]) into layer 0, one learned vector per mask slot (the default);
    # "eagle3": vLLM's EAGLE-3 layer 0 over [input_norm(e); hidden_norm(f)], residual f, one shared
    # mask_hidden and mask token id for every slot (what `parallelspec export --format vllm` writes);
    # "peagle": the eagle3 layer fed EAGLE-3's features, f = fc([a_1; ...; a_n]) over the hidden
    # states entering the target layers `aux_layers`, mask_hidden in the fc's input space (P-EAGLE)
    layout: str = "fused"
    mask_token_id: int | None = None     # eagle3 / peagle: the token id fed to every mask slot
    aux_layers: list | None = None       # peagle: target layers whose input hidden states are read
    target: dict = field(default_factory=dict)   # what check_target compares (target_signature)

    @property
    def mask_slots(self) -> int:
        """Learned mask-slot vectors the network holds (the parallel drafter's k - 1)."""
        return self.depth - 1 if self.parallel else 0

    def __post_init__(self):
        if self.head not in ("target", "trained"):
            raise ValueError(f"head: expected 'target' or 'trained', got {self.head!r}")
        if self.slot1 not in ("mask", "draft"):
            raise ValueError(f"slot1: expected 'mask' or 'draft', got {self.slot1!r}")
        if self.slot1 == "draft" and (not self.parallel or self.depth < 2):
            raise ValueError(f"slot1='draft' needs a parallel drafter with depth >= 2, got "
                             f"parallel={self.parallel}, depth={self.depth}")
        if self.depth < 1:
            raise ValueError(f"depth: expected >= 1, got {self.depth}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}")
        if self.layout == "peagle":
            if not self.aux_layers or any(not isinstance(i, int) or i < 0 for i in self.aux_layers):
                raise ValueError(f"aux_layers: layout='peagle' reads the hidden states entering some target layers: "
                                 f"expected a non-empty list of layer indices, got {self.aux_layers!r}")
            self.aux_layers = [int(i) for i in self.aux_layers]
        elif self.aux_layers:
            raise ValueError(f"aux_layers: only layout='peagle' reads auxiliary hidden states, got "
                             f"{self.aux_layers} with layout={self.layout!r}")
        if self.layout in ("eagle3", "peagle"):
            if not self.parallel or self.slot1 != "mask":
                raise ValueError(f"layout={self.layout!r} is vLLM's parallel drafting: expected parallel=True, "
                                 f"slot1='mask', got parallel={self.parallel}, slot1={self.slot1!r}")
            if self.mask_token_id is None:
                self.mask_token_id = self.vocab_size - 1
            if not 0 <= self.mask_token_id < self.vocab_size:
                raise ValueError(f"mask_token_id: expected a target id in [0, {self.vocab_size}), "
                                 f"got {self.mask_token_id}")
        elif self.mask_token_id is not None:
            raise ValueError(f"mask_token_id: only layouts 'eagle3' and 'peagle' have one, got {self.mask_token_id} "
                             f"with layout={self.layout!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, "
                             f"got {self.num_heads}")

    @classmethod
    def for_target(cls, model, **overrides) -> "DraftConfig":
        """Architecture copied from a HF causal LM (Llama family) and its signature recorded."""
        c = model.config
        fields = dict(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
            rope_theta=_rope_theta(c), target=target_signature(model),
            rms_norm_eps=getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", None) or 1e-5)
        fields.update(overrides)
        return cls(**fields)


def _rope_theta(config) -> float:
    """The target's RoPE base: the drafter's own RoPE is the default one at this base whatever the
    target's scaling (llama3, YaRN, longrope: the drafter is trained with its own positions)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = params.get("full_attention", params)   # per layer type (Gemma 3): the global layers'
    return float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def target_signature(model) -> dict:
    """What a drafter remembers about its target: architecture and a weight fingerprint."""
    c = model.config
    emb = model.get_input_embeddings().weight.detach()
    rows = torch.linspace(0, emb.shape[0] - 1, _FINGERPRINT_ROWS).long()
    fingerprint = emb[rows.to(emb.device)].float().argmax(dim=1).tolist()
    return {
        "name": Path(str(getattr(c, "_name_or_path", "") or "")).name or getattr(c, "model_type", ""),
        "model_type": getattr(c, "model_type", ""),
        "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "rope_theta": _rope_theta(c),
        "embedding_fingerprint": hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16],
        "embedding_argmax": fingerprint,
    }


def check_signature(expected: dict, model) -> None:
    got = target_signature(model)
    keys = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rope_theta")
    bad = [f"{k}: expected {expected[k]!r}, got {got[k]!r}" for k in keys if k in expected and expected[k] != got[k]]
    if not bad and "embedding_argmax" in expected:
        # a few argmax flips are rounding (bf16 vs fp32 target); a different model flips most
        same = sum(a == b for a, b in zip(expected["embedding_argmax"], got["embedding_argmax"]))
        if same < 0.75 * len(expected["embedding_argmax"]):
            bad.append(f"embedding fingerprint: expected {expected.get('embedding_fingerprint')}, "
                       f"got {got['embedding_fingerprint']} ({same}/{len(got['embedding_argmax'])} rows agree)")
    if bad:
        raise ValueError(f"drafter was built for target {expected.get('name', '?')!r}, which this model "
                         f"({got['name']!r}) is not: " + "; ".join(bad))


def write_checkpoint(path, cfg: DraftConfig, state: dict, kind: str, extra: dict | None = None,
                     dtype=torch.float16) -> None:
    """safetensors weights (floating tensors in `dtype`) + config.json (kind, the config, extra)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path / WEIGHTS_NAME))
    meta = {"kind": kind, **asdict(cfg), **(extra or {})}
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")


def read_checkpoint(path, kind: str) -> tuple[DraftConfig, dict, dict]:
    """(config, state dict as stored, the extra config entries) of write_checkpoint's files."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{path}: expected a {kind!r} drafter, got {meta.get('kind')!r}")
    cfg_fields = set(DraftConfig.__dataclass_fields__)
    cfg = DraftConfig(**{k: v for k, v in meta.items() if k in cfg_fields})
    extra = {k: v for k, v in meta.items() if k not in cfg_fields and k != "kind"}
    return cfg, load_file(str(path / WEIGHTS_NAME)), extra
