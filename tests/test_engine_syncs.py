"""Host syncs per decoding step: at most one (the "all done?" read, which also carries what the
host needs for the next step) for every drafter and tree kind. Counted on the CPU by
instrumentation (sync_counter.py), per step: the events between consecutive calls of the loop's
per-step bookkeeping (engine._Output.record), the last one ending where the loop's result is
read (engine._Output.padded)."""
import pytest
import torch

import parallelspec as ps
from parallelspec import engine
from engine_helpers import left_padded, tiny_model
from sync_counter import count_step_syncs

VOCAB = 256
BUDGET = 1
TREES = {"chain": {}, "static": {"tree_choices": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]},
         "dynamic": {"tree_nodes": 8}, "auto": {}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", VOCAB)


def _drafter(kind, model):
    from parallelspec.drafters import build_network

    if kind is None:
        return None
    if kind == "ngram":
        return ps.NgramDrafter(num_tokens=4)
    # peagle: the layout over aux hidden states, which the verify pass gathers (tiny_model has 2 layers)
    net = (build_network(model, parallel=True, depth=3, layout="peagle", aux_layers=[1, 0, 1], seed=2)
           if kind == "peagle" else build_network(model, parallel=kind != "eagle", depth=3, seed=2))
    drafter = (ps.EagleDrafter if kind == "eagle" else ps.ParallelDrafter)(net, top_m=4)
    if kind == "hybrid":   # the shipped options: the network sits out steps where prompt lookup matched
        drafter = ps.HybridDrafter([ps.NgramDrafter(num_tokens=4), drafter], defer_on_match=3)
    return drafter


def step_syncs(model, kind, tree, batch=(6, 9), **sampling):
    from parallelspec.trees import AutoTree

    ids, mask = left_padded(list(batch), VOCAB)
    # repeated prompts: prompt lookup matches, so its chains (and the hybrid's deferral) are exercised
    ids[:, -4:] = ids[:, -8:-4]
    builder = AutoTree({1: 1.0, 64: 1.05}, max_nodes=10) if tree == "auto" else tree
    drafter = _drafter(kind, model)
    out = {}

    def run():
        out["ids"] = ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=20, tree=builder,
                                 **TREES[tree], **sampling)
    counter = count_step_syncs(run, (engine._Output, "record"), (engine._Output, "padded"))
    # [0]: prompt packing and prefill; then one interval a step; [-1]: after the loop
    steps = counter.intervals[1:-1]
    return steps, out["ids"]


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("kind", [None, "ngram", "parallel", "peagle", "eagle", "hybrid"])
def test_at_most_one_host_sync_a_step(model, kind, tree):
    if kind is None and tree != "chain":
        pytest.skip("no drafter: the tree is the root alone whatever its kind")
    steps, _ = step_syncs(model, kind, tree)
    assert len(steps) >= 3
    worst = max(steps, key=len)
    assert len(worst) <= BUDGET, f"{kind} x {tree}: {len(worst)} host syncs in a step: {worst}"


@pytest.mark.parametrize("tree", list(TREES))
def test_at_most_one_host_sync_a_step_when_a_sit_out_is_undone(model, tree, monkeypatch):
    """The hybrid's network sources run late (after the host read) when the step's copies show
    the copying that decided their sit-out has stopped: their candidates are not read (AutoTree
    places them blind), so such steps stay within one host sync too."""
    calls = []
    original = ps.NgramDrafter.step

    def bursts(self, tokens, features, lens, host=None):   # a 3-gram match on two steps out of three
        out = original(self, tokens, features, lens, host=host)
        calls.append(1)
        self.last_match_n = [3 if len(calls) % 3 else 0] * len(self.last_match_n)
        return out
    monkeypatch.setattr(ps.NgramDrafter, "step", bursts)
    hybrids = []
    original_init = ps.HybridDrafter.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        hybrids.append(self)
    monkeypatch.setattr(ps.HybridDrafter, "__init__", init)
    steps, _ = step_syncs(model, "hybrid", tree)
    assert hybrids[0].late_steps > 0, "no sit-out was undone"
    worst = max(steps, key=len)
    assert len(worst) <= BUDGET, f"hybrid x {tree}, late network runs: {len(worst)} host syncs in a step: {worst}"


@pytest.mark.parametrize("tree", ["dynamic", "auto"])
def test_at_most_one_host_sync_a_step_when_sampling(model, tree):
    """Sampling (temperature, top-k, top-p; lossless recursive rejection on the device) adds none."""
    steps, _ = step_syncs(model, "hybrid", tree, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    worst = max(steps, key=len)
    assert len(worst) <= BUDGET, f"hybrid x {tree}, sampling: {len(worst)} host syncs in a step: {worst}"


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("kind", [None, "ngram", "hybrid"])
def test_cache_sized_once(model, kind, tree, monkeypatch):
    """The target's KV cache is allocated once per generation, for prompt + max_new_tokens + the
    largest tree the builder may emit: no reallocation (no copy) while decoding."""
    from parallelspec import compiled
    from parallelspec.hf.target import TargetModel

    if kind is None and tree != "chain":
        pytest.skip("no drafter: the tree is the root alone whatever its kind")
    caches = []
    original = TargetModel.new_cache

    def capture(self, batch_size, capacity):
        cache = original(self, batch_size, capacity)
        caches.append((cache, cache.kv.data_ptr()))
        return cache
    monkeypatch.setattr(TargetModel, "new_cache", capture)
    step_syncs(model, kind, tree)
    (cache, ptr), = caches
    assert cache.reallocations == 0 and cache.kv.data_ptr() == ptr
    largest = {"chain": 5, "static": 7, "dynamic": 8, "auto": 10}[tree] if kind else 1
    needed = 9 + 20 - 1 + largest   # longest prompt + max_new_tokens - 1 + largest tree
    # the default (compile=None on the CPU) rounds the rows up, so that graphs it compiles serve other lengths
    assert cache.capacity == compiled.cache_rows(needed) and needed < cache.capacity


@pytest.mark.parametrize("shared_tree", [True, False])
def test_verify_step_traces_whole_with_torch_compile(model, shared_tree):
    """The step after the tree is built (the target's pass over N nodes, tree_accept, recording,
    the commit) is one graph for torch.compile(fullgraph=True): no host sync, no data-dependent
    shape hides in it (what a CUDA graph per tree size needs); and it computes what eager does."""
    import copy

    import ps_kernels
    from parallelspec.engine import DecodeSettings, _Output, verify_step
    from parallelspec.hf.target import TargetModel
    from parallelspec.sampling import SamplingParams
    from parallelspec.trees import Tree

    target = TargetModel(model)
    B, N = 2, 5
    parents = torch.tensor([-1, 0, 0, 1, 3]) if shared_tree else torch.tensor([[-1, 0, 0, 1, 3], [-1, 0, 1, 1, 0]])
    depths = torch.tensor([0, 1, 1, 2, 3]) if shared_tree else torch.tensor([[0, 1, 1, 2, 3], [0, 1, 2, 2, 1]])
    tree = Tree(torch.randint(0, VOCAB, (B, N)), parents, depths, ps_kernels.tree_mask_from_parents(parents))
    ids = torch.randint(1, VOCAB, (B, 6))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        cache = target.new_cache(B, 32)
        out = _Output(ids, DecodeSettings(max_new_tokens=8), slack=N)
        with torch.inference_mode(), target.attention():
            target.forward(ids, torch.arange(6).expand(B, -1), cache, None)
            cache.lens.fill_(6)
            fn = torch.compile(verify_step, fullgraph=True, backend="eager") if compiled else verify_step
            got = fn(target, cache, tree, SamplingParams(), out)
        results.append((copy.deepcopy([t.clone() for t in got]), cache.lens.clone(), cache.kv.clone()))
    (eager, lens_e, kv_e), (comp, lens_c, kv_c) = results
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b)
    assert torch.equal(lens_e, lens_c) and torch.equal(kv_e, kv_c)


# ------------------------------------------------------------ positive controls of the counter

def test_the_counter_sees_every_kind_of_sync():
    """Each host sync the module docstring of sync_counter names is counted once, with its line;
    device-side work is not counted."""
    from sync_counter import SyncCounter

    x = torch.arange(6)
    cases = {"int": lambda: int(x[0]), "float": lambda: float(x[1]), "bool": lambda: bool(x.any()),
             "item": lambda: x[2].item(), "tolist": lambda: x.tolist(), "numpy": lambda: x.numpy(),
             "cpu": lambda: x.cpu(), "to(cpu)": lambda: x.to("cpu"), "nonzero": lambda: x.nonzero(),
             "bool_index": lambda: x[x > 2], "repeat_interleave": lambda: x.repeat_interleave(x),
             "tensor(device=)": lambda: torch.tensor([1, 2], device="cpu"),
             "as_tensor(device=)": lambda: torch.as_tensor([1, 2], device="cpu")}
    for what, call in cases.items():
        with SyncCounter() as counter:
            call()
        assert [w for w, _ in counter.events][:1] == [what], (what, counter.events)
        assert counter.events[0][1].endswith(f"test_engine_syncs.py:{_line_of(call)}"), counter.events
    with SyncCounter() as counter:
        y = (x + 1) * 2
        torch.where(y > 3, y, 0).sum()
        x.repeat_interleave(2, output_size=12)
    assert counter.events == []


def _line_of(fn) -> int:
    return fn.__code__.co_firstlineno


def test_the_step_count_sees_an_added_sync(model, monkeypatch):
    """A scalar read added to the decoding step (in the verify pass) shows up in every step's
    count, so a counter gone blind to the loop cannot pass the budget tests; without it each step
    has exactly its one read."""
    steps, _ = step_syncs(model, "ngram", "dynamic")
    assert all(len(s) == BUDGET for s in steps), steps
    verify = engine.verify

    def reading(target, cache, tree):
        hidden, logits = verify(target, cache, tree)
        int(logits.argmax())            # a host sync
        return hidden, logits
    monkeypatch.setattr(engine, "verify", reading)
    steps, _ = step_syncs(model, "ngram", "dynamic")
    # every step that verified (the last interval only reads "all done")
    assert [len(s) for s in steps] == [BUDGET + 1] * (len(steps) - 1) + [BUDGET], steps
    assert all(any(w == "int" and "test_engine_syncs.py" in where for w, where in s) for s in steps[:-1]), steps
