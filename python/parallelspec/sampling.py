"""Logits processing for sampling, with the semantics of transformers' warpers.

``generate(do_sample=True)`` applies, in this order and only when active: temperature
(``temperature != 1``), top-k (``top_k`` not None/0) and top-p (``top_p < 1``), each like
TemperatureLogitsWarper / TopKLogitsWarper / TopPLogitsWarper with min_tokens_to_keep=1, then a
softmax. Here they run on [..., V] at once (every tree node of every sequence), so verification
samples from exactly the distribution plain sampling uses at that position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = None
    top_p: float | None = 1.0

    def __post_init__(self):
        if not self.do_sample:
            return
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature: expected a strictly positive float with do_sample=True, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k: expected a non-negative integer (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a float in [0, 1], got {self.top_p}")


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed logits [..., V] (fp32): filtered entries are -inf."""
    scores = logits.float()
    if params.temperature is not None and params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        k = min(params.top_k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)  # ascending, as TopPLogitsWarper
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from at each position: softmax of the processed logits."""
    return process_logits(logits, params).softmax(dim=-1)


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V] (torch's global RNG, like transformers)."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)
