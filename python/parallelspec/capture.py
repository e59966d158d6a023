"""The verify step captured once per tree-size bucket and replayed (``generate(..., cuda_graph=True)``).

A CUDA graph replays fixed kernels on fixed memory, as gpt-fast's and vLLM's decode steps do.
``GraphedVerify`` wraps the loop's step function (``engine.verify_step`` over the step's tree):

- the tree is copied into the static buffers of its bucket (``TreeBuffers``): N padded up to the
  next power of two, capped at the largest tree the cache was sized for (a tree past it, from a
  builder that cannot tell its largest, gets a bucket of its own size);
- a pad node is a leaf under the root carrying node 1's token: the walk tries node 1 first, so a
  pad node is never accepted (greedy: node 1 matches first; sampling: node 1's token has no mass
  left when the pad node is tried), as ``AutoTree`` pads its per-sequence trees; its K/V land in
  scratch rows past the committed ones;
- the first tree of a bucket runs the step once (warm-up: Triton compiles, cuBLAS sets up), the
  warm-up's commit is undone (cache and output lengths restored; the rows it wrote are scratch),
  and the step is captured; every later tree of the bucket is copied in and the graph replayed;
- the state the step updates in place (the cache's kv and lens, the output's tokens, lens and
  finished flags) is captured by address: a reallocation (a cache grown for a tree past the
  largest) drops the graphs, which are then captured again;
- the outputs are copied out of the graph's buffers and cut back to the tree's N, so the loop
  sees what the uncaptured step returns and may keep them past the next replay.

Two more captures run off a GPU, for the CPU tests (``OFF_GPU_CAPTURE``, set by the tests only): ``"trace"`` records the step's aten ops with
``make_fx`` (the tensors it reads and updates held by reference, as a CUDA graph holds their
addresses) and replays that record, without running the Python of the step again, so state the
step rebinds instead of updating in place goes stale there as it would in a graph; ``"eager"``
runs the step's Python over the same buffers every time (so tests can watch what it is given).

Only greedy decoding is captured (``check_options``): sampling draws uniforms from torch's
generator inside the step; the default CUDA generator is graph-safe, but the captured sampling
path has not run on a GPU yet. Streamers and user stopping criteria read the tokens on the host
inside the step's bookkeeping, which a captured step cannot do.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from ps_kernels import tree_mask_from_parents

from .trees import Tree

CAPTURES = ("cuda", "trace", "eager")
#: what ``cuda_graph=True`` captures where the model is not on a GPU: None (refused); the CPU tests
#: set "trace" or "eager" to run the captured loop's code path there
OFF_GPU_CAPTURE: str | None = None


def check_options(cuda_graph, device: torch.device, settings) -> str | None:
    """generate()'s ``cuda_graph`` (True or False) checked against the device and the decoding
    settings; returns the capture to use ("cuda", or off a GPU ``OFF_GPU_CAPTURE``), or None."""
    if cuda_graph is False or cuda_graph is None:
        return None
    if cuda_graph is not True:
        raise ValueError(f"cuda_graph: expected True or False, got {cuda_graph!r}")
    kind = "cuda" if device.type == "cuda" else OFF_GPU_CAPTURE
    if kind is None:
        raise ValueError(f"cuda_graph: expected a model on a CUDA device, got {device.type} (CUDA graphs capture "
                         "GPU kernels; leave cuda_graph=False elsewhere)")
    if settings.sampling.do_sample:
        raise ValueError("cuda_graph: only greedy decoding (do_sample=False) is captured, got do_sample=True; pass "
                         "cuda_graph=False to sample")
    if settings.streamer is not None or settings.stopping_criteria:
        what = "streamer" if settings.streamer is not None else "stopping_criteria"
        raise ValueError(f"cuda_graph: a captured step cannot hand its tokens to the host every step, which the "
                         f"{what} given needs; pass cuda_graph=False with a streamer or stopping criteria")
    return kind


def bucket(n: int, largest: int) -> int:
    """The size a tree of n nodes is padded to: the next power of two, at most `largest` (the
    most nodes the cache has room for); n itself when n >= largest."""
    return n if n >= largest else min(1 << (n - 1).bit_length(), largest)


def _padding_template(like: torch.Tensor, size: int, values: torch.Tensor) -> torch.Tensor:
    """values [size] (or [size, W]) expanded to the leading dims of `like` (shared or per sequence)."""
    lead = like.shape[:like.dim() - values.dim()]
    return values.expand(*lead, *values.shape).contiguous()


class TreeBuffers:
    """A tree's tensors for `size` nodes, allocated once; ``fill`` copies a tree of at most
    `size` nodes (same layout: shared or per-sequence parents, depths and mask) in, padded."""

    def __init__(self, like: Tree, size: int):
        dev = like.tokens.device
        pad_parents = torch.zeros(size, dtype=torch.int64, device=dev)
        pad_parents[0] = -1                       # the root, then leaves under it
        self.size = size
        self.parents_pad = _padding_template(like.parents, size, pad_parents)
        self.depths_pad = _padding_template(like.depths, size, (pad_parents >= 0).to(torch.int64))
        self.mask_pad = (None if like.mask is None else
                         _padding_template(like.mask, size, tree_mask_from_parents(pad_parents, validate=False)))
        self.tree = Tree(like.tokens.new_zeros(like.tokens.shape[0], size), self.parents_pad.clone(),
                         self.depths_pad.clone(), None if self.mask_pad is None else self.mask_pad.clone())

    def fill(self, tree: Tree) -> None:
        n, t = tree.size, self.tree
        t.tokens[:, :n].copy_(tree.tokens)
        if n < self.size:    # n >= 2 here: bucket(1) is 1
            t.tokens[:, n:].copy_(tree.tokens[:, 1:2].expand(-1, self.size - n))
        for buf, pad, src in ((t.parents, self.parents_pad, tree.parents), (t.depths, self.depths_pad, tree.depths)):
            if n < self.size:
                buf.copy_(pad)
            buf[..., :n].copy_(src)
        if t.mask is not None:
            if n < self.size:
                t.mask.copy_(self.mask_pad)  # pad rows: root + self; real rows: zero past their words
            t.mask[..., :n, :tree.mask.shape[-1]].copy_(tree.mask)


def layout(tree: Tree) -> tuple:
    """What, besides N, fixes a tree's buffer shapes."""
    return tree.parents.dim(), tree.depths.dim(), None if tree.mask is None else tree.mask.dim()


class GraphedVerify:
    """``step(tree)`` (the loop's verify_step over one tree) run on static buffers, captured once
    per (bucket, layout). ``cache`` and ``out`` are the KVCache and the output bookkeeping the
    step updates in place; ``largest`` the most tree nodes the cache was sized for."""

    def __init__(self, step: Callable[[Tree], tuple], cache, out, largest: int, capture: str = "cuda"):
        if capture not in CAPTURES:
            raise ValueError(f"capture: expected one of {CAPTURES}, got {capture!r}")
        self.step, self.cache, self.out, self.largest, self.capture = step, cache, out, largest, capture
        self.captured: dict[tuple, tuple[TreeBuffers, Callable[[], tuple]]] = {}
        self.captures = 0
        self._storage = None
        self._pool = torch.cuda.graph_pool_handle() if capture == "cuda" else None

    def __call__(self, tree: Tree) -> tuple:
        # a graph is captured and replayed on its device's current stream: the model's device,
        # which need not be the current one (cuda:N)
        with torch.cuda.device(self.cache.kv.device) if self.capture == "cuda" else contextlib.nullcontext():
            return self._run(tree)

    def _run(self, tree: Tree) -> tuple:
        n = tree.size
        size = bucket(n, self.largest)
        self.out.ensure_slack(size)     # before the addresses are taken: no growth inside the step
        storage = (self.cache.kv.data_ptr(), self.out.tokens.data_ptr())
        if storage != self._storage:    # first call, or the state moved: what was captured is stale
            self.captured.clear()
            self._storage = storage
        key = (size, layout(tree))
        entry = self.captured.get(key)
        if entry is None:
            buffers = TreeBuffers(tree, size)
            buffers.fill(tree)
            entry = self.captured[key] = (buffers, self._capture(buffers.tree))
        else:
            entry[0].fill(tree)
        return tuple(o[:, :n].clone() if o.dim() >= 2 else o.clone() for o in entry[1]())

    def _capture(self, tree: Tree) -> Callable[[], tuple]:
        """Warm up, undo the warm-up's commit, capture; returns what replays the step."""
        def run():
            return self.step(tree)
        self.captures += 1
        with self._undone():
            self._warm_up(run)
        if self.capture == "eager":
            return run
        if self.capture == "trace":
            from torch.fx.experimental.proxy_tensor import make_fx
            with self._undone():     # tracing runs the step too
                return make_fx(run)()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = run()
        except RuntimeError as exc:
            raise RuntimeError(f"cuda_graph: capturing the verify step of a {tree.size}-node tree failed ({exc}); "
                               "pass cuda_graph=False") from exc

        def replay():
            graph.replay()
            return outputs
        return replay

    def _warm_up(self, run: Callable[[], tuple]) -> None:
        """Run the step once, on a side stream on CUDA (as torch.cuda.graph asks)."""
        if self.capture != "cuda":
            run()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)

    @contextlib.contextmanager
    def _undone(self):
        """Restore the lengths a run of the step advanced: the rows and columns it wrote past
        them are scratch."""
        state = [self.cache.lens, self.out.lens, self.out.finished]
        saved = [s.clone() for s in state]
        yield
        for s, v in zip(state, saved):
            s.copy_(v)
