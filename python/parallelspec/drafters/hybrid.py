"""HybridDrafter: several drafters feeding ONE verification tree.

Each source is stepped with the same committed tokens (and features, for those that need
them). Sources whose candidates are whole chains (prompt lookup: ``DraftCandidates.paths``)
contribute those chains; the others contribute per-depth candidates, concatenated along the
candidate axis. ``AutoTree`` (tree="auto") merges both into one prefix-closed trie scored by
draft probability and sized by the verify cost; verification and acceptance do not care where
a branch came from, so the output stays exactly the target's. Other tree builders see only the
per-depth candidates.

``defer_on_match``: when every sequence's prompt lookup (a source exposing ``last_match_n``)
matched at least that many trailing tokens (a copying stretch), the sources that need the
target's features (the network drafters, the costly ones) sit the next step out. The decision is taken on the host
copies of one step and applies to the next one's network pass (``launch``), which the decoding
loop starts before its one host read a step: a sit-out follows the step that called for it. When that
read shows the copying has stopped (the step's own tokens no longer meet the criterion: the
chain was cut short), the sources that sat out run after all, right after the read (``step``;
``late_steps`` counts them), so the step still gets their candidates: a tree builder working on
the host cannot read those in the step's one sync (``AutoTree`` places them without reading
them), tree builders on the device use them as any. A sit-out that the lag gets wrong would
otherwise cost the step a network's candidates right where the copy broke (long inputs: one step
more per copied stretch, for a drafter pass that costs a few percent of a step). Either way the
skipped sources' new (token, feature) pairs are kept and fed with the next step's in one
call, so their caches see the same stream as if they had never paused (a step over a few
more rows costs about the same on a CPU).
"""
from __future__ import annotations

import math

import torch

from .base import DraftCandidates, Drafter, HostTokens

_MAX_DEFERRED_ROWS = 32


class HybridDrafter(Drafter):
    wants_host_tokens = True

    def __init__(self, drafters, defer_on_match: int | None = None):
        drafters = list(drafters)
        if not drafters or not all(isinstance(d, Drafter) for d in drafters):
            raise TypeError(f"drafters: expected a non-empty list of parallelspec Drafters, got "
                            f"{[type(d).__name__ for d in drafters]}")
        if defer_on_match is not None:
            if isinstance(defer_on_match, bool) or not isinstance(defer_on_match, int) or defer_on_match < 1:
                raise ValueError(f"defer_on_match: expected None or an n-gram length >= 1, got {defer_on_match!r}")
            if all(d.needs_features for d in drafters):
                raise ValueError(f"defer_on_match: needs a source that never sits out (one without features, "
                                 f"e.g. NgramDrafter), got only {[type(d).__name__ for d in drafters]}")
        self.drafters = drafters
        self.needs_features = any(d.needs_features for d in drafters)
        self.defer_on_match = defer_on_match
        self._pending = None      # (tokens, features, lens) the deferred drafters have not seen yet
        self._pending_rows = 0
        self._held_lens = None
        self._steps = 0
        self.deferred_steps = 0
        self.late_steps = 0       # sit-outs undone after the host read showed the copying had stopped
        self._defer_next = False
        self._sat_out = False
        self._launched = None

    def reset(self, batch_size, max_len, device, dtype):
        for d in self.drafters:
            d.reset(batch_size, max_len, device, dtype)
        self._pending = None
        self._pending_rows = 0
        self._held_lens = None
        self._steps = 0
        self.deferred_steps = 0
        self.late_steps = 0
        self._defer_next = False
        self._sat_out = False
        self._launched = None

    @property
    def depth(self) -> int | None:
        """The deepest candidates any source drafts (None when a source does not say)."""
        depths = [getattr(d, "depth", None) or getattr(d, "num_tokens", None) for d in self.drafters]
        return None if None in depths else max(depths)

    def check_target(self, model) -> None:
        for d in self.drafters:
            d.check_target(model)

    def launch(self, tokens, features, lens) -> DraftCandidates | None:
        """The device sources' step, before the loop's host sync: the network sources (or their
        sitting out: decided from the last step's host copies, so a sit-out follows the step whose
        acceptance or match called for it) and the sources that need neither features nor host
        copies. Returns their per-depth candidates merged (what a tree builder may ask for in that
        sync), or None."""
        device = [d.step(tokens, None, lens) for d in self.drafters
                  if not d.needs_features and not d.wants_host_tokens]
        if self._pending is None:
            stream = (tokens, features, lens)
        else:  # the held-back rows: as many columns as the longest held-back sequence
            held = self._pending
            rows = self._pending_rows
            stream = _join((held[0][:, :rows], held[1][:, :rows], held[2]), (tokens, features, lens))
        defer = (self._defer_next and self.needs_features and stream[0].shape[1] <= _MAX_DEFERRED_ROWS)
        self._sat_out = defer
        if defer:
            self._pending = stream
            self.deferred_steps += 1
            net = None
        else:
            self._pending = None
            net = self._run_networks(stream)
        parts = ([net] if net is not None else []) + [c for c in device if c.paths is None]
        merged = None if not parts else parts[0] if len(parts) == 1 else _merge_per_depth(parts, None)
        self._launched = (tokens, net, device, merged)
        return merged

    def _run_networks(self, stream) -> DraftCandidates | None:
        per_depth = [d.step(*stream) for d in self.drafters if d.needs_features]
        if not per_depth:
            return None
        return per_depth[0] if len(per_depth) == 1 else _merge_per_depth(per_depth, None)

    def step(self, tokens, features, lens, host: HostTokens | None = None) -> DraftCandidates:
        if host is None:   # called alone, not by the decoding loop: one host transfer of its own
            host = HostTokens(tokens.tolist(), lens.tolist())
        if self._launched is None or self._launched[0] is not tokens:
            self.launch(tokens, features, lens)
        _, net, device, merged = self._launched
        self._launched = None
        results = device + [d.step(tokens, None, lens, host=host) for d in self.drafters
                            if not d.needs_features and d.wants_host_tokens]
        copying = self._copying(host)
        if self._sat_out and not copying:
            # the sit-out was decided on the last step's copies, and this step's show the copying
            # stopped: run the held-back stream now (device work after the host read; no host sync)
            net = self._run_networks(self._pending)
            self._pending = None
            self.deferred_steps -= 1
            self.late_steps += 1
            merged = None
        self._sat_out = False
        if self._pending is None:
            self._held_lens = None
        else:   # rows held back per sequence (host ints): the next launch joins that many columns
            self._held_lens = [a + b for a, b in zip(self._held_lens or [0] * len(host.lens), host.lens)]
            self._pending_rows = max(max(self._held_lens), 1)
        # the network sources sit out the next step when every live sequence is copying now;
        # never on the first step (the prompt)
        self._defer_next = copying and self._steps > 0 and self.needs_features
        self._steps += 1
        B = tokens.shape[0]
        # sources without features may still draft per depth (any Drafter): those join the network's
        per_depth = ([net] if net is not None else []) + [c for c in results if c.paths is None]
        chains = [c for c in results if c.paths is not None]
        paths = [[p for c in chains for p in c.paths[b]] for b in range(B)] if chains else None
        if not per_depth:   # chains only: their own per-depth view, flagged as such
            k = max(c.tokens.shape[1] for c in chains)
            tok = torch.cat([_pad_depth(c.tokens, k, 0) for c in chains], dim=2)
            lp = torch.cat([_pad_depth(c.logprobs, k, -math.inf) for c in chains], dim=2)
            return DraftCandidates(tok, lp, paths, per_depth_in_paths=True)
        # the launched tensors themselves when nothing ran late (a tree builder asked for them)
        one = merged if merged is not None else per_depth[0] if len(per_depth) == 1 else None
        if one is not None:
            return DraftCandidates(one.tokens, one.logprobs, paths, conditioned_depths=one.conditioned_depths)
        return _merge_per_depth(per_depth, paths)

    def _copying(self, host: HostTokens) -> bool:
        """Every live sequence is copying: prompt lookup matched >= defer_on_match trailing tokens
        (after this step's tokens)."""
        live = [n > 0 for n in host.lens]
        copying = False
        if self.defer_on_match is not None:
            matched = [getattr(d, "last_match_n", None) for d in self.drafters if not d.needs_features]
            matched = [m for m in matched if m is not None]
            copying = bool(matched) and all(max(m[b] for m in matched) >= self.defer_on_match
                                            for b in range(len(live)) if live[b])
        return copying


def _merge_per_depth(per_depth: list[DraftCandidates], paths) -> DraftCandidates:
    """Per-depth candidates of several sources, concatenated along the candidate axis. One source
    keeps its conditioning (its candidates come first, slot 0 is its top-1); with several, slot 0
    is only the first one's: treated as independent."""
    k = max(c.tokens.shape[1] for c in per_depth)
    return DraftCandidates(torch.cat([_pad_depth(c.tokens, k, 0) for c in per_depth], dim=2),
                           torch.cat([_pad_depth(c.logprobs, k, -math.inf) for c in per_depth], dim=2), paths,
                           conditioned_depths=per_depth[0].conditioned_depths if len(per_depth) == 1 else 0)


def _join(first, second):
    """Two ragged (tokens [B, R1], features [B, R1, d], lens [B]) batches -> one of R1 + R2
    columns (a width known without reading lens), each row's first entries followed by its
    second ones (entries past lens arbitrary)."""
    (t1, f1, l1), (t2, f2, l2) = first, second
    R1 = t1.shape[1]
    j = torch.arange(max(R1 + t2.shape[1], 1), device=t1.device)[None, :]
    idx = torch.where(j < l1[:, None], j, R1 + j - l1[:, None]).clamp(max=R1 + t2.shape[1] - 1)
    tokens = torch.cat([t1, t2], dim=1).gather(1, idx)
    feats = torch.cat([f1, f2], dim=1)
    feats = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))
    return tokens, feats, l1 + l2


def _pad_depth(x: torch.Tensor, k: int, value) -> torch.Tensor:
    if x.shape[1] == k:
        return x
    pad = torch.full((x.shape[0], k - x.shape[1], x.shape[2]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)
