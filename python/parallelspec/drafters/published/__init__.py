"""Drafters other people publish, loaded as they write them (docs/DRAFTERS.md):

* ``eagle3``: EAGLE-3 heads (SafeAILab/EAGLE, SpecForge, AngelSlim files), k sequential passes;
* ``peagle``: P-EAGLE heads (SpecForge's PEagleDraftModel, vLLM's parallel drafting), k tokens
  in one pass;
* ``pard``: PARD draft models (AMD), a small causal LM with a pard token, k tokens in one pass.

``load(source, model)`` resolves a directory or a Hugging Face repo id, detects the format from
config.json and the tensor names (``format=`` overrides it), checks the drafter against the target
and returns a Drafter the decoding loop runs as any other (trees, hybrid with prompt lookup).
"""
from __future__ import annotations

from .detect import FORMATS, detect
from .eagle3 import Eagle3Drafter, PEagleDrafter, default_aux_layers
from .files import read_config, read_tensors, resolve, tensor_names, weight_files
from .pard import PardDrafter

__all__ = ["FORMATS", "Eagle3Drafter", "PEagleDrafter", "PardDrafter", "default_aux_layers", "detect", "load",
           "is_published"]


def is_published(config: dict) -> bool:
    """A config.json parallelspec's own save_pretrained did not write (it records "kind")."""
    return "kind" not in config


def load(source, model, *, format: str | None = None, depth: int | None = None, top_m: int = 8,
         aux_layers=None, arg: str = "drafter"):
    """A published drafter for `model` from a directory or a repo id.

    format: None (detected), "eagle3", "peagle" or "pard". depth: tokens drafted a step (k;
    default 4). top_m: candidates per depth. aux_layers: the EAGLE-3 target layers whose input
    hidden states the head reads (vLLM's numbering), overriding the config and the default."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected None (detect) or one of {FORMATS}, got {format!r}")
    path = resolve(source, arg)
    config = read_config(path, arg)
    files = weight_files(path, arg)
    # safetensors: the names first, cheaply (a directory in no known format is refused before any
    # tensor is read); .bin files are read once, names and tensors together
    state = None if all(f.suffix == ".safetensors" for f in files) else read_tensors(files, arg)
    names = tensor_names(files, arg) if state is None else list(state)
    kind = format or detect(config, names, str(path), arg)
    state = read_tensors(files, arg) if state is None else state
    if kind == "pard":
        from .pard import load_pard
        drafter = load_pard(path, config, state, model, depth=depth, top_m=top_m, arg=arg)
    else:
        from .eagle3 import load_head
        drafter = load_head(config, state, model, parallel=kind == "peagle", source=f"{path}: ", depth=depth,
                            top_m=top_m, aux_layers=aux_layers, arg=arg)
    drafter.format = kind
    drafter.check_target(model)
    return drafter
