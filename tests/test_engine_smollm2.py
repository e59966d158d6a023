"""End to end on the real default target (SmolLM2-135M-Instruct, fp32): chat prompts, batch of
two with left padding, n-gram drafter with a dynamic tree: token-for-token HF greedy."""
import pytest
import torch

import parallelspec as ps

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a Python function that returns the square of a number."]


@pytest.mark.slow
def test_smollm2_chat_prompts_match_hf_greedy():
    from parallelspec.models import load_default_target

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads on this shared machine
    try:
        _run(*load_default_target(verbose=False))
    finally:
        torch.set_num_threads(threads)


def _run(model, tokenizer):
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=20, do_sample=False)
    out, stats = ps.generate(model, batch["input_ids"], ps.NgramDrafter(), attention_mask=batch["attention_mask"],
                             max_new_tokens=20, tree="dynamic", tree_nodes=8, return_stats=True)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert stats.mean_accepted >= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["parallel", "eagle", "parallel-eagle3"])
def test_shipped_drafters_decode_the_embedded_target_losslessly(name, one_thread):
    """Every shipped drafter loads against the embedded target (its signature check passes) and
    drafts in the loop with HF-equal greedy output; the eagle3-layout one accepts draft tokens
    (a broken mask-slot path or d2t map would accept none)."""
    from parallelspec.defaults import SHIPPED, load_drafter
    from parallelspec.models import load_default_target

    if not SHIPPED[name].exists():
        pytest.skip(f"no shipped '{name}' drafter in this checkout")
    model, tokenizer = load_default_target(verbose=False)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    reference = model.generate(ids, max_new_tokens=24, do_sample=False)
    out, stats = ps.generate(model, ids, load_drafter(name, model), max_new_tokens=24, tree="chain",
                             return_stats=True)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert stats.mean_accepted > 1.0


@pytest.mark.slow
def test_shipped_eagle3_drafter_exports_for_vllm(tmp_path):
    """The shipped eagle3-layout drafter exports as vLLM reads it (tests/test_export_vllm.py checks
    the format on tiny models; here: the real asset, its mask id, draft vocabulary and d2t)."""
    import json

    from safetensors.torch import load_file

    from parallelspec.tools import cli
    from parallelspec.defaults import SHIPPED

    if not SHIPPED["parallel-eagle3"].exists():
        pytest.skip("no shipped 'parallel-eagle3' drafter in this checkout")
    assert cli.main(["export", "--format", "vllm", str(SHIPPED["parallel-eagle3"]), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert config["draft_vocab_size"] == 16384 and config["mask_token_id"] == 49151
    assert tensors["lm_head.weight"].shape == (16384, 576) and tensors["d2t"].shape == (16384,)
    assert tensors["mask_hidden"].numel() == 576
