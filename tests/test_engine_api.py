"""parallelspec.generate as a drop-in for model.generate: return types, patch/unpatch, the
custom_generate hook, streamers and stopping criteria, and clear errors for what it refuses."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import parallelspec as ps
from engine_helpers import OracleDrafter, hf_greedy, left_padded, tiny_model, unpadded_rows

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", VOCAB)


@pytest.fixture(scope="module")
def prompts():
    return left_padded([6, 3], VOCAB)


def test_return_dict_and_stats(model, prompts):
    ids, mask = prompts
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               return_dict_in_generate=True)
    out, stats = ps.generate(model, ids, ps.NgramDrafter(), attention_mask=mask, max_new_tokens=5,
                             return_dict_in_generate=True, return_stats=True)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    torch.testing.assert_close(out.sequences, reference.sequences, rtol=0, atol=0)
    assert stats.steps >= 1 and stats.new_tokens == 10 and stats.mean_accepted >= 1.0
    assert set(stats.as_dict()) >= {"mean_accepted", "accept_histogram", "steps", "draft_time", "verify_time"}


def test_generation_config_and_model_defaults(model, prompts):
    from transformers import GenerationConfig

    ids, mask = prompts
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    reference = model.generate(ids, attention_mask=mask, generation_config=config)
    torch.testing.assert_close(ps.generate(model, ids, attention_mask=mask, generation_config=config), reference)


def test_attention_mask_inferred_from_pad_token(model, prompts):
    ids, mask = prompts
    reference = hf_greedy(model, ids, None, 5, pad_token_id=0)
    torch.testing.assert_close(ps.generate(model, ids, max_new_tokens=5, pad_token_id=0), reference)
    torch.testing.assert_close(reference, hf_greedy(model, ids, mask, 5, pad_token_id=0))


def test_patch_and_unpatch(model, prompts):
    ids, mask = prompts
    reference = hf_greedy(model, ids, mask, 6)
    ps.patch(model, ps.NgramDrafter(), tree="dynamic", tree_nodes=6)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
        assert model.generate.__name__ == "generate"
    finally:
        ps.unpatch(model)
    torch.testing.assert_close(out, reference)
    assert "generate" not in model.__dict__
    assert model.config._attn_implementation != "parallelspec"  # restored after each call


def test_custom_generate_callable(model, prompts):
    ids, mask = prompts
    reference = hf_greedy(model, ids, mask, 6)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         custom_generate=ps.custom_generate, drafter=ps.NgramDrafter(), tree="static")
    torch.testing.assert_close(out, reference)


def test_custom_generate_directory(model, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))  # transformers copies the file there
    ids, mask = prompts
    reference = hf_greedy(model, ids, mask, 4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=ps.CUSTOM_GENERATE_DIR,
                         trust_remote_code=True, drafter=ps.NgramDrafter())
    torch.testing.assert_close(out, reference)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_every_new_token(model):
    ids, _ = left_padded([5], VOCAB)
    reference = hf_greedy(model, ids, None, 8)
    streamer = _Collect()
    out = ps.generate(model, ids, ps.NgramDrafter(), max_new_tokens=8, streamer=streamer)
    torch.testing.assert_close(out, reference)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == reference[0, 5:].tolist()


class _StopAfterToken(StoppingCriteria):
    def __init__(self, *tokens):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.tokens.to(input_ids.device))


@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos"])
def test_stopping_criteria_token_by_token(model, prompts, with_eos):
    """A criterion firing for each sequence at a different step, checked on every sequence: without
    an EOS transformers goes on generating a stopped sequence until the last one stops (the batch
    ends there); with an EOS it pads the stopped ones. Both are its output token for token."""
    ids, mask = prompts
    free = hf_greedy(model, ids, mask, 10)
    T = ids.shape[1]
    first = int(free[0, T + 2])      # sequence 0 stops at its 3rd new token, sequence 1 later:
    later = next(p for p in range(T + 4, T + 10) if int(free[1, p]) not in free[1, T:p].tolist() + [first]
                 and int(free[1, p]) not in free[0, T:T + 3].tolist() and first not in free[1, T:p].tolist())
    stop = _StopAfterToken(first, int(free[1, later]))
    unused = int(torch.isin(torch.arange(VOCAB), free).logical_not().nonzero()[0])   # an EOS never generated
    eos = {"eos_token_id": unused} if with_eos else {}
    reference = hf_greedy(model, ids, mask, 10, stopping_criteria=StoppingCriteriaList([stop]), pad_token_id=0, **eos)
    assert reference.shape[1] == later + 1      # the batch ended at sequence 1's stop
    sequences = [free[b, ids.shape[1] - int(mask[b].sum()):].tolist() for b in range(2)]
    out = ps.generate(model, ids, OracleDrafter(sequences, VOCAB, p_true=1.0), attention_mask=mask,
                      max_new_tokens=10, stopping_criteria=StoppingCriteriaList([stop]), pad_token_id=0, **eos)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


# -- refusals -------------------------------------------------------------------------------

def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="input_ids: expected a non-empty prompt"):
        ps.generate(model, torch.zeros(1, 0, dtype=torch.int64), max_new_tokens=2)
    ids, mask = left_padded([3, 2], VOCAB)
    mask[1] = 0
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        ps.generate(model, ids, attention_mask=mask, max_new_tokens=2)


def test_bad_attention_mask_is_refused(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match=r"attention_mask: expected the shape of input_ids \(2, 6\), got \(2, 5\)"):
        ps.generate(model, ids, attention_mask=mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask: expected left padding"):
        ps.generate(model, ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask: expected only 0"):
        ps.generate(model, ids, attention_mask=mask * 2, max_new_tokens=2)


def test_too_long_for_the_model_is_refused(model):
    ids = torch.randint(0, VOCAB, (1, 300))
    with pytest.raises(ValueError, match="input_ids: the prompt has 300 tokens, more than the model's "
                                         "max_position_embeddings = 256"):
        ps.generate(model, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens: prompt \\+ new tokens = 260 exceed"):
        ps.generate(model, ids[:, :200], max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens: expected at least 1 token"):
        ps.generate(model, ids[:, :30], max_length=20)


@pytest.mark.parametrize("option, value", [("num_beams", 2), ("repetition_penalty", 1.2), ("num_return_sequences", 2),
                                           ("min_new_tokens", 3), ("output_scores", True), ("stop_strings", "x")])
def test_unsupported_generation_options_are_named(model, prompts, option, value):
    ids, mask = prompts
    # (transformers' own config validation may refuse first; either way the option is named)
    with pytest.raises(ValueError, match=option):
        ps.generate(model, ids, attention_mask=mask, max_new_tokens=2, **{option: value})


def test_unknown_argument_and_logits_processor_are_refused(model, prompts):
    from transformers.generation.logits_process import LogitsProcessorList, MinLengthLogitsProcessor

    ids, mask = prompts
    with pytest.raises(ValueError, match="frobnicate: not a generation option"):
        ps.generate(model, ids, attention_mask=mask, max_new_tokens=2, frobnicate=1)
    with pytest.raises(ValueError, match="logits_processor: custom logits processors are not supported"):
        ps.generate(model, ids, attention_mask=mask, max_new_tokens=2,
                    logits_processor=LogitsProcessorList([MinLengthLogitsProcessor(3, 0)]))


def test_beam_search_through_custom_generate_is_refused(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2, custom_generate=ps.custom_generate)


def test_wrong_drafter_is_refused(model, prompts):
    ids, mask = prompts
    wrong = OracleDrafter([[1]], VOCAB + 1)
    with pytest.raises(ValueError, match="drafter: built for vocab 129, the model has 128"):
        ps.generate(model, ids, wrong, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="drafter: built for vocab 129"):
        ps.patch(model, wrong)
    with pytest.raises(TypeError, match="drafter: expected a parallelspec Drafter, a list of them, or None, got str"):
        ps.generate(model, ids, "ngram", attention_mask=mask, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"drafter: expected a non-empty list of parallelspec Drafters, got "
                                        r"\['NgramDrafter', 'str'\]"):
        ps.generate(model, ids, [ps.NgramDrafter(), "eagle"], attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="drafter: built for vocab 129"):
        ps.generate(model, ids, [ps.NgramDrafter(), wrong], attention_mask=mask, max_new_tokens=2)


def test_a_list_of_drafters_is_one_hybrid_tree(model, prompts):
    """drafter=[a, b] composes them (HybridDrafter): the target's output, and the same steps as
    the HybridDrafter built by hand; patch takes a list too."""
    ids, mask = prompts
    reference = hf_greedy(model, ids, mask, 8)
    make = lambda: [ps.NgramDrafter(num_tokens=4), OracleDrafter(unpadded_rows(reference, mask), VOCAB)]
    out, stats = ps.generate(model, ids, make(), attention_mask=mask, max_new_tokens=8, tree="chain", return_stats=True)
    by_hand, hand_stats = ps.generate(model, ids, ps.HybridDrafter(make()), attention_mask=mask, max_new_tokens=8,
                                      tree="chain", return_stats=True)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(by_hand, reference)
    assert stats.accept_histogram == hand_stats.accept_histogram and stats.mean_accepted > 1
    ps.patch(model, make(), tree="chain")
    try:
        torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=8), reference)
    finally:
        ps.unpatch(model)


def test_unsupported_architecture_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match=r"model: expected a causal LM of a model type parallelspec runs \(llama, "
                                         r".*\), got GPT2LMHeadModel \(model_type='gpt2'\)"):
        ps.generate(gpt2, torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_bad_tree_options_are_refused(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="tree: expected 'auto', 'chain', 'static', 'dynamic'"):
        ps.generate(model, ids, ps.NgramDrafter(), attention_mask=mask, max_new_tokens=2, tree="bushy")
    with pytest.raises(ValueError, match="tree_choices: the paths must be prefix-closed"):
        ps.generate(model, ids, ps.NgramDrafter(), attention_mask=mask, max_new_tokens=2, tree="static",
                    tree_choices=[[0], [1, 0]])
    with pytest.raises(ValueError, match="tree_nodes: expected at least 2"):
        ps.generate(model, ids, ps.NgramDrafter(), attention_mask=mask, max_new_tokens=2, tree="dynamic",
                    tree_nodes=1)


def test_default_tree_is_auto_and_plain_decoding_measures_nothing(model, prompts, monkeypatch):
    """generate / patch / custom_generate default to tree="auto" (every source of a hybrid in one
    tree, sized by the measured verify cost): the same output, built by AutoTree; without a
    drafter the tree is the root alone and no cost curve is measured."""
    import parallelspec.trees.auto as autotree
    from parallelspec.trees import verify_cost
    from parallelspec.trees import make_tree_builder

    ids, mask = prompts
    reference = hf_greedy(model, ids, mask, 6)
    built = []
    real_build = autotree.AutoTree.build
    monkeypatch.setattr(autotree.AutoTree, "build", lambda self, root, c: built.append(1) or real_build(self, root, c))
    drafter = ps.HybridDrafter([ps.NgramDrafter(num_tokens=6), OracleDrafter(unpadded_rows(reference, mask), VOCAB)])
    torch.testing.assert_close(ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=6), reference)
    assert built, "the default tree did not go through AutoTree"
    monkeypatch.setattr(verify_cost, "measure_verify_cost", lambda *a, **k: pytest.fail("measured without a drafter"))
    torch.testing.assert_close(ps.generate(model, ids, attention_mask=mask, max_new_tokens=6), reference)
    with pytest.raises(ValueError, match="tree: 'auto' .* needs model=, got None"):
        make_tree_builder("auto")
    with pytest.raises(ValueError, match=r"tree_nodes: expected at least 1 \(the root\) for tree='auto', got 0"):
        ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=2, tree_nodes=0)
    with pytest.raises(ValueError, match="tree_depth: expected at least 1, got -1"):
        ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=2, tree_depth=-1)


def test_streamer_with_a_batch_is_refused(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="streamer: transformers streamers take batch size 1, got a batch of 2"):
        ps.generate(model, ids, attention_mask=mask, max_new_tokens=2, streamer=_Collect())
