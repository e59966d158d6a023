"""The speculative decoding loop: prefill, draft, build a tree, verify, accept, roll back.

Each step is a handful of small functions over ps_kernels ops and whole-batch tensors:

    candidates = drafter.step(new tokens, their features, lens)   # propose
    tree       = builder.build(root, candidates)                   # tokens, parents, mask
    hidden     = target.forward(tree.tokens, lens + depths, ...)  # one pass over N nodes
    accept_index, accept_lens, next_token = tree_accept(...)      # on the device
    cache.commit(accept_index, accept_lens)                        # kv_rollback

Every sequence of the batch accepts its own number of tokens and stops at its own EOS; a
finished sequence keeps running (shapes stay static) but commits nothing more, to the cache
or to the drafter (its step() lens are 0 from then on). With no drafter the tree is the root
alone: plain decoding through the same code.

One host sync a step (``host_copy``), plus one when a streamer or user stopping criteria need
the tokens; none per tree node. It sits after the step's device drafting and reads, in one
transfer: whether every sequence is done, the host copies of the new tokens that prompt lookup
matches on the host (``Drafter.wants_host_tokens``), and what the tree builder asked for
(``TreeBuilder.host_request``: AutoTree's beam and acceptance record). Tree masks are built on the
device, host-built trees go back in one asynchronous copy. The KV cache is sized once, for the
prompt, the new tokens and the largest tree the builder may emit.

``verify_step`` (the target's pass, tree_accept, recording, the commit) has fixed shapes per tree
size and updates its state in place, so ``decode(..., cuda_graph=True)`` captures it once per
tree-size bucket and replays it (capture.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ps_kernels
import torch

from . import capture, compiled
from .drafters.base import Drafter, HostTokens
from .hf.target import TargetModel
from .sampling import SamplingParams, probabilities, sample
from .trees import RootOnly, Tree, TreeBuilder


@dataclass
class DecodeSettings:
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    stopping_criteria: list = field(default_factory=list)  # transformers StoppingCriteria, called per sequence
    streamer: object | None = None


@dataclass
class GenerationStats:
    """Counters of one generate() call. accept_histogram[a] = how many (sequence, step) pairs
    accepted a tokens (the bonus/next token included, so a >= 1); finished sequences not counted."""
    steps: int = 0
    accept_histogram: list[int] = field(default_factory=list)
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    new_tokens: int = 0
    tree_size: int = 1

    @property
    def mean_accepted(self) -> float:
        n = sum(self.accept_histogram)
        return sum(a * c for a, c in enumerate(self.accept_histogram)) / n if n else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "mean_accepted": self.mean_accepted, "accept_histogram": self.accept_histogram,
                "new_tokens": self.new_tokens, "tree_size": self.tree_size, "prefill_time": self.prefill_time,
                "draft_time": self.draft_time, "verify_time": self.verify_time, "total_time": self.total_time,
                "tokens_per_second": self.tokens_per_second}


class StatsRecorder:
    """What one call records into its GenerationStats (nothing without one): phase times
    (``lap``), steps, the tree size and the acceptance histogram, kept on the device until
    ``finish``. On a GPU the phases' work is asynchronous, so a lap synchronises first."""

    def __init__(self, stats: GenerationStats | None, device: torch.device):
        self.stats = stats
        self.sync = stats is not None and device.type == "cuda"
        self.start = self.last = time.perf_counter()
        self.histogram = torch.zeros(2, dtype=torch.int64, device=device)  # [a] = (sequence, step) pairs

    def lap(self, phase: str) -> None:
        """Add the time since the last lap to ``stats.<phase>_time`` (prefill, draft, verify)."""
        if self.stats is None:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        name = f"{phase}_time"
        setattr(self.stats, name, getattr(self.stats, name) + now - self.last)
        self.last = now

    def step(self, tree_size: int, accept_lens: torch.Tensor, was_live: torch.Tensor) -> None:
        """One verified step: accept_lens [B] counted for the sequences live before it."""
        if self.stats is None:
            return
        self.stats.steps += 1
        self.stats.tree_size = tree_size
        if self.histogram.shape[0] <= tree_size:
            self.histogram = torch.cat([self.histogram, self.histogram.new_zeros(tree_size + 1 - self.histogram.shape[0])])
        self.histogram.scatter_add_(0, accept_lens, was_live.to(torch.int64))

    def finish(self, out: "_Output") -> None:
        if self.stats is None:
            return
        self.stats.new_tokens = int(out.lens.sum())
        self.stats.accept_histogram = self.histogram.tolist()
        self.stats.total_time = time.perf_counter() - self.start


@dataclass
class DraftInput:
    """What the drafter is fed next step (docs/DESIGN.md, "Drafter interface"): the newly
    committed tokens [B, R] (EAGLE-shifted), the target's features at them [B, R, d] and how many
    of each row count [B] (0 for a finished sequence)."""
    tokens: torch.Tensor
    features: torch.Tensor
    lens: torch.Tensor


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded [B, T] prompts -> rows starting at column 0 ([B, P], P = longest prompt; the
    tail of shorter rows repeats their last token and is never committed), lens [B], P."""
    B, T = input_ids.shape
    lens = attention_mask.sum(dim=1).to(torch.int64)
    longest = int(lens.max())
    cols = (T - lens)[:, None] + torch.arange(longest, device=input_ids.device)
    return input_ids.gather(1, cols.clamp(max=T - 1)), lens, longest


def shift_in(tokens: torch.Tensor, lens: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
    """The EAGLE shift: row b of the result is tokens[b, 1:lens[b]] followed by next_token[b]
    (entries past lens[b] are arbitrary)."""
    out = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    return out.scatter(1, (lens - 1)[:, None], next_token[:, None])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, d], index [B, A] -> [B, A, d]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


def prefill(target: TargetModel, cache, rows: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Commit every prompt token (causal attention from cache row 0); returns the hidden states [B, P, d]."""
    positions = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
    cache.lens.zero_()
    hidden = target.forward(rows, positions, cache, None)
    cache.lens.copy_(lens)
    return hidden


def verify(target: TargetModel, cache, tree: Tree) -> tuple[torch.Tensor, torch.Tensor]:
    """One target pass over the tree: hidden states [B, N, d] and fp32 logits [B, N, V]."""
    positions = cache.lens[:, None] + tree.depths
    hidden = target.forward(tree.tokens, positions, cache, tree.mask)
    return hidden, target.logits(hidden)


def accept(tree: Tree, logits: torch.Tensor, sampling: SamplingParams):
    """(accept_index [B, N], accept_lens [B], next_token [B]) by greedy matching or lossless
    recursive rejection against the processed target distribution. Draft tokens are treated
    as deterministic candidates (DraftCandidates carries no draft distributions)."""
    if not sampling.do_sample:
        return ps_kernels.tree_accept(tree.tokens, tree.parents, logits, mode="greedy", validate=False)
    uniforms = torch.rand(tree.tokens.shape, device=logits.device)
    return ps_kernels.tree_accept(tree.tokens, tree.parents, probabilities(logits, sampling), mode="sample",
                                  uniforms=uniforms, validate=False)


def host_copy(tensors: list[torch.Tensor]) -> list:
    """Device tensors -> their values as (nested) Python lists, in ONE device-to-host transfer
    (float64 holds every int64 token id and index exactly; integer tensors come back as ints)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out, at = [], 0
    for t in tensors:
        n = t.numel()
        part = flat[at:at + n] if t.is_floating_point() else [int(v) for v in flat[at:at + n]]
        at += n
        for size in reversed(t.shape[1:]):
            part = [part[i:i + size] for i in range(0, len(part), size)]
        out.append(part if t.dim() else part[0])
    return out


def drafter_depth(drafter: Drafter | None) -> int | None:
    """How many tokens ahead the drafter drafts, when it says (``depth`` / ``num_tokens``)."""
    return getattr(drafter, "depth", None) or getattr(drafter, "num_tokens", None)


def drafter_sources(drafter: Drafter | None) -> list[Drafter]:
    """A hybrid's sources, or the drafter itself (none without one)."""
    if drafter is None:
        return []
    return list(getattr(drafter, "drafters", None) or [drafter])


def aux_layers(drafter: Drafter | None) -> tuple[int, ...]:
    """The target layers whose input hidden states the drafter reads besides the last hidden state
    (``aux_layers`` of an EAGLE-3 drafter: TargetModel.aux_hidden_states); () for the others."""
    wanted = {tuple(getattr(d, "aux_layers", ()) or ()) for d in drafter_sources(drafter)} - {()}
    if len(wanted) > 1:
        raise ValueError(f"drafter: its sources read different target layers {sorted(wanted)}; one set of "
                         "auxiliary hidden states a run")
    return wanted.pop() if wanted else ()


def verify_step(target: TargetModel, cache, tree: Tree, sampling: SamplingParams, out: "_Output", target_pass=None):
    """The step's device work after the tree is built, one function of fixed shapes per tree size
    N (no host sync, no data-dependent shape; a streamer or stopping criteria add their own host
    work in out.record): the target's pass over the N nodes, tree_accept, the emitted tokens
    recorded, and the commit of the live sequences' accepted rows (finished ones stop growing:
    their committed rows stay below longest + max_new - 1, so their later trees fit the cache).
    Returns (hidden [B, N, d], accept_index [B, N], accept_lens [B], next_token [B], emitted
    [B, N], live [B]). ``torch.compile(verify_step, fullgraph=True)`` traces it whole
    (tests/test_engine_syncs.py), the property a CUDA-graph capture per tree size needs.
    target_pass: ``verify``'s replacement, the compiled pass of compiled.py (None = verify)."""
    hidden, logits = (target_pass or verify)(target, cache, tree)
    accept_index, accept_lens, next_token = accept(tree, logits, sampling)
    emitted = shift_in(tree.tokens.gather(1, accept_index.clamp(min=0)), accept_lens, next_token)
    live = out.record(emitted, accept_lens)
    cache.commit(accept_index, accept_lens * live)
    return hidden, accept_index, accept_lens, next_token, emitted, live


def first_token(target: TargetModel, hidden: torch.Tensor, lens: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    last = gather_rows(hidden, (lens - 1)[:, None])  # [B, 1, d]: logits only where needed
    logits = target.logits(last)[:, 0]
    return sample(probabilities(logits, sampling)) if sampling.do_sample else logits.argmax(dim=-1)


class _Output:
    """Generated tokens per sequence, EOS / max_new_tokens / stopping criteria bookkeeping."""

    def __init__(self, input_ids: torch.Tensor, settings: DecodeSettings, slack: int):
        B, dev = input_ids.shape[0], input_ids.device
        self.input_ids = input_ids
        self.settings = settings
        self.limit = settings.max_new_tokens
        # slack columns: a step writes all N emitted tokens before knowing how many count
        self.tokens = torch.zeros(B, self.limit + slack, dtype=torch.int64, device=dev)
        self.lens = torch.zeros(B, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.eos = torch.tensor(settings.eos_token_ids, dtype=torch.int64, device=dev)
        # without an EOS, transformers keeps generating a sequence whose stopping criterion fired
        # until every sequence's has: where each first fired (host side, _host_side)
        self.stopped_at: list = [None] * B

    def ensure_slack(self, width: int) -> None:
        if self.tokens.shape[1] < self.limit + width:
            grown = self.tokens.new_zeros(self.tokens.shape[0], self.limit + width)
            grown[:, :self.tokens.shape[1]] = self.tokens
            self.tokens = grown

    def record(self, emitted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append the first counts[b] tokens of emitted[b] to every live sequence, cut at its
        first EOS and at max_new_tokens. Returns still live [B] (on the device: no host sync)."""
        live = ~self.finished
        n = emitted.shape[1]
        col = torch.arange(n, device=emitted.device)
        valid = col[None, :] < counts[:, None]
        is_eos = valid & torch.isin(emitted, self.eos) if len(self.eos) else torch.zeros_like(valid)
        hit_eos = is_eos.any(dim=1)
        upto = torch.where(hit_eos, is_eos.to(torch.int8).argmax(dim=1) + 1, counts)
        room = self.limit - self.lens
        keep = torch.minimum(upto, room) * live
        self.ensure_slack(n)
        self.tokens.scatter_(1, self.lens[:, None] + col, emitted)  # columns past lens + keep are scratch
        host_side = bool(self.settings.stopping_criteria) or self.settings.streamer is not None
        before = self.lens.clone() if host_side else None
        # in place: a captured step (capture.py) updates the tensors it was captured with
        self.lens.add_(keep)
        self.finished |= (hit_eos & (upto <= room)) | (self.lens >= self.limit)
        if host_side:
            self._host_side(before, keep)
        return ~self.finished

    def _host_side(self, before: torch.Tensor, keep: torch.Tensor) -> None:
        """User stopping criteria (token by token, each sequence alone, as transformers would see
        it) and the streamer. One host sync."""
        before_h, keep_h = before.tolist(), keep.tolist()
        for b, (start, n) in enumerate(zip(before_h, keep_h)):
            for j in range(n if self.settings.stopping_criteria and self.stopped_at[b] is None else 0):
                ids = torch.cat([self.input_ids[b], self.tokens[b, :start + j + 1]])[None]
                if any(bool(c(ids, None).all()) for c in self.settings.stopping_criteria):
                    if len(self.eos):     # transformers pads a finished sequence when it has an EOS
                        keep_h[b] = j + 1
                        self.lens[b] = start + j + 1
                        self.finished[b] = True
                    self.stopped_at[b] = start + j + 1
                    break
        if not len(self.eos) and all(at is not None for at in self.stopped_at):
            # every criterion fired: the batch ends at the last one's length, each sequence
            # generated up to it (transformers' lockstep batch); those ahead are cut there
            self.limit = min(self.limit, max(self.stopped_at))
            keep_h = [max(0, min(n, self.limit - start)) for start, n in zip(before_h, keep_h)]
            self.lens.clamp_(max=self.limit)
            self.finished |= self.lens >= self.limit
        if self.settings.streamer is not None:
            self.settings.streamer.put(self.tokens[0, before_h[0]:before_h[0] + keep_h[0]].cpu())

    def padded(self, pad_token_id: int) -> torch.Tensor:
        """[B, longest] new tokens, shorter sequences padded (like transformers' generate)."""
        longest = int(self.lens.max())
        col = torch.arange(longest, device=self.tokens.device)
        return torch.where(col[None, :] < self.lens[:, None], self.tokens[:, :longest], pad_token_id)


def start(target: TargetModel, cache, rows: torch.Tensor, lens: torch.Tensor, drafter: Drafter | None,
          builder: TreeBuilder, out: "_Output", settings: DecodeSettings, max_len: int):
    """Prefill, the first token (recorded) and the drafter's and builder's fresh state. Returns the
    first root [B] and the drafter's first input (None without a drafter)."""
    hidden = prefill(target, cache, rows, lens)
    root = first_token(target, hidden, lens, settings.sampling)
    out.record(root[:, None], torch.ones_like(lens))
    pending = None
    if drafter is not None:
        drafter.reset(rows.shape[0], max_len, target.device, target.dtype)
        for source in drafter_sources(drafter):   # drafters that read the whole sequence (PARD) need token 0
            if hasattr(source, "begin"):
                source.begin(rows[:, 0])
        pending = DraftInput(shift_in(rows, lens, root), hidden, lens)
    builder.reset()
    return root, pending


def draft_and_build(drafter: Drafter | None, builder: TreeBuilder, root: torch.Tensor, pending: DraftInput | None,
                    out: "_Output") -> Tree | None:
    """The step up to its tree: the device drafting, the step's one host sync (all done?, prompt
    lookup's new tokens, what the builder asked for), the host drafting, the tree. None when every
    sequence is done."""
    candidates = features = None
    host_drafting = drafter is not None and drafter.wants_host_tokens
    if drafter is not None:
        features = pending.features if drafter.needs_features else None
        candidates = (drafter.launch(pending.tokens, features, pending.lens) if host_drafting
                      else drafter.step(pending.tokens, features, pending.lens))
    parts = [out.finished.all()]
    if host_drafting:
        parts += [pending.lens, pending.tokens]
    requested = builder.host_request(candidates)
    host = host_copy(parts + requested)
    if host[0]:
        return None
    if requested:
        builder.receive(host[len(parts):])
    if host_drafting:
        candidates = drafter.step(pending.tokens, features, pending.lens, host=HostTokens(host[2], host[1]))
    return builder.build(root, candidates)


def decode(target: TargetModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, drafter: Drafter | None,
           builder: TreeBuilder, settings: DecodeSettings, stats: GenerationStats | None = None,
           pad_token_id: int = 0, cuda_graph: bool = False, compile: bool | None = None) -> torch.Tensor:
    """Generate up to settings.max_new_tokens for each left-padded prompt; returns the new
    tokens [B, G] (G = the longest sequence's count; shorter ones padded with pad_token_id).
    cuda_graph: capture the verify step per tree-size bucket and replay it (capture.py).
    compile: run the target's pass compiled per tree-size bucket on the CPU: True from the first
    step, None once a shape has earned it, False never (compiled.py)."""
    capture_kind = capture.check_options(cuda_graph, target.device, settings)
    compile_mode = compiled.check_options(compile, target.device, cuda_graph)
    builder = builder if drafter is not None else RootOnly()
    recorder = StatsRecorder(stats, target.device)
    rows, lens, longest = pack_prompts(input_ids, attention_mask)
    # a live sequence has committed fewer than longest + max_new_tokens - 1 rows; a tree goes after them
    committed = longest + settings.max_new_tokens - 1
    largest_tree = builder.max_size(drafter_depth(drafter)) or 1
    capacity = committed + largest_tree   # compiled: rounded up, so that other lengths reuse the graphs
    cache = target.new_cache(rows.shape[0], compiled.cache_rows(capacity) if compile_mode else capacity)
    out = _Output(input_ids, settings, slack=largest_tree)

    def verify_tree(tree: Tree, *target_pass):   # compiled.CompiledVerify passes its compiled pass
        return verify_step(target, cache, tree, settings.sampling, out, *target_pass)
    if capture_kind is not None:
        verify_tree = capture.GraphedVerify(verify_tree, cache, out, largest_tree, capture_kind)
    elif compile_mode:
        verify_tree = compiled.CompiledVerify(verify_tree, verify, out, largest_tree, target.model, cache.kv.shape[4],
                                              compile_mode)
    if settings.streamer is not None:
        settings.streamer.put(input_ids.cpu())
    with torch.inference_mode(), target.attention(), target.aux_hidden_states(aux_layers(drafter)):
        root, pending = start(target, cache, rows, lens, drafter, builder, out, settings, committed + 1)
        recorder.lap("prefill")
        # a step commits at least one token of every live sequence: max_new_tokens - 1 steps at
        # most, then the one that reads "all done" (more means the step's state went stale)
        for _ in range(settings.max_new_tokens):
            tree = draft_and_build(drafter, builder, root, pending, out)
            if tree is None:
                break
            cache.reserve(committed + tree.size)   # sized for it already
            recorder.lap("draft")
            was_live = ~out.finished
            hidden, accept_index, accept_lens, root, emitted, live = verify_tree(tree)
            builder.observe(accept_lens * live, accept_index)
            if drafter is not None:  # finished sequences feed nothing (lens 0): the drafter stops growing too
                pending = DraftInput(emitted, gather_rows(hidden, accept_index.clamp(min=0)), accept_lens * live)
            recorder.lap("verify")
            recorder.step(tree.size, accept_lens, was_live)
        else:
            raise RuntimeError(f"the decoding loop ran {settings.max_new_tokens} steps without finishing (a bug: a "
                               f"step committed nothing for a live sequence{'; try cuda_graph=False' if capture_kind else ''})")
    if settings.streamer is not None:
        settings.streamer.end()
    result = out.padded(pad_token_id)
    recorder.finish(out)
    return result
