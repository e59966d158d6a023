"""A drop-in generate() for transformers causal LMs, and the ways to plug it into model.generate.

    out = parallelspec.generate(model, input_ids, drafter, attention_mask=mask, max_new_tokens=64)

takes transformers' usual generation arguments with the same meanings (the model's own
generation_config supplies the defaults, exactly as model.generate resolves them) and returns
the same things: a tensor of prompt + new tokens, or a GenerateDecoderOnlyOutput with
``return_dict_in_generate=True``. Options it cannot honour losslessly raise a ValueError naming
the option.

Three ways in:
- ``parallelspec.generate(model, ...)``;
- ``parallelspec.patch(model, drafter, **options)``: ``model.generate`` runs ours until
  ``parallelspec.unpatch(model)``;
- transformers' ``custom_generate`` hook: ``model.generate(ids, custom_generate=
  parallelspec.custom_generate, drafter=d, ...)`` (a callable: transformers prepares the
  generation config, logits processors and stopping criteria and hands them over), or
  ``custom_generate=parallelspec.CUSTOM_GENERATE_DIR, trust_remote_code=True`` (a local
  directory holding ``custom_generate/generate.py``, which calls ``generate`` below).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..drafters.base import Drafter
from ..drafters.hybrid import HybridDrafter
from ..engine import DecodeSettings, GenerationStats, decode
from ..capture import check_options as check_cuda_graph
from ..compiled import check_options as check_compile
from .. import hugepages
from .target import TargetModel
from ..sampling import SamplingParams
from ..trees import TreeBuilder, make_tree_builder

#: pass as model.generate(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, drafter=...)
CUSTOM_GENERATE_DIR = str(Path(__file__).resolve().parent)

# Generation options whose non-default values change the output in ways the loop does not
# reproduce, and the value that turns each off (None is off for all of them)
UNSUPPORTED_OPTIONS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "dola_layers": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": 0,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "exponential_decay_length_penalty": None,
    "guidance_scale": 1.0,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
    "token_healing": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "prompt_lookup_num_tokens": None,
    "cache_implementation": None,
}
# the logits processors transformers builds from those options: the option to name in errors
_PROCESSOR_OPTIONS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "MinLengthLogitsProcessor": "min_length",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "MinPLogitsWarper": "min_p",
    "TopHLogitsWarper": "top_h",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}


def unsupported_options(config) -> dict:
    """{name: value} of the options set in a GenerationConfig that parallelspec.generate refuses."""
    out = {}
    for name, off in UNSUPPORTED_OPTIONS.items():
        value = getattr(config, name, None)
        if value is not None and value != off and not (off in (0, False) and not value):
            out[name] = value
    return out


# model_kwargs that transformers' generate builds itself and we may receive through custom_generate
_IGNORED_MODEL_KWARGS = ("use_cache", "position_ids", "cache", "past_key_values", "logits_to_keep")


def generate(model, input_ids: torch.Tensor | None = None, drafter: Drafter | list[Drafter] | None = None,
             attention_mask: torch.Tensor | None = None, generation_config=None, *,
             tree: str | TreeBuilder = "auto", tree_depth: int | None = None, tree_nodes: int | None = None,
             tree_choices=None, return_stats: bool = False, stopping_criteria=None, streamer=None,
             logits_processor=None, cuda_graph: bool = False, compile: bool | None = None, **kwargs):
    """Speculative decoding with `drafter` (None = plain decoding through the same loop).

    Args:
        model: a transformers causal LM of a model type in ``parallelspec.hf.ARCHITECTURES`` (Llama, Qwen,
            Mistral, Gemma, Phi, Granite, OLMo, SmolLM3, gpt-oss, Cohere families; docs/MODELS.md).
        input_ids: [B, T] prompts, left-padded when B > 1 (``inputs=`` / ``input_ids=`` as keywords too).
        drafter: a parallelspec Drafter built for this model, a list of them (composed into one
            ``HybridDrafter``: every source's candidates in one tree), or None.
        attention_mask: [B, T] 1 = token, 0 = left padding (inferred from pad_token_id like
            transformers when omitted).
        generation_config / kwargs: max_new_tokens, max_length, do_sample, temperature, top_k,
            top_p, eos_token_id, pad_token_id, return_dict_in_generate, as in transformers (with no
            max_new_tokens / max_length anywhere: 20 new tokens, as transformers 5). Options it
            cannot honour (``UNSUPPORTED_OPTIONS``, e.g. repetition_penalty) raise a ValueError
            saying which value turns each off.
        stopping_criteria: extra transformers StoppingCriteria, checked token by token.
        streamer: a transformers streamer (batch size 1, as theirs).
        tree: "auto" (``AutoTree``: every source's candidates in one tree, sized by this
            machine's measured verify cost, up to ``tree_nodes`` nodes; measured once and cached),
            "chain" (top-1 per depth), "static" (``tree_choices`` paths), "dynamic"
            (``tree_nodes`` best paths incl. the root, up to ``tree_depth``) or a TreeBuilder.
        return_stats: also return a GenerationStats (accepted lengths, steps, times).
        cuda_graph: capture the verify step (the target's pass over the tree, tree_accept, the
            commit) in a CUDA graph per tree-size bucket and replay it each step (parallelspec.capture);
            a model on a CUDA device and greedy decoding only, no streamer or stopping criteria
            (a ValueError names what is missing). Off by default until measured faster on a GPU.
        compile: on the CPU, run the target's pass over the tree compiled with torch.compile, once
            per tree-size bucket (parallelspec.compiled; the artifacts are cached per machine, so a
            later process loads them). True: from each shape's first step. None (default): once the
            time this process spent on a shape eagerly has paid for compiling it (parallelspec.compiled.
            Ledger; says so in one line). False: eager. A compile failure falls back to eager with one
            warning; the output is the same either way.

    On the CPU (Linux), once this process's calls on the model have paid for it, a call starts by
    moving the model's weights into 2 MiB pages (parallelspec.hugepages: same Parameter objects and
    values; ``PARALLELSPEC_HUGE_PAGES=0`` turns it off).

    Returns: [B, T + G] prompt + new tokens (or GenerateDecoderOnlyOutput), and the stats when
    return_stats.
    """
    input_ids = _one_prompt(input_ids, kwargs)
    if logits_processor:
        raise ValueError(f"logits_processor: custom logits processors are not supported, got {list(logits_processor)}")
    target = TargetModel(model)
    _check_weights(model)
    # transformers' rule: with no max_length anywhere, the default 20 counts new tokens, not the total
    default_length = (kwargs.get("max_length") is None and getattr(generation_config, "max_length", None) is None
                      and getattr(model.generation_config, "max_length", None) is None)
    config, extra = _resolve_config(model, generation_config, kwargs)
    unknown = sorted(k for k, v in extra.items() if k not in _IGNORED_MODEL_KWARGS and v is not None)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a generation option parallelspec.generate supports "
                         f"(unsupported arguments: {unknown})")
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask, config, target)
    settings, pad = _settings(config, input_ids, stopping_criteria, streamer, default_length, target.max_positions)
    target.check_length(int(attention_mask.sum(dim=1).max()), input_ids.shape[1] + settings.max_new_tokens)
    check_cuda_graph(cuda_graph, target.device, settings)   # before tree="auto" measures anything
    check_compile(compile, target.device, cuda_graph)
    drafter = as_drafter(drafter, model)
    with hugepages.serving(model):   # on the CPU, the weights in 2 MiB pages before anything runs
        # without a drafter the tree is the root alone whatever was asked: nothing to measure
        builder = make_tree_builder(tree, depth=tree_depth, nodes=tree_nodes, choices=tree_choices,
                                    model=model) if drafter is not None or tree != "auto" else None
        stats = GenerationStats() if return_stats else None
        # masked-out tokens inside a prompt (a pad id that is not padding, with no mask given: transformers
        # infers a mask with holes) are left out of the run, as transformers' attention leaves them out;
        # the output keeps them, as transformers' does (streamers and stopping criteria see the prompt
        # with them moved to its left)
        run_ids, run_mask = _without_holes(input_ids, attention_mask, pad)
        new_tokens = decode(target, run_ids, run_mask, drafter, builder, settings, stats, pad, cuda_graph, compile)
    sequences = torch.cat([input_ids, new_tokens], dim=1)
    result = sequences
    if config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput
        result = GenerateDecoderOnlyOutput(sequences=sequences)
    return (result, stats) if return_stats else result


def _one_prompt(input_ids, kwargs: dict):
    """The prompt given positionally, as ``inputs=`` or as ``input_ids=`` (transformers' and its
    pipelines' ways of calling generate), exactly once."""
    given = {name: kwargs.pop(name) for name in ("inputs", "input_ids") if kwargs.get(name) is not None}
    if input_ids is not None:
        given = {"the first argument": input_ids, **given}
    if len(given) > 1:
        raise ValueError(f"input_ids: expected the prompt once, got it as {' and as '.join(given)}")
    if not given:
        raise ValueError("input_ids: expected a [batch, length] tensor of prompt token ids, got None")
    return next(iter(given.values()))


def _check_weights(model) -> None:
    """A model whose weights are not loaded (``meta`` tensors: from_pretrained with
    device_map / low_cpu_mem_usage halfway, or init_empty_weights) cannot run."""
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"model: expected loaded weights, got {meta} on the 'meta' device (no data); load the "
                         "model fully, e.g. from_pretrained(path) without device_map, or model.to_empty() and "
                         "load_state_dict(...)")


def _without_holes(input_ids: torch.Tensor, mask: torch.Tensor, pad: int):
    """(ids, mask) with every row's masked tokens moved to its left as padding: a prompt whose
    mask has zeros after a one runs as its unmasked tokens alone (what attention sees in
    transformers, with positions counted over the unmasked tokens). Left-padded prompts are
    returned as they are."""
    if not bool((mask[:, 1:] < mask[:, :-1]).any()):
        return input_ids, mask
    order = torch.sort(mask, dim=1, stable=True).indices     # zeros first, tokens in their order
    ids = input_ids.gather(1, order)
    sorted_mask = mask.gather(1, order)
    return ids.masked_fill(sorted_mask == 0, pad), sorted_mask


def _resolve_config(model, generation_config, kwargs: dict):
    """transformers' own resolution (argument > generation_config > model.generation_config >
    global defaults); returns (config, leftover kwargs)."""
    config, extra = model._prepare_generation_config(generation_config, **kwargs)
    refused = unsupported_options(config)
    if refused:
        name, value = next(iter(refused.items()))
        source = ("passed to generate" if name in kwargs else "set by the generation_config passed"
                  if getattr(generation_config, name, None) == value else
                  "set by the model's generation_config, i.e. its generation_config.json")
        raise ValueError(_refusal(name, value, source, refused))
    return config, extra


def _refusal(name: str, value, source: str, refused: dict) -> str:
    off = UNSUPPORTED_OPTIONS[name]
    return (f"{name}={value!r} is not supported by parallelspec.generate ({source}; only greedy decoding and "
            f"sampling with temperature/top_k/top_p are, the output would differ from transformers'). To decode "
            f"without it, pass {name}={off!r} (or set model.generation_config.{name} = {off!r}); unsupported "
            f"options set here: {refused}")


def _check_inputs(input_ids, attention_mask, config, target: TargetModel):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        got = (f"shape {tuple(input_ids.shape)} dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids: expected an int64 tensor [batch, length], got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty prompt per sequence, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device=target.device, dtype=torch.int64)
    vocab = target.vocab_size
    if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
        raise ValueError(f"input_ids: expected token ids in 0..{vocab - 1} (the model's vocab_size = {vocab}), got "
                         f"{sorted(set(bad.tolist()))[:8]}; was the prompt encoded with this model's tokenizer?")
    inferred = attention_mask is None
    if inferred:
        pad, eos = config.pad_token_id, _as_list(config.eos_token_id)
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):  # transformers' inference rule
            attention_mask = input_ids.ne(pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.int64)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask: expected only 0 (padding) and 1 (token) entries")
    if not inferred and bool((mask[:, 1:] < mask[:, :-1]).any()):
        b = int((mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask: expected left padding (zeros, then ones), got row {b} = {mask[b].tolist()}; "
                         "use tokenizer.padding_side = 'left'")
    if bool((mask.sum(dim=1) == 0).any()):
        b = int((mask.sum(dim=1) == 0).nonzero()[0])
        raise ValueError(f"input_ids: sequence {b} is empty (its attention_mask row is all zeros)")
    return input_ids, mask


def _as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    return [int(t) for t in token_ids] if isinstance(token_ids, (list, tuple)) else [int(token_ids)]


def _settings(config, input_ids: torch.Tensor, stopping_criteria, streamer, default_length: bool = False,
              max_positions: int | None = None) -> tuple[DecodeSettings, int]:
    T = input_ids.shape[1]
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
        what = f"max_new_tokens={max_new}"
    elif default_length:        # transformers: the default max_length (20) new tokens, within the model's positions
        total = config.max_length + T if max_positions is None else min(config.max_length + T, max_positions)
        max_new = total - T
        what = (f"the default max_length={config.max_length} new tokens with a prompt of {T} columns and "
                f"max_position_embeddings={max_positions}")
    else:
        max_new = config.max_length - T
        what = f"max_length={config.max_length} with a prompt of {T} columns"
    if max_new < 1:
        raise ValueError(f"max_new_tokens: expected at least 1 token to generate, got {what}")
    sampling = SamplingParams(do_sample=bool(config.do_sample), temperature=config.temperature,
                              top_k=config.top_k, top_p=config.top_p)
    eos = _as_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"streamer: transformers streamers take batch size 1, got a batch of {input_ids.shape[0]}")
    criteria = [c for c in (stopping_criteria or []) if not _is_builtin_criterion(c)]
    return DecodeSettings(max_new, sampling, tuple(eos), criteria, streamer), int(pad)


def _is_builtin_criterion(criterion) -> bool:
    """The criteria transformers derives from the generation config (handled by the loop itself)."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    return isinstance(criterion, (EosTokenCriteria, MaxLengthCriteria))


# -- plugging into model.generate -------------------------------------------------------------

def custom_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                    synced_gpus=False, streamer=None, drafter: Drafter | list[Drafter] | None = None, tree="auto",
                    tree_depth=None, tree_nodes=None, tree_choices=None, **model_kwargs):
    """For ``model.generate(ids, custom_generate=parallelspec.custom_generate, drafter=d, ...)``.

    transformers has resolved the generation config and built the logits processors from it;
    only the warpers we apply ourselves (temperature, top-k, top-p) may be among them."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if generation_config is not None:   # name the option behind a processor, as generate() does
        refused = unsupported_options(generation_config)
        if refused:
            name, value = next(iter(refused.items()))
            raise ValueError(_refusal(name, value, "in the generation config transformers resolved: the model's "
                                      "generation_config.json or this call's options", refused))
    own = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    extra = [type(p).__name__ for p in (logits_processor or []) if not isinstance(p, own)]
    if extra:
        option = _PROCESSOR_OPTIONS.get(extra[0])
        hint = (f"it is what the generation option {option!r} makes, which parallelspec does not support either; "
                f"leave both out" if option else "parallelspec supports no logits processors besides temperature, "
                "top_k and top_p (give those as options)")
        raise ValueError(f"logits_processor: {extra[0]} is not supported by parallelspec.custom_generate; {hint} "
                         f"(unsupported processors: {extra})")
    attention_mask = model_kwargs.pop("attention_mask", None)
    return generate(model, input_ids, drafter, attention_mask, generation_config, tree=tree, tree_depth=tree_depth,
                    tree_nodes=tree_nodes, tree_choices=tree_choices, stopping_criteria=stopping_criteria,
                    streamer=streamer, **model_kwargs)


def as_drafter(drafter, model) -> Drafter | None:
    """generate()'s `drafter` argument checked against `model`: a Drafter, None, or a list /
    tuple of Drafters composed into one ``HybridDrafter`` (all their candidates in one tree)."""
    if isinstance(drafter, (list, tuple)):
        if not drafter or not all(isinstance(d, Drafter) for d in drafter):
            raise TypeError(f"drafter: expected a non-empty list of parallelspec Drafters, got "
                            f"{[type(d).__name__ for d in drafter]}")
        drafter = HybridDrafter(list(drafter))
    if drafter is not None:
        if not isinstance(drafter, Drafter):
            raise TypeError(f"drafter: expected a parallelspec Drafter, a list of them, or None, got "
                            f"{type(drafter).__name__}")
        drafter.check_target(model)
    return drafter


def patch(model, drafter: Drafter | list[Drafter] | None = None, **options) -> None:
    """Make ``model.generate(...)`` run parallelspec.generate with this drafter and options
    (per-call arguments override them) until ``unpatch(model)``."""
    drafter = as_drafter(drafter, model)
    TargetModel(model)  # refuse unsupported architectures now, not at the first call

    @functools.wraps(type(model).generate)
    def patched_generate(inputs=None, generation_config=None, **kwargs):
        merged = {"drafter": drafter, **options, **kwargs}
        if inputs is not None:      # the prompt may come as input_ids= instead (pipelines, **tokenizer(...))
            merged["inputs"] = inputs
        return generate(model, generation_config=generation_config, **merged)

    patched_generate._parallelspec_patch = True
    model.generate = patched_generate


def unpatch(model) -> None:
    """Undo patch(model); a model that is not patched is left as it is."""
    if getattr(model.__dict__.get("generate"), "_parallelspec_patch", False):
        del model.generate
