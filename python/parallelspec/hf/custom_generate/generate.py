"""Entry point for transformers' ``custom_generate`` hook given a directory:
``model.generate(ids, custom_generate=parallelspec.CUSTOM_GENERATE_DIR, trust_remote_code=True,
drafter=...)`` loads this file and calls ``generate(model=model, **generate_arguments)`` with
every argument of model.generate."""
from parallelspec.hf.generate import generate as _generate


def generate(model, inputs=None, **kwargs):
    kwargs.pop("synced_gpus", None)  # a single-process loop: nothing to synchronise
    for name in ("assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask",
                 "prefix_allowed_tokens_fn"):
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"{name}: not supported by parallelspec.generate")
    return _generate(model, inputs, **kwargs)
