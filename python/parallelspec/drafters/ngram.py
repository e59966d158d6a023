"""Prompt lookup: draft by copying what followed the latest earlier occurrence of the context's
last n tokens, for several n at once (longest first). A small model's greedy output repeats
itself and its prompt, which makes this a strong drafter for free (about 2.5 tokens
per 4-token chain step on SmolLM2's own text; docs/METHOD.md).

Candidate slot i of every depth comes from the i-th distinct match (n = 3, then 2, then 1 by
default), so the path (i, i, .., i) is that match's continuation; a static tree such as
``[[0], [0, 0], .., [1], [1, 1], ..]`` follows several of them. The log-probabilities are a
fixed preference (longer matches first, nearer depths first), not a model's; empty slots are
-inf with token 0. The explicit chains (``DraftCandidates.paths``, what a merging tree builder
scores) carry estimates of the chance that the target takes each token, by the match's length:
how many tokens before the cursor agree with those before the copied place (``FIRST_PROB``,
``NEXT_PROB``): a 1-token match is a weak hint, a 3-token one usually a copy.

Bookkeeping is on the host (one transfer of the new tokens per step): for each n, a dict from
each n-gram to where its latest occurrence's continuation starts, updated as tokens arrive, so
a lookup costs O(1) whatever the length. The history is what step() was given: the prompt
from its second token on (the interface's EAGLE shift starts there), then every committed token.
"""
from __future__ import annotations

import math

import torch

from .base import DraftCandidates, Drafter, HostTokens, to_device


#: chance that the target takes a match's first token / each next one, by match length 1, 2, 3+:
#: measured with prompt lookup alone (12 tokens, chain tree) on SmolLM2-135M-Instruct's greedy
#: output over the bench's prompts 5-12 of each category (disjoint from the 4 the bench runs; 430
#: matches): a 1-token match's first token is taken 17% of the time, a 3+-token match's 72%.
FIRST_PROB = (0.17, 0.42, 0.72)
NEXT_PROB = (0.62, 0.82, 0.88)


def _padded(a: tuple, b: tuple) -> tuple[tuple, tuple]:
    """Two per-length tuples to one length, each extended by its last entry."""
    n = max(len(a), len(b))
    return a + a[-1:] * (n - len(a)), b + b[-1:] * (n - len(b))


class NgramDrafter(Drafter):
    needs_features = False
    wants_host_tokens = True

    def __init__(self, num_tokens: int = 4, ngram_sizes=(3, 2, 1), first_prob=FIRST_PROB, next_prob=NEXT_PROB):
        sizes = sorted({int(n) for n in ngram_sizes}, reverse=True)
        if num_tokens < 1:
            raise ValueError(f"num_tokens: expected at least 1 drafted token, got {num_tokens}")
        if not sizes or sizes[-1] < 1:
            raise ValueError(f"ngram_sizes: expected positive n-gram lengths, got {list(ngram_sizes)}")
        probs = {}
        for name, p in (("first_prob", first_prob), ("next_prob", next_prob)):
            p = (p,) if isinstance(p, (int, float)) else tuple(p)
            if not p or not all(isinstance(x, (int, float)) and 0.0 < x <= 1.0 for x in p):
                raise ValueError(f"{name}: expected a probability in (0, 1] or a tuple of them (by match "
                                 f"length 1, 2, ...), got {p}")
            probs[name] = p
        self.num_tokens = num_tokens
        self.ngram_sizes = tuple(sizes)
        # For tree merging (DraftCandidates.paths): the chance that the target agrees with a
        # match's first token and with each following one, by the match's length (how many
        # tokens before the cursor equal those before the copied place; the last entry serves
        # every longer match), halved per lesser match.
        self._path_logprob = [[[math.log(f * 0.5 ** i)] + [math.log(nx)] * (num_tokens - 1) for f, nx in
                               zip(*_padded(probs["first_prob"], probs["next_prob"]))] for i in range(len(sizes))]
        # slot i's log-probability at depth d: a fixed order of preference (see module docstring)
        self._logprob = [[math.log(0.5 ** (i + 1)) * d for d in range(1, num_tokens + 1)] for i in range(len(sizes))]
        self.reset(1, 0, torch.device("cpu"), torch.float32)

    def reset(self, batch_size, max_len, device, dtype):
        self.device = torch.device(device)
        self.history: list[list[int]] = [[] for _ in range(batch_size)]
        # index[b][n]: n-gram -> start of the continuation of its latest occurrence
        self.index: list[dict[int, dict[tuple, int]]] = [{n: {} for n in self.ngram_sizes} for _ in range(batch_size)]
        # per sequence: the longest n-gram matched by the last step (0: none); HybridDrafter reads it
        self.last_match_n: list[int] = [0] * batch_size

    def check_target(self, model) -> None:
        return None  # token ids only: works with any target

    def _append(self, b: int, tokens: list[int]) -> None:
        hist, index = self.history[b], self.index[b]
        for t in tokens:
            hist.append(t)
            end = len(hist) - 1  # the n-gram ending just before the new token now has a continuation
            for n, table in index.items():
                if end >= n:
                    table[tuple(hist[end - n:end])] = end

    def _matches(self, b: int) -> list[tuple[list[int], int]]:
        """(continuation, match length) of each distinct match, longest n-gram first."""
        hist, k = self.history[b], self.num_tokens
        longest = len(self._path_logprob[0])
        found, starts = [], set()
        self.last_match_n[b] = 0
        for n in self.ngram_sizes:
            if len(hist) < n:
                continue
            start = self.index[b][n].get(tuple(hist[len(hist) - n:]))
            if start is not None and start not in starts:
                self.last_match_n[b] = max(self.last_match_n[b], n)
                starts.add(start)
                # the n-gram matched; how far back does the agreement go (up to what the estimates tell apart)
                m = min(n, longest)
                while m < longest and start - m - 1 >= 0 and hist[start - m - 1] == hist[len(hist) - m - 1]:
                    m += 1
                found.append((hist[start:start + k], m))
        return found

    def step(self, tokens, features, lens, host: HostTokens | None = None):
        # the decoding loop hands over host copies taken in its one sync a step; alone, one transfer
        rows, counts = (host.tokens, host.lens) if host is not None else (tokens.tolist(), lens.tolist())
        B, k, m = len(rows), self.num_tokens, len(self.ngram_sizes)
        out_tokens = [[[0] * m for _ in range(k)] for _ in range(B)]
        out_logprobs = [[[-math.inf] * m for _ in range(k)] for _ in range(B)]
        paths = [[] for _ in range(B)]
        for b in range(B):
            self._append(b, rows[b][:counts[b]])
            for i, (continuation, m) in enumerate(self._matches(b)):
                paths[b].append((continuation, self._path_logprob[i][m - 1][:len(continuation)]))
                for d, t in enumerate(continuation):
                    out_tokens[b][d][i] = t
                    out_logprobs[b][d][i] = self._logprob[i][d]
        return DraftCandidates(to_device(out_tokens, torch.int64, self.device),
                               to_device(out_logprobs, torch.float32, self.device), paths, per_depth_in_paths=True)
