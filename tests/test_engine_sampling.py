"""Sampling is lossless: logits processing equals transformers' warpers, and the first generated
tokens of speculative sampling (any candidates, any tree) follow the target's exact distribution."""
import itertools

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import parallelspec as ps
from parallelspec.drafters.base import DraftCandidates, Drafter
from parallelspec.sampling import SamplingParams, process_logits
from engine_helpers import tiny_model

VOCAB = 6
SAMPLES = 1200
SETTINGS = dict(temperature=0.8, top_k=5, top_p=0.95)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                       (1.0, None, 0.6), (0.5, 7, 0.8), (2.0, 1, 0.3)])
def test_processing_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 33) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k / top-p boundaries
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = process_logits(logits.view(2, 3, 33), SamplingParams(True, temperature, top_k, top_p)).view(6, 33)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _RandomDrafter(Drafter):
    """Random candidates (deterministic given the seed) with a bias to the likeliest tokens, so
    that both acceptances and rejections happen at every depth."""

    def __init__(self, depth=3, width=2):
        self.depth, self.width = depth, width

    def reset(self, batch_size, max_len, device, dtype):
        pass

    def step(self, tokens, features, lens):
        B = tokens.shape[0]
        cands = torch.randint(0, 3, (B, self.depth, self.width))  # token ids 0..2: often likely ones
        return DraftCandidates(cands, -torch.rand(B, self.depth, self.width))


def _exact_joint(model, prompt, n, params):
    """P(first n new tokens) [VOCAB]*n by enumeration with the model's own forward."""
    joint = torch.zeros([VOCAB] * n, dtype=torch.float64)
    prefixes = list(itertools.product(range(VOCAB), repeat=n - 1))
    seqs = torch.tensor([prompt + list(p) for p in prefixes])
    with torch.no_grad():
        logits = model(seqs).logits[:, len(prompt) - 1:].float()  # [P, n, V]
    probs = process_logits(logits, params).softmax(-1).double()
    for i, p in enumerate(prefixes):
        chain = 1.0
        for j, t in enumerate(p):
            chain *= float(probs[i, j, t])
        joint[p] = chain * probs[i, n - 1]
    return joint


def _chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square p-value, cells with expected count < 5 pooled into one."""
    n = counts.sum()
    expected = expected_probs.flatten() * n
    counts = counts.flatten().double()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("drafter, tree", [(None, "chain"), ("random", "chain"), ("random", "dynamic"),
                                           ("ngram", "static")])
def test_first_tokens_follow_the_target_distribution(drafter, tree):
    torch.set_num_threads(1)
    model = tiny_model("llama", VOCAB, seed=3)
    model.config.max_position_embeddings = 64
    prompt = [1, 4, 2, 4, 1]
    params = SamplingParams(True, **SETTINGS)
    n = 3
    exact = _exact_joint(model, prompt, n, params)
    d = {None: None, "random": _RandomDrafter(), "ngram": ps.NgramDrafter(num_tokens=3, ngram_sizes=(2, 1))}[drafter]
    torch.manual_seed(1234)
    out, stats = ps.generate(model, torch.tensor([prompt] * SAMPLES), d, max_new_tokens=n, do_sample=True, tree=tree,
                             return_stats=True, **SETTINGS)
    if d is not None:  # both acceptances and rejections were exercised
        assert stats.accept_histogram[1] > 0 and sum(stats.accept_histogram[2:]) > 0
    new = out[:, len(prompt):]
    counts = torch.zeros([VOCAB] * n, dtype=torch.float64)
    counts.index_put_(tuple(new.T), torch.ones(SAMPLES, dtype=torch.float64), accumulate=True)
    assert _chi_square_pvalue(counts, exact) > 1e-3
    # each position's marginal too (more samples per cell: a sharper check)
    for j in range(n):
        dims = tuple(i for i in range(n) if i != j)
        assert _chi_square_pvalue(counts.sum(dim=dims), exact.sum(dim=dims)) > 1e-3, f"position {j}"


def test_the_check_detects_a_wrong_distribution():
    """The same test on greedy-biased samples must fail: it has the power to see a bias."""
    model = tiny_model("llama", VOCAB, seed=3)
    prompt = [1, 4, 2, 4, 1]
    params = SamplingParams(True, **SETTINGS)
    exact = _exact_joint(model, prompt, 1, params)
    biased = exact.clone()
    biased[exact.argmax()] += 0.1
    biased /= biased.sum()
    torch.manual_seed(0)
    draws = torch.multinomial(biased.float(), SAMPLES, replacement=True)
    counts = torch.bincount(draws, minlength=VOCAB).double()
    assert _chi_square_pvalue(counts, exact) < 1e-3
