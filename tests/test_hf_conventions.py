"""transformers' calling conventions and defaults through parallelspec: every result is compared
with what transformers' own generate gives for the same call."""
import pytest
import torch

import parallelspec as ps
from engine_helpers import tiny_model

PROMPT = "t5 t9 t5 t9 t5 t1 t2"


def _word_tokenizer(vocab: int):
    from test_cli import _word_tokenizer as make
    return make(vocab)


@pytest.fixture
def model_and_tok(one_thread):
    return tiny_model("llama", 64), _word_tokenizer(64)


def test_patched_generate_takes_input_ids_keyword_and_tokenizer_output(model_and_tok):
    model, tok = model_and_tok
    enc = tok(PROMPT, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=10, do_sample=False)
    ps.patch(model, ps.NgramDrafter())
    try:
        assert torch.equal(model.generate(enc.input_ids, max_new_tokens=10), ref)
        assert torch.equal(model.generate(input_ids=enc.input_ids, max_new_tokens=10), ref)
        assert torch.equal(model.generate(inputs=enc.input_ids, max_new_tokens=10), ref)
        assert torch.equal(model.generate(**enc, max_new_tokens=10), ref)
        with pytest.raises(ValueError, match="input_ids: expected the prompt once"):
            model.generate(enc.input_ids, input_ids=enc.input_ids)
    finally:
        ps.unpatch(model)


def test_pipeline_through_a_patched_model_gives_transformers_text(model_and_tok):
    from transformers import pipeline
    model, tok = model_and_tok
    prompts = [PROMPT, "t3 t4"]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    ref = pipe(prompts, do_sample=False, max_new_tokens=8)
    calls = []
    ps.patch(model, ps.NgramDrafter(), return_stats=False)
    original = model.generate
    model.generate = lambda *a, **k: calls.append(k) or original(*a, **k)
    try:
        got = pipeline("text-generation", model=model, tokenizer=tok)(prompts, do_sample=False, max_new_tokens=8)
    finally:
        del model.generate
    assert calls and "input_ids" in calls[0]      # the pipeline passes the prompt by keyword
    assert got == ref
    # batched: the pipeline pads the prompts (left, for generation) and passes the mask
    tok.pad_token = "t0"
    ref = pipeline("text-generation", model=model, tokenizer=tok, batch_size=2)(prompts, do_sample=False,
                                                                               max_new_tokens=8)
    ps.patch(model, ps.NgramDrafter())
    try:
        got = pipeline("text-generation", model=model, tokenizer=tok, batch_size=2)(prompts, do_sample=False,
                                                                                   max_new_tokens=8)
    finally:
        ps.unpatch(model)
    assert got == ref


@pytest.mark.parametrize("prompt_len", [5, 25])
def test_default_length_is_transformers(model_and_tok, prompt_len):
    """No max_new_tokens / max_length anywhere: transformers 5 generates 20 *new* tokens (and a
    prompt of more than 20 tokens is fine)."""
    model, _ = model_and_tok
    ids = torch.randint(1, 64, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with pytest.warns(UserWarning):
        ref = model.generate(ids, do_sample=False)
    assert ref.shape[1] == prompt_len + 20
    assert torch.equal(ps.generate(model, ids, ps.NgramDrafter()), ref)
    ps.patch(model, None)
    try:
        assert torch.equal(model.generate(ids), ref)
    finally:
        ps.unpatch(model)


def test_max_length_set_by_the_model_counts_the_total(model_and_tok):
    model, _ = model_and_tok
    model.generation_config.max_length = 12
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    ref = model.generate(ids, do_sample=False)
    assert ref.shape[1] == 12
    assert torch.equal(ps.generate(model, ids, ps.NgramDrafter()), ref)
    with pytest.raises(ValueError):
        model.generate(torch.ones(1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens: expected at least 1 token"):
        ps.generate(model, torch.ones(1, 12, dtype=torch.long))


def test_pad_id_inside_a_prompt_without_mask_runs_as_transformers(model_and_tok):
    """A prompt that contains the pad id (SmolLM2's pad is <|im_end|>, in every chat prompt)
    and no attention mask: transformers masks those tokens out (a mask with holes); so do we,
    instead of calling it bad left padding."""
    model, _ = model_and_tok
    model.generation_config.pad_token_id = 7
    ids = torch.tensor([[3, 9, 7, 11, 12, 7, 5, 6], [4, 4, 4, 7, 8, 9, 10, 11]])
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    for drafter in (None, ps.NgramDrafter()):
        assert torch.equal(ps.generate(model, ids, drafter, max_new_tokens=12), ref)
    # a mask given by the caller must still be left padding
    with pytest.raises(ValueError, match="attention_mask: expected left padding"):
        ps.generate(model, ids, None, attention_mask=ids.ne(7).long(), max_new_tokens=4)


def test_unsupported_generation_config_says_how_to_turn_it_off(model_and_tok):
    model, _ = model_and_tok
    model.generation_config.repetition_penalty = 1.05      # as Qwen2.5-Instruct's generation_config.json
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"repetition_penalty=1.05 is not supported .*generation_config.json.*"
                                         r"pass repetition_penalty=1.0"):
        ps.generate(model, ids, max_new_tokens=4)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    assert torch.equal(ps.generate(model, ids, ps.NgramDrafter(), max_new_tokens=8, repetition_penalty=1.0), ref)


def test_custom_generate_names_the_option_not_the_processor_class(model_and_tok):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
    model, _ = model_and_tok
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"^repetition_penalty=1.2 is not supported .*pass repetition_penalty=1.0"):
        model.generate(ids, custom_generate=ps.custom_generate, max_new_tokens=4, repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"RepetitionPenaltyLogitsProcessor .*generation option 'repetition_penalty'"):
        model.generate(ids, custom_generate=ps.custom_generate, max_new_tokens=4,
                       logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)]))


def test_out_of_vocabulary_ids_are_refused(model_and_tok):
    model, _ = model_and_tok
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in 0..63 .*got \[64, 1000\].*tokenizer"):
        ps.generate(model, torch.tensor([[1, 64, 2, 1000]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        ps.generate(model, torch.tensor([[1, -1]]), max_new_tokens=2)


def test_model_on_meta_device_is_refused():
    model = tiny_model("llama", 64).to("meta")
    with pytest.raises(ValueError, match="model: expected loaded weights, got .* on the 'meta' device"):
        ps.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_first_use_measurement_says_what_it_does_once(tmp_path, monkeypatch, capsys, one_thread):
    """The verify-cost measurement (~20 s on SmolLM2, on a first use) says so on stderr, once per
    process and model; a cached measurement is silent."""
    from parallelspec.trees import verify_cost
    monkeypatch.setenv("PARALLELSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(verify_cost, "_ANNOUNCED", set())
    model = tiny_model("llama", 64)
    first = verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=1)
    err = capsys.readouterr().err
    assert "parallelspec: measuring the target's forward time for 1..2 tokens" in err and str(tmp_path) in err
    assert verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=1) == first      # cached: silent
    verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=1, cache=False)      # announced already
    assert capsys.readouterr().err == ""
