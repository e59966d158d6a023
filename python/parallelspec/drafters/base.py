"""The one small interface every drafter implements (see docs/DESIGN.md, "Drafter interface")."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftCandidates:
    """Per-depth candidates for the tokens after the current root.

    tokens:   [B, k, m] int64   top-m candidate tokens at depths 1..k
    logprobs: [B, k, m] float32 their draft log-probabilities (-inf marks an empty slot)
    paths:    optional explicit continuations per sequence (host lists), for sources whose
              candidates are whole chains rather than independent per-depth choices (prompt
              lookup): ``paths[b]`` is a list of (tokens, per-token log-probabilities).
              Tree builders that merge sources (``AutoTree``) use them; the others ignore them.
    per_depth_in_paths: True when tokens/logprobs only restate the paths (a chain source on its
              own), so a merging builder must not count them twice.
    conditioned_depths: c when the candidates of depths > c were drafted after the top-1 tokens
              (slot 0) of depths 1..c: they are proposals under that chain only (EAGLE-style
              sequential drafting: k - 1; a parallel drafter fed its depth-1 token: 1; mask
              slots alone: 0). ``AutoTree`` hangs them under that chain only.
    """
    tokens: torch.Tensor
    logprobs: torch.Tensor
    paths: list[list[tuple[list[int], list[float]]]] | None = None
    per_depth_in_paths: bool = False
    conditioned_depths: int = 0

    @property
    def depth(self) -> int:
        return self.tokens.shape[1]


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Python data -> a tensor on `device` without a host sync: built on the host, then copied
    from pinned memory asynchronously on CUDA (a pageable copy makes torch wait for the stream)."""
    t = torch.tensor(data, dtype=dtype)
    kind = torch.device(device).type
    if kind == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if kind == "cpu" else t.to(device)


@dataclass
class HostTokens:
    """Host copies of a step's new tokens, taken in the decoding loop's one host sync a step:
    ``tokens[b][:lens[b]]`` are sequence b's new tokens (Python ints)."""
    tokens: list[list[int]]
    lens: list[int]


class Drafter:
    """Base class. Subclasses keep per-sequence state (a KV cache, a token history...)."""

    #: True when step() needs the target's features (last hidden states)
    needs_features: bool = False
    #: True when step() works on the host (prompt lookup): the loop then calls it after the step's
    #: host sync with ``host=HostTokens(...)``, and ``launch`` before that sync
    wants_host_tokens: bool = False

    def launch(self, tokens: torch.Tensor, features: torch.Tensor | None, lens: torch.Tensor) -> DraftCandidates | None:
        """For drafters with ``wants_host_tokens``: the device work of the step, started before
        the loop's host sync (``HybridDrafter``: its network sources). Returns the per-depth
        candidates that step() will return (a tree builder may ask for them in that sync), or None."""
        return None

    def reset(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, features: torch.Tensor | None, lens: torch.Tensor) -> DraftCandidates:
        """Take the newly committed (token, feature) pairs and propose candidates.

        tokens:   [B, R] int64, the first lens[b] entries of row b are new
        features: [B, R, d] or None, the target's features paired with those tokens
                  (feature of position t with token t+1, EAGLE-style)
        lens:     [B] int64
        """
        raise NotImplementedError

    def check_target(self, model) -> None:
        """Raise ValueError when this drafter was not built for `model` (hidden size, vocab)."""
