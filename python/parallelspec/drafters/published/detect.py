"""Which published format a drafter directory holds, from config.json and the tensor names alone."""
from __future__ import annotations

from .eagle3 import ARCHITECTURES, canonical

FORMATS = ("eagle3", "peagle", "pard")
LOOKED_FOR = ("EAGLE-3 (tensors fc.weight, midlayer.* or layers.N.hidden_norm.weight; architectures "
              f"{', '.join(ARCHITECTURES)}), P-EAGLE (the same plus a mask_hidden tensor), PARD (a causal LM's "
              "model.layers.* tensors and pard_token in config.json), parallelspec's own (\"kind\" in config.json)")


def detect(config: dict, names, where: str = "", arg: str = "drafter") -> str:
    """'eagle3', 'peagle' or 'pard'; a ValueError naming what was looked for otherwise."""
    plain = {canonical(n) for n in names}
    architectures = config.get("architectures") or []
    eagle = ("fc.weight" in plain or any(n.startswith("midlayer.") for n in names)
             or any(n.endswith(".hidden_norm.weight") for n in plain) or any(a in ARCHITECTURES for a in architectures))
    if eagle:
        return "peagle" if "mask_hidden" in plain else "eagle3"
    if config.get("pard_token") is not None and any(n.startswith("model.layers.") for n in names):
        return "pard"
    shown = sorted(names)[:8]
    raise ValueError(f"{arg}: {where} is in no format parallelspec reads: looked for {LOOKED_FOR}; found architectures "
                     f"{architectures}, config keys {sorted(config)[:12]}, tensors {shown}"
                     f"{' ...' if len(names) > 8 else ''}. Pass format= one of {FORMATS} (--drafter-format) if it is "
                     "one of these under other names")
