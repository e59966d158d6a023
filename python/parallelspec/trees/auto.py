"""tree="auto": a draft tree sized by a cost model, merging every source's candidates.

Each step the builder gathers candidate nodes for every sequence from
  - the per-depth candidates of a model drafter (beam-expanded like ``DynamicTree``: a node's
    score is the summed draft log-probability of its path), and
  - explicit chains (``DraftCandidates.paths``: prompt-lookup continuations), each prefix a node,
merges them into one prefix-closed trie (a node reached by several sources keeps its best
score), and keeps the n best nodes. Scores never increase along a path, so the best n nodes
are prefix-closed. n maximises the expected tokens per second

    (1 + sum of exp(score) over the kept nodes) / (draft_cost + verify_cost(n + 1))

where ``verify_cost`` is the target's measured time for one forward over N tokens on this
machine (``measure_verify_cost``). Verification width is cheap on a GPU and costly on a CPU, so
the same drafter gets a wide tree there and a narrow one here. exp(score) is the draft's own
estimate that the target accepts the node; ``AutoTree`` rescales it by the acceptance actually
seen (``observe``), so an overconfident drafter does not buy wide trees for nothing. The
scale is kept per source -- the model drafter's per-depth
candidates, the explicit chains -- from the accepted nodes each contributed, so prompt lookup's
fixed estimates and a network drafter's probabilities are each corrected by their own record
(a node's scaled estimate is capped by its parent's, which keeps the best n prefix-closed). The
record starts over with every generate call (``reset``): a summary that copies its input and a
chat answer that copies nothing need opposite scales.

No host sync of its own inside the decoding loop: the model drafter's beam (a few hundred
numbers) and the last step's acceptance record reach the host in the loop's one host read a step
(``host_request`` / ``receive``); the trie and the choice of n are a few hundred Python operations
on those host lists, and the tree goes back in one asynchronous copy, its mask built on the device.
Called alone (tests), ``build`` / ``observe`` read the host themselves.

Per-depth candidates made after that read (``HybridDrafter``'s network run late, when a sit-out
decided on the last step's copies met a broken copy) are placed without reading them ("blind"):
the drafter's top-1 chain (slot 0 at every depth) and its 2nd / 3rd depth-1 candidates, each
scored by the mean of what those same slots scored in this call's read beams, their tokens
gathered on the device into the tree.
"""
from __future__ import annotations

import math

import torch
from ps_kernels import tree_mask_from_parents

from ..drafters.base import DraftCandidates, to_device
from . import verify_cost as _verify_cost
from .base import Tree, TreeBuilder, beam_levels, check_depth

# prompt lookup's fixed estimates may be scaled up to this (a long match's first token .72 -> 1): on
# inputs it copies (summaries, rewrites) they are too low (benchmarks/results/variants/README.md)
CHAIN_TRUST = 2.0


class AutoTree(TreeBuilder):
    def __init__(self, verify_cost: dict[int, float], *, max_nodes: int = 32, depth: int | None = None,
                 draft_cost: float | None = None):
        self._check_options(max_nodes, depth)
        if not verify_cost or 1 not in verify_cost:
            raise ValueError(f"verify_cost: expected measured times including N = 1, got {verify_cost}")
        self.sizes = sorted(verify_cost)
        self.verify_cost = _verify_cost.envelope(dict(verify_cost))
        self.max_nodes = max_nodes
        self.depth = depth
        # a parallel drafter's pass costs about a tenth of a target step; the engine
        # can overwrite this with what it measures
        self.draft_cost = 0.1 * verify_cost[1] if draft_cost is None else draft_cost
        # caps on the scales: a model's probabilities are never trusted beyond what they claim;
        # prompt lookup's fixed estimates may be raised up to CHAIN_TRUST times (inputs it copies)
        self.source_cap = [1.0, CHAIN_TRUST]
        self.reset()

    def reset(self) -> None:
        """Start the acceptance record over (the engine calls this at every generate call)."""
        self._pending_record = None   # observe()'s device tensors, applied before the next build
        self._host_record = None      # their host copies (receive)
        self._host_beam = None        # (candidates.tokens it is for, host lists of the beam)
        self._request = None
        self._calibration = 1.0       # accepted / predicted extra tokens (observe)
        self._predicted = 0.0
        self._seen_total = self._predicted_total = 4.0
        # per source (0: per-depth candidates of a model drafter, 1: explicit chains): the same
        # ratio, when observe() is given the accepted nodes
        self._source_calibration = [1.0, 1.0]
        self._source_seen = [4.0, 4.0]
        self._source_predicted = [4.0, 4.0]
        self._kept_sources: list[list[int]] | None = None   # per sequence: node index -> source
        self._kept_predicted = [0.0, 0.0]
        self.last_nodes = 1
        self._in_loop = False         # host_request was called for the coming build (the decoding loop)
        # blind slot paths (see the module docstring) -> [sum of exp(score), count] over the read beams
        self._slot_record: dict[tuple, list[float]] = {}

    # -- cost model -------------------------------------------------------------------------
    def cost(self, n: int) -> float:
        """Interpolated verify time for a tree of n nodes (root included)."""
        sizes = self.sizes
        if n <= sizes[0]:
            return self.verify_cost[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:]):
            if n <= hi:
                t = (n - lo) / (hi - lo)
                return self.verify_cost[lo] * (1 - t) + self.verify_cost[hi] * t
        lo, hi = sizes[-2], sizes[-1]  # extrapolate linearly past the last measurement
        return self.verify_cost[hi] + (n - hi) * (self.verify_cost[hi] - self.verify_cost[lo]) / (hi - lo)

    def choose_size(self, gains: list[list[float]]) -> int:
        """gains[b]: acceptance estimates (calibrated) of sequence b's candidate nodes, best first. Returns
        the number of draft nodes n (same for the batch) maximising expected tokens / time.
        The verify cost is read at B * (n + 1) rows: a batch verifies every sequence's tree in
        one forward, and its linear layers (most of a small target's step) see all the rows."""
        B = max(len(gains), 1)
        limit = min(self.max_nodes - 1, max((len(g) for g in gains), default=0))
        best_n, best_rate, expected = 0, len(gains) / (self.draft_cost + self.cost(B)), float(len(gains))
        for n in range(1, limit + 1):
            expected += sum(g[n - 1] for g in gains if len(g) >= n)
            rate = expected / (self.draft_cost + self.cost(B * (n + 1)))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    @property
    def calibration(self) -> float:
        self._apply_record()
        return self._calibration

    @property
    def source_calibration(self) -> list[float]:
        self._apply_record()
        return self._source_calibration

    def max_size(self, depth):
        return self.max_nodes

    def observe(self, accept_lens: torch.Tensor, accept_index: torch.Tensor | None = None) -> None:
        """Rescale the draft's acceptance estimates by what was accepted (the engine calls this
        after each step; the tensors are read on the host with the next step's host sync):
        calibration = accepted / predicted extra tokens summed over the steps of this generate
        call, starting from a prior of 4 predicted = 4 accepted, capped at 1 (never trust a
        drafter more than it claims; prompt lookup's fixed estimates: ``CHAIN_TRUST``) and
        floored at 0.3 (a run of rejections must not shut drafting off for good: with no tree
        there is nothing left to observe)."""
        self._apply_record()
        self._pending_record = (accept_lens, accept_index)

    def host_request(self, candidates: DraftCandidates | None) -> list[torch.Tensor]:
        request, self._request = [], {}
        self._in_loop = True
        if self._pending_record is not None:
            lens, index = self._pending_record
            request += [lens] if index is None else [lens, index]
            self._request["record"] = len(request)
        if self._uses_per_depth(candidates):
            beam = self._beam_tensors(candidates, self.max_nodes - 1)
            self._request["beam"] = (candidates.tokens, len(request), len(beam))
            request += beam
        return request

    def receive(self, host: list) -> None:
        n = self._request.get("record", 0)
        if n:
            self._host_record = (host[0], host[1] if n == 2 else None)
        if "beam" in self._request:
            tokens, at, count = self._request["beam"]
            self._host_beam = (tokens, host[at:at + count])
        self._request = None

    def _apply_record(self) -> None:
        if self._pending_record is None:
            return
        if self._host_record is not None:
            lens, index = self._host_record
        else:   # called outside the loop: read the host here
            lens_t, index_t = self._pending_record
            lens, index = lens_t.tolist(), None if index_t is None else index_t.tolist()
        self._pending_record = self._host_record = None
        if self._predicted > 0:
            self._seen_total += sum(max(n - 1, 0) for n in lens)
            self._predicted_total += self._predicted
            self._calibration = min(1.0, max(0.3, self._seen_total / self._predicted_total))
        if index is None or self._kept_sources is None:
            self._source_calibration = [self._calibration] * 2   # one scale for all
        elif self._predicted > 0:
            # the same per source: each accepted node counts for the source it came from
            for b, srcs in enumerate(self._kept_sources):
                for i in index[b][1:lens[b]]:
                    if 0 < i < len(srcs):
                        self._source_seen[srcs[i]] += 1
            for s in (0, 1):
                self._source_predicted[s] += self._kept_predicted[s]
                ratio = self._source_seen[s] / self._source_predicted[s]
                self._source_calibration[s] = min(self.source_cap[s], max(0.3, ratio))

    # -- candidates -> trie ----------------------------------------------------------------
    def _uses_per_depth(self, candidates: DraftCandidates | None) -> bool:
        return candidates is not None and self.max_nodes > 1 and not candidates.per_depth_in_paths

    def _conditioned(self, candidates: DraftCandidates) -> tuple[int, int]:
        k = candidates.tokens.shape[1]
        k = k if self.depth is None else min(self.depth, k)
        return k, min(candidates.conditioned_depths, k)

    def _beam_tensors(self, candidates: DraftCandidates, width: int) -> list[torch.Tensor]:
        """What _beam_paths reads on the host: per beam level (scores, parent, token), then the
        conditioned head's tokens and log-probabilities (device tensors)."""
        k, c = self._conditioned(candidates)
        out = []
        for d, (scores, parent, choice) in enumerate(beam_levels(candidates.logprobs[:, c:], k - c, width)):
            out += [scores, parent, candidates.tokens[:, c + d].gather(1, choice)]
        if c:
            out += [candidates.tokens[:, :c], candidates.logprobs[:, :c]]
        return out

    def _beam_paths(self, candidates: DraftCandidates, width: int) -> list[dict[tuple, float]]:
        """Per sequence: {token path: score} of the `width` best paths at every depth. Depths up
        to ``conditioned_depths`` contribute their top-1 chain and, as leaves off it, their other
        candidates; the later depths are beam-expanded from the end of that chain."""
        B = candidates.tokens.shape[0]
        k, c = self._conditioned(candidates)
        if self._host_beam is not None and self._host_beam[0] is candidates.tokens:
            flat = self._host_beam[1]   # copied in the loop's host sync
        else:
            flat = [t.tolist() for t in self._beam_tensors(candidates, width)]
        self._host_beam = None
        levels = len(flat) // 3 if not c else (len(flat) - 2) // 3
        host = [tuple(flat[3 * d:3 * d + 3]) for d in range(levels)]
        head = (flat[-2], flat[-1]) if c else None
        out = []
        for b in range(B):
            nodes: dict[tuple, float] = {}
            slots = []   # (blind slot path, score) of this sequence: the top-1 chain, depth 1's 2nd / 3rd
            chain, base = (), 0.0
            for d in range(c):
                toks, lps = head[0][b][d], head[1][b][d]
                for j, (tok, lp) in enumerate(zip(toks, lps)):
                    if lp > -1e3:
                        path = chain + (tok,)
                        nodes[path] = max(base + lp, nodes.get(path, -math.inf))
                        if j < 3 and (j == 0 or d == 0):
                            slots.append((_slot_path(d + 1, j), base + lp))
                if not lps[0] > -1e3:   # no top-1 here: nothing hangs below
                    break
                chain, base = chain + (toks[0],), base + lps[0]
            prev: list[tuple] = [chain]
            for d, (scores_d, parents_d, tokens_d) in enumerate(host if len(chain) == c else []):
                cur = []
                for j, (score, par, tok) in enumerate(zip(scores_d[b], parents_d[b], tokens_d[b])):
                    path = prev[par] + (tok,)
                    cur.append(path)
                    if score > -1e3:
                        nodes[path] = max(base + score, nodes.get(path, -math.inf))
                        # a beam level's best path is the top-1 chain (independent depths); the
                        # first level's next ones are depth 1's 2nd / 3rd candidates
                        if j == 0 or (c + d == 0 and j < 3):
                            slots.append((_slot_path(c + d + 1, j), base + score))
                prev = cur
            for path, score in slots:
                rec = self._slot_record.setdefault(path, [0.0, 0])
                rec[0] += math.exp(score)
                rec[1] += 1
            out.append(nodes)
        return out

    def _blind_paths(self, candidates: DraftCandidates) -> list[dict[tuple, float]]:
        """Per sequence: {blind path: log of its slots' mean recorded score} (the same for every
        sequence: nothing of these candidates is read). A blind path holds negative placeholders,
        -1 - (flat index into tokens[b].view(k * m)), that ``_tensors`` gathers on the device."""
        self._host_beam = None
        k, _ = self._conditioned(candidates)
        m = candidates.tokens.shape[2]
        nodes = {}
        for slots, (total, count) in self._slot_record.items():
            if count and total > 0 and len(slots) <= k and all(j < m for j in slots):
                nodes[tuple(-1 - (d * m + j) for d, j in enumerate(slots))] = math.log(total / count)
        return [dict(nodes) for _ in range(candidates.tokens.shape[0])]

    def build(self, root: torch.Tensor, candidates: DraftCandidates | None) -> Tree:
        B = root.shape[0]
        width = self.max_nodes - 1
        self._apply_record()
        use_per_depth = self._uses_per_depth(candidates)
        in_loop, self._in_loop = self._in_loop, False
        # inside the decoding loop, per-depth candidates whose beam was not part of the step's host
        # read (made after it) are placed blind: reading them would be a second host sync
        blind = (use_per_depth and in_loop
                 and not (self._host_beam is not None and self._host_beam[0] is candidates.tokens))
        if blind:
            tries = self._blind_paths(candidates)
        else:
            tries = self._beam_paths(candidates, width) if use_per_depth else [dict() for _ in range(B)]
        chained: list[set] = [set() for _ in range(B)]   # paths whose best score is a chain's
        if candidates is not None and candidates.paths is not None:
            for b, chains in enumerate(candidates.paths):
                for chain, chain_logprobs in chains:
                    score = 0.0
                    for d, (tok, lp) in enumerate(zip(chain, chain_logprobs)):
                        if self.depth is not None and d >= self.depth:
                            break
                        score += lp
                        path = tuple(chain[:d + 1])
                        if score > tries[b].get(path, -math.inf):
                            tries[b][path] = score
                            chained[b].add(path)
        # each node's estimate scaled by its source's calibration (one scale for both without
        # per_source), then capped by its parent's: scores never increase along a path, so the
        # best n (ties: shallower first) stay prefix-closed
        cal = self._source_calibration
        ranked = []
        for b, t in enumerate(tries):
            eff = {(): math.inf}
            for path in sorted(t, key=len):
                g = min(1.0, cal[path in chained[b]] * math.exp(t[path]))
                eff[path] = min(g, eff.get(path[:-1], 0.0))
            ranked.append(sorted(((p, eff[p]) for p in t), key=lambda kv: (-kv[1], len(kv[0]))))
        n = self.choose_size([[g for _, g in r] for r in ranked])
        kept = [r[:n] for r in ranked]
        self._kept_predicted = [0.0, 0.0]
        self._kept_sources = []
        for b, nodes in enumerate(kept):
            srcs = [0]
            for path in sorted((p for p, _ in nodes), key=len):   # _tensors' node order
                src = int(path in chained[b])
                srcs.append(src)
                self._kept_predicted[src] += math.exp(tries[b][path])
            self._kept_sources.append(srcs)
        self._predicted = sum(self._kept_predicted)
        self.last_nodes = n + 1
        return self._tensors(root, kept, n, candidates.tokens if blind else None)

    @staticmethod
    def _tensors(root: torch.Tensor, kept: list[list[tuple[tuple, float]]], n: int,
                 blind_tokens: torch.Tensor | None = None) -> Tree:
        B, N = root.shape[0], n + 1
        tokens = [[0] * N for _ in range(B)]
        parents = [[-1] + [0] * n for _ in range(B)]
        depths = [[0] * N for _ in range(B)]
        for b, nodes in enumerate(kept):
            ordered = sorted((path for path, _ in nodes), key=len)  # parents before children
            index = {(): 0}
            for i, path in enumerate(ordered, 1):
                index[path] = i
                tokens[b][i] = path[-1]
                parents[b][i] = index[path[:-1]]
                depths[b][i] = len(path)
            # a sequence with fewer candidates than n pads with leaves under the root that the
            # walk can never take ahead of a real child (same token as the root's first child);
            # at depth 1, so that a pad leaf the walk does take (no candidates: token 0) is a
            # true node whose logits are the target's after it (at depth 0 they were not)
            for i in range(len(ordered) + 1, N):
                tokens[b][i] = tokens[b][1] if len(ordered) else 0
                depths[b][i] = 1
        gather = None
        if blind_tokens is not None:   # blind nodes (negative placeholders): their tokens on the device
            gather = [[-1 - t if t < 0 else -1 for t in row] for row in tokens]
            tokens = [[max(t, 0) for t in row] for row in tokens]
        packed = to_device([tokens, parents, depths] + ([gather] if gather else []), torch.int64, root.device)
        tok = torch.cat([root[:, None], packed[0, :, 1:]], dim=1)
        if gather:
            index = packed[3]
            drafted = blind_tokens.reshape(B, -1).gather(1, index.clamp(min=0))
            tok = torch.where(index >= 0, drafted, tok)
        par, dep = packed[1], packed[2]
        return Tree(tok, par, dep, tree_mask_from_parents(par, validate=False) if N > 1 else None)

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def _check_options(max_nodes: int, depth: int | None) -> None:
        if max_nodes < 1:
            raise ValueError(f"max_nodes: expected at least 1 (the root), got {max_nodes}")
        check_depth(depth)

    @classmethod
    def for_model(cls, model, *, max_nodes: int = 32, depth: int | None = None, cache: bool = True,
                  **options) -> "AutoTree":
        """options: draft_cost (see the class)."""
        # before the (first-use) measurement, not after it
        cls._check_options(max_nodes, depth)
        return cls(_verify_cost.measure_verify_cost(model, cache=cache), max_nodes=max_nodes, depth=depth, **options)


def _slot_path(depth: int, slot: int) -> tuple:
    """The candidate slots of a blind node: the top-1 chain to `depth`, or depth 1's `slot`."""
    return (0,) * depth if slot == 0 else (slot,)
