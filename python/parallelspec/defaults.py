"""What the CLI and the demo load by default: the embedded target and the drafters shipped
with the package (python/parallelspec/assets/)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = {
    "parallel": ASSETS / "smollm2-135m-instruct-parallel",
    "eagle": ASSETS / "smollm2-135m-instruct-eagle",
    # the parallel drafter in vLLM's EAGLE-3 layout (`parallelspec export --format vllm` serves it)
    "parallel-eagle3": ASSETS / "smollm2-135m-instruct-parallel-eagle3",
}
DRAFTER_CHOICES = ("default", "parallel", "eagle", "parallel-eagle3", "ngram", "hybrid", "none")


def load_drafter(spec: str, model, *, ngram_tokens: int | None = None, hybrid_options: dict | None = None,
                 head_dtype="default", format: str | None = None, **published_options):
    """A drafter from a name or a path.

    spec: "none" (plain decoding), "ngram" (prompt lookup), "parallel" / "eagle" /
    "parallel-eagle3" (the shipped drafters for the embedded target; the last in vLLM's EAGLE-3
    layout), "hybrid" (prompt lookup + the shipped parallel drafter
    in one tree; "hybrid:SPEC" with another drafter), "default" (the best measured for the embedded target), or a directory saved
    with ``save_pretrained``. hybrid_options: ``HybridDrafter`` keywords over
    ``HYBRID_OPTIONS``. head_dtype: a network drafter's head copy on a CPU
    (``NetworkDrafter``); "default" = ``HEAD_DTYPE``. ngram_tokens: prompt lookup's longest
    continuation (None = ``NGRAM_TOKENS``).

    Drafters other people publish (EAGLE-3, P-EAGLE, PARD; docs/DRAFTERS.md) load from their
    directory or Hugging Face repo id, their format detected from the files; format= ("eagle3",
    "peagle", "pard") overrides it, and published_options (depth, top_m, aux_layers) go to
    ``parallelspec.drafters.published.load``.
    """
    import torch
    from .drafters import EagleDrafter, HybridDrafter, NgramDrafter, ParallelDrafter

    if spec == "none":
        return None
    ngram_tokens = NGRAM_TOKENS if ngram_tokens is None else ngram_tokens
    if spec == "ngram":
        return NgramDrafter(num_tokens=ngram_tokens)
    if spec == "default":
        spec = DEFAULT_DRAFTER
    if spec == "hybrid" or spec.startswith("hybrid:"):
        inner = spec[len("hybrid:"):] or "parallel"
        source = load_drafter(inner, model, head_dtype=head_dtype, format=format, **published_options)
        return HybridDrafter([NgramDrafter(num_tokens=ngram_tokens), source],
                             **{**HYBRID_OPTIONS, **(hybrid_options or {})})
    path = SHIPPED.get(spec, Path(spec))
    if format is not None or published_options or (spec not in SHIPPED and _published(spec, path)):
        from .drafters.published import load as load_published
        return load_published(spec, model, format=format, **published_options)
    if not path.exists():
        where = f"the shipped '{spec}' drafter at {path}" if spec in SHIPPED else f"{path}"
        raise FileNotFoundError(f"drafter: {where} does not exist; expected one of {DRAFTER_CHOICES} "
                                "or a directory written by save_pretrained")
    config = path / "config.json"
    if not config.exists() and (path / "drafter" / "config.json").exists():
        path, config = path / "drafter", path / "drafter" / "config.json"   # a `parallelspec train --out` run directory
    if not config.exists():
        raise FileNotFoundError(f"drafter: {path} has no config.json (not a saved drafter; `parallelspec train --out "
                                "RUN` saves its drafter in RUN/drafter)")
    import json
    kind = json.loads(config.read_text()).get("kind")
    cls = {"parallel": ParallelDrafter, "eagle": EagleDrafter}.get(kind)
    if cls is None:
        raise ValueError(f"drafter: {config} records kind {kind!r}; expected 'parallel' or 'eagle'")
    head_dtype = HEAD_DTYPE if head_dtype == "default" else head_dtype
    try:
        return cls.from_pretrained(path, target=model,
                                   head_dtype=getattr(torch, head_dtype) if isinstance(head_dtype, str) else head_dtype)
    except ValueError as exc:
        if spec not in SHIPPED:
            raise
        raise ValueError(f"drafter: the shipped '{spec}' drafter is trained for the embedded SmolLM2-135M-Instruct, "
                         f"not this model ({exc}). Use prompt lookup (--drafter ngram / load_drafter('ngram', "
                         "model)), no drafter ('none'), or train one for your model: parallelspec extract, then "
                         "parallelspec train (docs/TRAINING.md), and pass its run directory") from None


def _published(spec: str, path: Path) -> bool:
    """A directory whose config.json parallelspec did not write, or a Hugging Face repo id."""
    import json
    config = path / "config.json"
    if config.is_file():
        try:
            return "kind" not in json.loads(config.read_text())
        except ValueError:
            return True     # the published loader says what is wrong with it
    parts = spec.split("/")
    return not path.exists() and len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


#: the fastest method of the end-to-end benchmark on the embedded target (benchmarks/results/README.md)
DEFAULT_DRAFTER = "hybrid"
#: HybridDrafter options of the "hybrid" drafter: the parallel drafter sits out a step when
#: prompt lookup matched a 3-gram (same accepted tokens, less drafting time); the measurements
#: behind it are in benchmarks/results/variants/README.md
HYBRID_OPTIONS = {"defer_on_match": 3}
#: prompt lookup's longest continuation ("ngram" and "hybrid"): the tree='auto' builder keeps only
#: the nodes worth their verify cost, so a long continuation costs nothing when it is not taken
#: (benchmarks/results/variants/README.md, "Prompt lookup's continuation length")
NGRAM_TOKENS = 12
#: network drafters keep a bf16 copy of their head on a CPU: half the bytes of a drafter step's
#: largest read (benchmarks/results/variants/README.md)
HEAD_DTYPE = "bfloat16"
