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
