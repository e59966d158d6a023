"""generate(..., cuda_graph=True): the verify step captured per tree-size bucket (parallelspec.capture).

On the CPU, cuda_graph=True with the "trace" capture (capture.OFF_GPU_CAPTURE, set here) captures the step as a record of its aten ops (make_fx) on the
same static buffers, bucket padding, warm-up and undo, and replays the record without running the
step's Python again, as a CUDA graph replays its kernels: the loop must give the uncaptured
loop's tokens and acceptances (and transformers' greedy output) for every drafter and tree kind.
The "eager" capture runs the step's Python each time, so the tests can watch it: one set of
buffers per bucket, reused step after step, and no more than one host sync a step. The GPU test
(skipped here) captures for real and compares with transformers' generate on the same GPU
(benchmarks/gpu_check.sh runs it in its loop stage)."""
import pytest
import torch

import ps_kernels
import parallelspec as ps
from parallelspec import capture as graphs, engine
from parallelspec.trees import AutoTree
from parallelspec.trees import ChainTree, Tree, TreeBuilder
from engine_helpers import hf_greedy, left_padded, tiny_model
from helpers import runnable_backends
from test_engine import _network_drafter, _wide_model
from test_engine_syncs import BUDGET, TREES, VOCAB, step_syncs

NEW = 20

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def trace_capture(monkeypatch):
    """cuda_graph=True off a GPU runs the "trace" capture in these tests ("eager" where a test says)."""
    monkeypatch.setattr(graphs, "OFF_GPU_CAPTURE", "trace")


@pytest.fixture(scope="module")
def case():
    """A tiny Llama, a batch of left-padded prompts whose tails repeat (prompt lookup matches, so
    trees of many sizes are drafted) and transformers' greedy output."""
    model = tiny_model("llama", VOCAB)
    ids, mask = left_padded([6, 9, 2], VOCAB)
    ids[:, -4:] = ids[:, -8:-4]
    return model, ids, mask, hf_greedy(model, ids, mask, NEW)


def _drafter(kind, model):
    return None if kind is None else ps.NgramDrafter(num_tokens=4) if kind == "ngram" else _network_drafter(kind, model)


def _tree(tree, max_nodes=10):
    """tree= for generate: an AutoTree on a fixed cost table (its sizes vary step by step) for "auto"."""
    return AutoTree({1: 1.0, 64: 1.05}, max_nodes=max_nodes) if tree == "auto" else tree


class _Spy:
    """Every GraphedVerify made during a test, and the (N, bucket) of each tree it was given."""

    def __init__(self, monkeypatch):
        self.made, self.sizes = [], []
        init, call = graphs.GraphedVerify.__init__, graphs.GraphedVerify.__call__

        def spy_init(gv, *args, **kwargs):
            init(gv, *args, **kwargs)
            self.made.append(gv)

        def spy_call(gv, tree):
            self.sizes.append((tree.size, graphs.bucket(tree.size, gv.largest)))
            return call(gv, tree)
        monkeypatch.setattr(graphs.GraphedVerify, "__init__", spy_init)
        monkeypatch.setattr(graphs.GraphedVerify, "__call__", spy_call)


def test_bucket_sizes():
    assert [graphs.bucket(n, 10) for n in range(1, 13)] == [1, 2, 4, 4, 8, 8, 8, 8, 10, 10, 11, 12]
    assert [graphs.bucket(n, 64) for n in (1, 17, 33, 64)] == [1, 32, 64, 64]


def _random_tree(B, N, shared, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(1 if shared else B):
        rows.append([-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, N)])
    parents = torch.tensor(rows[0] if shared else rows)
    depths = torch.zeros_like(parents)
    for i in range(1, N):
        depths[..., i] = depths.gather(-1, parents[..., i:i + 1].clamp(min=0)).squeeze(-1) + 1
    tokens = torch.randint(0, 8, (B, N), generator=g)
    return Tree(tokens, parents, depths, ps_kernels.tree_mask_from_parents(parents))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("backend", runnable_backends("tree_accept", torch.device("cpu"), include_reference=True))
def test_padding_is_never_accepted(shared, backend):
    """A tree padded to its bucket (leaves under the root with node 1's token) accepts what the
    tree does, greedy and sampling, even where node 1's token is the root's argmax (so every pad
    node matches too); its mask is the padded parents' ancestor mask; and a smaller tree filled
    after a larger one leaves nothing of it behind."""
    B, V, size = 5, 8, 16
    buffers = None
    for N, seed in ((9, 0), (5, 1), (9, 2)):
        tree = _random_tree(B, N, shared, seed)
        logits = torch.randn(B, N, V, generator=torch.Generator().manual_seed(seed))
        logits[:2, 0, :] = -10.0
        logits[torch.arange(2), 0, tree.tokens[:2, 1]] = 10.0   # node 1 (and so every pad node) matches at the root
        buffers = buffers or graphs.TreeBuffers(tree, size)
        buffers.fill(tree)
        padded = buffers.tree
        assert torch.equal(padded.mask, ps_kernels.tree_mask_from_parents(padded.parents))
        fresh = graphs.TreeBuffers(tree, size)
        fresh.fill(tree)
        for a, b in zip((padded.tokens, padded.parents, padded.depths), (fresh.tree.tokens, fresh.tree.parents,
                                                                          fresh.tree.depths)):
            assert torch.equal(a, b)
        padded_logits = torch.cat([logits, torch.randn(B, size - N, V)], dim=1)
        uniforms = torch.rand(B, size)
        for mode in ("greedy", "sample"):
            # contiguous: the Triton wrapper reads uniforms as [B, N] contiguous whatever their strides
            extra = {} if mode == "greedy" else {"uniforms": uniforms[:, :N].contiguous()}
            target = logits if mode == "greedy" else logits.softmax(-1)
            want = ps_kernels.tree_accept(tree.tokens, tree.parents, target, mode=mode, backend=backend, **extra)
            extra = {} if mode == "greedy" else {"uniforms": uniforms}
            padded_target = padded_logits if mode == "greedy" else padded_logits.softmax(-1)
            got = ps_kernels.tree_accept(padded.tokens, padded.parents, padded_target, mode=mode, backend=backend,
                                         **extra)
            assert torch.equal(got[0][:, :N], want[0]) and (got[0][:, N:] == -1).all(), mode
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), mode


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("kind", [None, "ngram", "parallel", "hybrid"])
def test_static_buffers_give_the_plain_loop_and_hf(case, kind, tree):
    """cuda_graph=True ("trace" capture): the captured loop's code path (static buffers per bucket, padding,
    warm-up undone, in-place bookkeeping) gives the plain loop's tokens, steps and acceptances,
    and transformers' greedy output."""
    if kind is None and tree != "chain":
        pytest.skip("no drafter: the tree is the root alone whatever its kind")
    model, ids, mask, reference = case
    runs = []
    for cuda_graph in (False, True):
        out, stats = ps.generate(model, ids, _drafter(kind, model), attention_mask=mask, max_new_tokens=NEW,
                                 tree=_tree(tree), return_stats=True, cuda_graph=cuda_graph, **TREES[tree])
        runs.append((out, stats.steps, stats.accept_histogram))
    torch.testing.assert_close(runs[1][0], reference, rtol=0, atol=0)
    assert runs[0][1:] == runs[1][1:]


@pytest.mark.parametrize("kind", ["ngram", "hybrid"])
def test_one_set_of_buffers_per_bucket(case, kind, monkeypatch):
    """The step runs on the same tensors (same addresses) every time a bucket comes back, each
    bucket is captured once, smaller trees are padded, and nothing the step updates in place
    (cache, output) is reallocated."""
    model, ids, mask, reference = case
    spy = _Spy(monkeypatch)
    seen = {}
    step = engine.verify_step

    def recording(target, cache, tree, sampling, out):
        ptrs = (tree.tokens.data_ptr(), tree.parents.data_ptr(), tree.depths.data_ptr(),
                None if tree.mask is None else tree.mask.data_ptr(), cache.kv.data_ptr(), out.tokens.data_ptr(),
                out.lens.data_ptr(), out.finished.data_ptr(), cache.lens.data_ptr())
        seen.setdefault(tree.size, set()).add(ptrs)
        return step(target, cache, tree, sampling, out)
    monkeypatch.setattr(engine, "verify_step", recording)
    monkeypatch.setattr(graphs, "OFF_GPU_CAPTURE", "eager")   # the step's Python runs (and is watched) every step
    out = ps.generate(model, ids, _drafter(kind, model), attention_mask=mask, max_new_tokens=NEW, tree=_tree("auto"),
                      cuda_graph=True)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    (gv,) = spy.made
    assert set(seen) <= {1, 2, 4, 8, 10}, seen                       # buckets of a 10-node AutoTree
    assert all(len(p) == 1 for p in seen.values()), seen            # one set of buffers per bucket
    assert len({p[4:] for ptrs in seen.values() for p in ptrs}) == 1   # the state never moved
    assert gv.captures == len(gv.captured) == len(seen)
    assert any(n < b for n, b in spy.sizes), spy.sizes              # some trees were padded
    assert len(spy.sizes) >= 2 * len(seen)                          # buckets came back


@pytest.mark.parametrize("tree", ["chain", "auto"])
@pytest.mark.parametrize("kind", ["ngram", "hybrid"])
def test_at_most_one_host_sync_a_step(case, kind, tree, monkeypatch):
    """Copying the tree into its bucket's buffers and the outputs out adds no host sync."""
    monkeypatch.setattr(graphs, "OFF_GPU_CAPTURE", "eager")   # eager: record() marks the steps
    steps, _ = step_syncs(case[0], kind, tree, cuda_graph=True)
    worst = max(steps, key=len)
    assert len(steps) >= 3 and len(worst) <= BUDGET, f"{kind} x {tree}: {len(worst)} host syncs in a step: {worst}"


def test_eos_and_max_new_tokens_in_place(case):
    """Per-sequence EOS and max_new_tokens through the in-place bookkeeping of the captured step."""
    model, ids, mask, reference = case
    eos = int(reference[1, ids.shape[1] + 3])
    want = hf_greedy(model, ids, mask, NEW, eos_token_id=eos, pad_token_id=0)
    for kind, tree in ((None, "chain"), ("ngram", "auto"), ("hybrid", "dynamic")):
        out = ps.generate(model, ids, _drafter(kind, model), attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                          pad_token_id=0, tree=_tree(tree), cuda_graph=True, **TREES[tree])
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    for max_new in (1, 3):
        out = ps.generate(model, ids, _drafter("ngram", model), attention_mask=mask, max_new_tokens=max_new,
                          tree=_tree("auto"), cuda_graph=True)
        torch.testing.assert_close(out, reference[:, :ids.shape[1] + max_new], rtol=0, atol=0)


class _GrowingChain(TreeBuilder):
    """A chain one node longer every step that cannot tell its largest tree: the cache grows
    during the generation, so what was captured must be captured again."""

    def reset(self):
        self.steps = 0

    def build(self, root, candidates):
        self.steps += 1
        return ChainTree(depth=min(self.steps, candidates.depth)).build(root, candidates)


def test_captured_again_when_the_cache_grows(case, monkeypatch):
    model, ids, mask, reference = case
    spy = _Spy(monkeypatch)
    builder = _GrowingChain()
    out = ps.generate(model, ids, ps.NgramDrafter(num_tokens=4), attention_mask=mask, max_new_tokens=NEW,
                      tree=builder, cuda_graph=True)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    (gv,) = spy.made
    assert gv.cache.reallocations >= 2 and gv.captures > len(gv.captured)


def test_patch_passes_cuda_graph_on(case, monkeypatch):
    """parallelspec.patch(model, drafter, cuda_graph=...) : model.generate runs the captured loop."""
    model, ids, mask, reference = case
    spy = _Spy(monkeypatch)
    ps.patch(model, ps.NgramDrafter(num_tokens=4), cuda_graph=True, tree=_tree("auto"))
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    finally:
        ps.unpatch(model)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert len(spy.made) == 1 and spy.made[0].captures >= 1


def test_cuda_graph_refusals(case, monkeypatch):
    from transformers.generation.streamers import BaseStreamer

    model, ids, mask, _ = case
    run = dict(attention_mask=mask, max_new_tokens=4)
    if not torch.cuda.is_available():
        monkeypatch.setattr(graphs, "OFF_GPU_CAPTURE", None)   # as users run it: refused off a GPU
        def measured(*args, **kwargs):
            raise AssertionError("tree='auto' measured the verify cost before the refusal")
        monkeypatch.setattr(AutoTree, "for_model", measured)
        with pytest.raises(ValueError, match="cuda_graph: expected a model on a CUDA device, got cpu"):
            ps.generate(model, ids, ps.NgramDrafter(), cuda_graph=True, **run)   # tree="auto" by default
        monkeypatch.setattr(graphs, "OFF_GPU_CAPTURE", "trace")
    for value in ("yes", "trace", "eager"):   # the test captures are no values of the option
        with pytest.raises(ValueError, match=f"cuda_graph: expected True or False, got '{value}'"):
            ps.generate(model, ids, None, cuda_graph=value, **run)
    with pytest.raises(ValueError, match=r"cuda_graph: only greedy decoding \(do_sample=False\)"):
        ps.generate(model, ids, None, cuda_graph=True, do_sample=True, **run)
    with pytest.raises(ValueError, match="cuda_graph: .* the streamer given needs"):
        ps.generate(model, ids[:1], None, attention_mask=mask[:1], max_new_tokens=4, cuda_graph=True,
                    streamer=BaseStreamer())


# -- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
@pytest.mark.parametrize("kind, tree, width", [(None, "chain", "narrow"), ("ngram", "chain", "narrow"),
                                               ("ngram", "auto", "narrow"), ("parallel", "dynamic", "narrow"),
                                               ("hybrid", "auto", "narrow"), ("hybrid", "dynamic", "wide"),
                                               ("hybrid", "auto", "wide")])
def test_greedy_on_cuda_graph_matches_hf(kind, tree, width, monkeypatch):
    """generate(cuda_graph=True) on the GPU: the verify step captured per bucket (native CUDA
    kernels; Triton attention on the wide model's 8+ node trees; cuBLAS) and replayed gives
    transformers' greedy tokens on the same GPU, and (drafts from tokens alone) the plain loop's
    steps and acceptances. The wide model's GQA group (4) takes trees of 8+ nodes to Triton."""
    model = _wide_model(torch.float32) if width == "wide" else tiny_model("llama", VOCAB).to("cuda")
    ids, mask = left_padded([6, 9, 2], VOCAB)
    ids[:, -4:] = ids[:, -8:-4]
    ids, mask = ids.to("cuda"), mask.to("cuda")
    reference = hf_greedy(model, ids, mask, NEW)
    spy = _Spy(monkeypatch)
    runs = []
    for cuda_graph in (False, True):
        out, stats = ps.generate(model, ids, _drafter(kind, model), attention_mask=mask, max_new_tokens=NEW,
                                 tree=_tree(tree, 16), tree_nodes=16, return_stats=True, cuda_graph=cuda_graph)
        runs.append((out, stats.steps, stats.accept_histogram))
    (gv,) = spy.made
    assert gv.capture == "cuda" and gv.captures >= 1
    assert runs[1][0].device.type == "cuda"
    torch.testing.assert_close(runs[1][0], reference, rtol=0, atol=0)
    if kind in (None, "ngram"):   # drafts from tokens alone; a network's from features, whose last bits may
        assert runs[0][1:] == runs[1][1:]   # differ where a padded tree takes another kernel (CUDA / Triton)
