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
from helpers import chi_square_pvalue, chi_square_terms

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
    return chi_square_pvalue(*chi_square_terms(counts, expected_probs))


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


# --------------------------------------------------- the whole sequence, speculative tokens
# Every token of the output, not only the first ones: each new token k of a sequence, given the
# tokens before it, must follow the target's processed distribution after that prefix (which is
# what transformers' sampling draws from: test_processing_matches_transformers_warpers). Checked
# per position k by one chi-square over all prefixes seen often enough (the counts of token k
# after that prefix against the exact conditional from the model's own forward), so the joint
# distribution of all NEW_TOKENS tokens is tested through its chain of conditionals.

NEW_TOKENS = 7          # the prefill's token + 6 speculative ones
SEQUENCE_SAMPLES = 1500
MIN_PREFIX_COUNT = 25


def _conditional_pvalues(model, prompt, outputs, params, eos=None):
    """outputs: [S, NEW_TOKENS] new tokens of S samples of one prompt. Per position k: the p-value
    of the pooled chi-square of token k given the k tokens before it, over the prefixes (not
    ended by eos) seen at least MIN_PREFIX_COUNT times; 0 if a token of probability 0 came out
    after any prefix. Returns [(p-value, prefixes used)]."""
    rows = outputs.tolist()
    results = []
    for k in range(outputs.shape[1]):
        groups = {}
        for r in rows:
            if eos is not None and eos in r[:k]:
                continue          # the sequence ended before position k
            groups.setdefault(tuple(r[:k]), []).append(r[k])
        if not groups:
            results.append((1.0, 0))
            continue
        every = list(groups)
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt) + list(p) for p in every])).logits[:, -1].float()
        exact = dict(zip(every, process_logits(logits, params).softmax(-1).double()))
        if any(exact[p][torch.tensor(toks)].eq(0).any() for p, toks in groups.items()):
            results.append((0.0, len(every)))   # a filtered token came out after some prefix
            continue
        prefixes = [p for p, toks in groups.items() if len(toks) >= MIN_PREFIX_COUNT]
        stat, df = 0.0, 0
        for p in prefixes:
            s, d = chi_square_terms(torch.bincount(torch.tensor(groups[p]), minlength=VOCAB), exact[p])
            stat, df = stat + s, df + d
        pvalue = chi_square_pvalue(stat, df) if df else 1.0
        results.append((pvalue, len(prefixes)))
    return results


def _sampling_drafter(kind, model):
    from engine_helpers import oracle_network

    if kind == "random":
        return _RandomDrafter(depth=4, width=2)
    if kind == "ngram":
        return ps.NgramDrafter(num_tokens=4, ngram_sizes=(2, 1))
    net = oracle_network(model, parallel=kind != "eagle", depth=4, slot1="mask" if kind == "eagle" else "draft")
    drafter = (ps.EagleDrafter if kind == "eagle" else ps.ParallelDrafter)(net, top_m=3)
    if kind == "hybrid":
        drafter = ps.HybridDrafter([ps.NgramDrafter(num_tokens=3, ngram_sizes=(2, 1)), drafter])
    return drafter


def _tree(name):
    from parallelspec.trees import AutoTree
    return AutoTree({1: 1.0, 64: 1.0}, max_nodes=10) if name == "auto" else name


SEQUENCE_CASES = [("parallel", "auto", False), ("eagle", "dynamic", False), ("hybrid", "auto", True),
                  ("hybrid", "chain", False), ("random", "static", True), ("ngram", "auto", True)]


@pytest.mark.parametrize("drafter, tree, padded_eos", SEQUENCE_CASES,
                         ids=[f"{d}-{t}{'-padded-eos' if e else ''}" for d, t, e in SEQUENCE_CASES])
def test_every_new_token_follows_the_target_distribution(drafter, tree, padded_eos, one_thread):
    """NEW_TOKENS sampled tokens per sequence (6 of them speculative) through network, hybrid,
    random and n-gram drafters and the auto, dynamic, static and chain trees: each token's
    conditional distribution given the ones before it is the target's. padded_eos: two prompts
    of different lengths, left-padded in one batch, and an EOS token (the sequence ends there:
    later positions are not counted for it)."""
    model = tiny_model("llama", VOCAB, seed=3)
    model.config.max_position_embeddings = 64
    params = SamplingParams(True, **SETTINGS)
    prompts = [[1, 4, 2, 4, 1], [3, 2, 3]] if padded_eos else [[1, 4, 2, 4, 1]]
    eos = 5 if padded_eos else None
    per_prompt = SEQUENCE_SAMPLES // len(prompts)
    T = max(map(len, prompts))
    ids = torch.zeros(per_prompt * len(prompts), T, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i::len(prompts), T - len(p):] = torch.tensor(p)   # interleaved: each step mixes both prompts
        mask[i::len(prompts), T - len(p):] = 1
    torch.manual_seed(4321)
    out, stats = ps.generate(model, ids, _sampling_drafter(drafter, model), attention_mask=mask,
                             max_new_tokens=NEW_TOKENS, do_sample=True, tree=_tree(tree), eos_token_id=eos,
                             pad_token_id=0, return_stats=True, **SETTINGS)
    assert sum(stats.accept_histogram[3:]) > 0, stats.accept_histogram   # runs of 2+ drafts accepted
    new = out[:, T:]
    if eos is not None:
        assert (new == eos).any(dim=1).float().mean() > 0.2   # many sequences end early
        new = torch.nn.functional.pad(new, (0, NEW_TOKENS - new.shape[1]), value=0)
    for i, p in enumerate(prompts):
        results = _conditional_pvalues(model, p, new[i::len(prompts)], params, eos)
        assert all(used > 0 for _, used in results[:4]), results   # the first positions are all checked
        for k, (pvalue, used) in enumerate(results):
            assert pvalue > 1e-4, f"prompt {i}, new token {k}: p = {pvalue:.2e} over {used} prefixes"


def test_the_sequence_check_detects_a_wrong_distribution(one_thread):
    """Power of the check above: samples at temperature 1.0 judged against temperature 0.8 (at
    the same top-k and top-p) fail at some position."""
    model = tiny_model("llama", VOCAB, seed=3)
    prompt = [1, 4, 2, 4, 1]
    torch.manual_seed(4321)
    out = ps.generate(model, torch.tensor([prompt] * SEQUENCE_SAMPLES), _RandomDrafter(depth=4), max_new_tokens=NEW_TOKENS,
                      do_sample=True, tree="chain", **{**SETTINGS, "temperature": 1.0})
    results = _conditional_pvalues(model, prompt, out[:, len(prompt):], SamplingParams(True, **SETTINGS))
    assert min(p for p, _ in results) < 1e-4, results
