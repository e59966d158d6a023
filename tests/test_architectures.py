"""Every architecture in parallelspec.hf.ARCHITECTURES is lossless against transformers' own
generate: a tiny random model of each type (built with transformers' classes, 2 layers, both
layer kinds where it has local and global layers, a sliding window of 8 under 13- and 20-token
prompts), greedy, batch 2 with left padding, for no drafter, prompt lookup, a true-continuation
oracle, a random network drafter and the hybrid, each with the chain and the auto tree.
The reference is transformers' eager attention (the one that applies soft-capping and sinks).
Also: the table against what transformers passes to the attention call, the logits against
*ForCausalLM.forward, sampling on Gemma 2, and refusal first (generate and every CLI command)."""
import json

import pytest
import torch
import transformers as tf

import parallelspec as ps
from parallelspec.hf import ARCHITECTURES, check_target
from parallelspec.hf.target import TargetModel
from engine_helpers import OracleDrafter, hf_greedy, left_padded, unpadded_rows

VOCAB = 256
WINDOW = 8
NEW = 12
LOCAL_GLOBAL = ["sliding_attention", "full_attention"]


def _common(**overrides):
    out = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {**out, **overrides}


def _moe(experts="num_experts"):
    return {experts: 4, "num_experts_per_tok": 2}


#: model type -> its tiny config: every feature the type has switched on, at values that change the output
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_common()),
    "mistral": lambda: tf.MistralConfig(sliding_window=WINDOW, **_common()),
    "mixtral": lambda: tf.MixtralConfig(sliding_window=WINDOW, **_moe("num_local_experts"), **_common()),
    "qwen2": lambda: tf.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **_common()),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=48, **_moe(),
                                           **_common()),
    "qwen3": lambda: tf.Qwen3Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                    **_common(head_dim=24)),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(use_sliding_window=True, sliding_window=WINDOW, moe_intermediate_size=32,
                                           **_moe(), **_common(head_dim=16)),
    "gemma": lambda: tf.GemmaConfig(**_common(head_dim=16)),
    "gemma2": lambda: tf.Gemma2Config(sliding_window=WINDOW, layer_types=LOCAL_GLOBAL, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=5.0, query_pre_attn_scalar=24, **_common(head_dim=16)),
    "gemma3_text": lambda: tf.Gemma3TextConfig(sliding_window=WINDOW, layer_types=LOCAL_GLOBAL,
                                               final_logit_softcapping=5.0, query_pre_attn_scalar=24,
                                               **_common(head_dim=16)),
    "granite": lambda: tf.GraniteConfig(attention_multiplier=0.3, logits_scaling=4.0, embedding_multiplier=2.0,
                                        residual_multiplier=0.5, **_common()),
    "granitemoe": lambda: tf.GraniteMoeConfig(attention_multiplier=0.3, logits_scaling=4.0,
                                              **_moe("num_local_experts"), **_common()),
    "olmo": lambda: tf.OlmoConfig(clip_qkv=3.0, **_common()),
    "olmo2": lambda: tf.Olmo2Config(**_common()),
    "olmo3": lambda: tf.Olmo3Config(sliding_window=WINDOW, layer_types=LOCAL_GLOBAL, **_common()),
    "smollm3": lambda: tf.SmolLM3Config(use_sliding_window=True, sliding_window=WINDOW, no_rope_layer_interval=2,
                                        **_common()),
    "phi": lambda: tf.PhiConfig(partial_rotary_factor=0.5, **_common()),
    "phi3": lambda: tf.Phi3Config(sliding_window=WINDOW, partial_rotary_factor=0.5, **_common()),
    "starcoder2": lambda: tf.Starcoder2Config(sliding_window=WINDOW, **_common()),
    "gpt_oss": lambda: tf.GptOssConfig(sliding_window=WINDOW, layer_types=LOCAL_GLOBAL, rope_parameters={
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0}, **_moe("num_local_experts"), **_common(head_dim=16)),
    "cohere": lambda: tf.CohereConfig(logit_scale=0.5, **_common()),
    "cohere2": lambda: tf.Cohere2Config(sliding_window=WINDOW, layer_types=LOCAL_GLOBAL, logit_scale=0.5, **_common()),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model_type: str, seed: int = 0, **overrides):
    config = CONFIGS[model_type]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_every_architecture_has_a_case():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """(model, ids, mask, transformers' greedy output with a few extra tokens): 2 left-padded
    prompts longer than the window."""
    torch.set_num_threads(1)
    model = tiny(request.param)
    ids, mask = left_padded([20, 13], VOCAB)
    windows = TargetModel(model).layer_windows
    if ARCHITECTURES[request.param].window is not None:   # a window that bites, and both layer kinds where typed
        assert min(w for w in windows if w is not None) < 13
        assert ARCHITECTURES[request.param].window == "all" or None in windows
    return model, ids, mask, hf_greedy(model, ids, mask, NEW + 6)


def _drafter(kind, model, mask, reference):
    from parallelspec.drafters import build_network

    if kind == "ngram":
        return ps.NgramDrafter(num_tokens=3)
    if kind == "oracle":
        return OracleDrafter(unpadded_rows(reference, mask), VOCAB, depth=3,
                             check_lens=[int(n) + NEW for n in mask.sum(dim=1)])
    network = ps.ParallelDrafter(build_network(model, parallel=True, depth=3, seed=2), top_m=4)
    return network if kind == "network" else ps.HybridDrafter([ps.NgramDrafter(num_tokens=3), network])


def _tree(kind):
    from parallelspec.trees import AutoTree

    return AutoTree({1: 1.0, 64: 1.05}, max_nodes=10) if kind == "auto" else kind


@pytest.mark.parametrize("drafter, tree", [(None, "chain")] + [(d, t) for d in ("ngram", "oracle", "network", "hybrid")
                                                                for t in ("chain", "auto")])
def test_greedy_matches_transformers(case, drafter, tree):
    model, ids, mask, reference = case
    d = None if drafter is None else _drafter(drafter, model, mask, reference)
    out, stats = ps.generate(model, ids, d, attention_mask=mask, max_new_tokens=NEW, tree=_tree(tree),
                             return_stats=True)
    torch.testing.assert_close(out, reference[:, :ids.shape[1] + NEW], rtol=0, atol=0)
    if drafter == "oracle":   # long acceptances: rollback and trees across the window's edge
        assert stats.mean_accepted > 1.5


def test_compiled_step_matches_transformers(case, monkeypatch, tmp_path):
    """generate(compile=True) on every architecture the adapter accepts: the compiled target pass
    (dynamo's trace with the aot_eager backend, as in test_compiled_step) gives transformers'
    greedy tokens, with no fallback to the eager pass."""
    from parallelspec import compiled

    monkeypatch.setattr(compiled, "_state", compiled._State())
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    try:
        model, ids, mask, reference = case
        out = ps.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, compile=True)
        assert compiled._state.failure is None, compiled._state.failure
        assert compiled._state.first_call_seconds, "the compiled pass did not run"
        torch.testing.assert_close(out, reference[:, :ids.shape[1] + NEW], rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_table_matches_what_transformers_passes(case):
    """Per layer, the window the table derives is the `sliding_window` the module passes (where it
    passes one), the soft-cap its `softcap`, and sinks are declared iff it passes `s_aux`."""
    from transformers import AttentionInterface

    model, ids, _, _ = case
    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = kwargs
        return query.transpose(1, 2), None      # any output of the right shape: only the arguments matter

    AttentionInterface.register("parallelspec_test_spy", spy)
    target = TargetModel(model)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "parallelspec_test_spy"
    try:
        with torch.no_grad():
            model.model(ids[:1])
    finally:
        model.config._attn_implementation = previous
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    for i, kwargs in seen.items():
        if "sliding_window" in kwargs:      # qwen2_moe passes none: its mask alone has the window
            assert (kwargs["sliding_window"] or None) == target.layer_windows[i], f"layer {i}"
        assert kwargs.get("softcap") == target.attn_softcap, f"layer {i}"
        assert (kwargs.get("s_aux") is not None) == target.architecture.sinks, f"layer {i}"


def test_logits_equal_the_models_own(case):
    """TargetModel.logits applies what *ForCausalLM.forward applies after the head (final soft-cap,
    logits scaling), exactly: greedy decoding cannot see it, sampling does."""
    model, ids, _, _ = case
    with torch.no_grad():
        hidden = model.model(ids[:1]).last_hidden_state
        want = model(ids[:1]).logits.float()
        got = TargetModel(model).logits(hidden)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampling_follows_the_target_distribution_gemma2():
    """Gemma 2 (window 4 under a 10-token prompt, attention and final soft-caps): the first 3
    sampled tokens follow the exact joint distribution of the model's own forward, with a random
    drafter and with prompt lookup; the same samples reject the distribution without the final
    soft-cap (the check can see it)."""
    from test_engine_sampling import SAMPLES, SETTINGS, VOCAB as SMALL_VOCAB, _chi_square_pvalue, _exact_joint, \
        _RandomDrafter
    from parallelspec.sampling import SamplingParams

    config = CONFIGS["gemma2"]()
    config.vocab_size, config.sliding_window, config.final_logit_softcapping = SMALL_VOCAB, 4, 1.5
    torch.manual_seed(3)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prompt = [1, 4, 2, 4, 1, 0, 3, 5, 2, 1]
    params = SamplingParams(True, **SETTINGS)
    n = 3
    exact = _exact_joint(model, prompt, n, params)
    model.config.final_logit_softcapping = None
    wrong = _exact_joint(model, prompt, n, params)
    model.config.final_logit_softcapping = 1.5
    for drafter, tree in ((_RandomDrafter(), "chain"), (ps.NgramDrafter(num_tokens=3, ngram_sizes=(2, 1)), "dynamic")):
        torch.manual_seed(1234)
        out, stats = ps.generate(model, torch.tensor([prompt] * SAMPLES), drafter, max_new_tokens=n, do_sample=True,
                                 tree=tree, return_stats=True, **SETTINGS)
        assert stats.accept_histogram[1] > 0 and sum(stats.accept_histogram[2:]) > 0
        counts = torch.zeros([SMALL_VOCAB] * n, dtype=torch.float64)
        counts.index_put_(tuple(out[:, len(prompt):].T), torch.ones(SAMPLES, dtype=torch.float64), accumulate=True)
        assert _chi_square_pvalue(counts, exact) > 1e-3
        assert _chi_square_pvalue(counts, wrong) < 1e-3


# -- refusal first -----------------------------------------------------------------------------

def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))


def test_unknown_model_type_refused_first():
    gpt2 = _gpt2()
    with pytest.raises(ValueError, match=r"model: expected a causal LM of a model type parallelspec runs .*"
                                         r"model_type='gpt2'"):
        check_target(gpt2.config)
    calls = []
    gpt2.forward = lambda *a, **k: calls.append(1)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        ps.generate(gpt2, torch.tensor([[1, 2, 3]]), ps.NgramDrafter(), max_new_tokens=2)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        ps.patch(gpt2)
    assert not calls


def test_layer_windows_follow_the_config():
    """Windows per layer as the masks choose them; one at least as long as max_position_embeddings
    (Phi-4-mini's 262144 over 131072 positions) can never bite and is dropped."""
    phi3 = ARCHITECTURES["phi3"]
    assert phi3.layer_windows(tf.Phi3Config(num_hidden_layers=2, sliding_window=8)) == [8, 8]
    assert phi3.layer_windows(tf.Phi3Config(num_hidden_layers=2, sliding_window=262144,
                                            max_position_embeddings=131072)) == [None, None]
    gemma3 = tf.Gemma3TextConfig(num_hidden_layers=7, sliding_window=512)   # 5 local layers, then a global one
    assert ARCHITECTURES["gemma3_text"].layer_windows(gemma3) == [512] * 5 + [None, 512]
    assert ARCHITECTURES["llama"].layer_windows(tf.LlamaConfig(num_hidden_layers=2)) == [None, None]


def test_refused_variant_of_a_known_type():
    config = CONFIGS["gemma3_text"]()
    config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="gemma3_text with use_bidirectional_attention=True"):
        check_target(config)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    _gpt2().save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["extract", "train", "export", "generate"])
def test_cli_refuses_an_unknown_target_before_writing(command, gpt2_dir, tmp_path, capsys):
    """Every command checks the target's config first: exit 2, an error naming the flag and the
    model type, nothing written (today's failure: extract wrote shards, then crashed)."""
    from parallelspec.tools import cli

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hello"}) + "\n")
    out = tmp_path / "out"
    argv = {"extract": ["extract", "--target", str(gpt2_dir), "--data", str(data), "--out", str(out)],
            "train": ["train", "--target", str(gpt2_dir), "--data", str(tmp_path), "--out", str(out)],
            "export": ["export", "--format", "vllm", str(tmp_path), str(out), "--target", str(gpt2_dir)],
            "generate": ["generate", "--model", str(gpt2_dir), "--prompt", "hello"]}[command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    flag = "--model" if command == "generate" else "--target"
    assert f"parallelspec {command}: error: {flag} {gpt2_dir}: model: expected a causal LM" in err
    assert "model_type='gpt2'" in err
    assert not out.exists()


def test_extract_distills_the_models_own_probabilities():
    """extract's top-K probabilities are the model's own output distribution, final soft-cap
    included (Gemma 2): the drafters learn what the target's generate samples from."""
    import transformers as tf

    from parallelspec.tools.training.extract import target_pass
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    model = tf.Gemma2ForCausalLM(cfg).eval()
    seqs = [[1, 5, 7, 9, 3]]
    _, ids, probs, _, _ = target_pass(model, seqs, 5, autocast_dtype=None)
    with torch.no_grad():
        want = torch.softmax(model(torch.tensor(seqs)).logits.float(), -1).topk(5, -1)
    torch.testing.assert_close(probs, want.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, want.indices)
