"""Multi-source trees (HybridDrafter + AutoTree): lossless whatever the sources propose, the
merged tree is a deduplicated prefix-closed trie of the best-scored nodes, and its size follows
the verify-cost curve."""
import itertools
import math

import pytest
import torch

import parallelspec as ps
from parallelspec.trees import AutoTree
from parallelspec.trees import auto as auto_module
from parallelspec.drafters import DraftCandidates, HybridDrafter, NgramDrafter
from ps_kernels import reference as ref

from engine_helpers import OracleDrafter, hf_greedy, left_padded, tiny_model, unpadded_rows

VOCAB, NEW = 256, 16
FLAT = {1: 1.0, 64: 1.05}            # verification width almost free (a GPU)
STEEP = {1: 1.0, 2: 3.0, 64: 200.0}  # every extra node costs two steps (never worth it)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("cost", [FLAT, STEEP], ids=["flat", "steep"])
def test_hybrid_greedy_matches_hf(arch, cost):
    torch.set_num_threads(1)
    model = tiny_model(arch, VOCAB)
    ids, mask = left_padded([5, 9, 1, 7], VOCAB)
    reference = hf_greedy(model, ids, mask, NEW + 6)
    oracle = OracleDrafter(unpadded_rows(reference, mask), VOCAB, check_lens=[int(n) + NEW for n in mask.sum(1)])
    drafter = HybridDrafter([NgramDrafter(num_tokens=3), oracle])
    tree = AutoTree(cost, max_nodes=24)
    out, stats = ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=NEW, tree=tree, return_stats=True)
    torch.testing.assert_close(out, reference[:, :ids.shape[1] + NEW], rtol=0, atol=0)
    if cost is STEEP:
        assert stats.mean_accepted == 1.0, "a tree that costs more than it can gain must not be drafted"
    else:
        assert stats.mean_accepted > 1.3, "the oracle's true candidates should be accepted"


def _cands(per_depth_tokens, per_depth_logprobs, paths=None, chained=False):
    return DraftCandidates(torch.tensor(per_depth_tokens), torch.tensor(per_depth_logprobs, dtype=torch.float32),
                           paths, per_depth_in_paths=chained)


def _paths(tree: ps.Tree, b: int = 0) -> dict[int, tuple]:
    parents = tree.parents[b] if tree.parents.dim() == 2 else tree.parents
    out = {0: ()}
    for i in range(1, tree.size):
        out[i] = out[int(parents[i])] + (int(tree.tokens[b, i]),)
    return out


def test_merged_trie_dedupes_and_keeps_best_nodes_prefix_closed():
    # per-depth: depth 1 {7: p .6, 8: p .3}, depth 2 {9: .5, 3: .1}; a chain 7 -> 9 -> 4 from lookup
    c = _cands([[[7, 8], [9, 3]]], [[[math.log(.6), math.log(.3)], [math.log(.5), math.log(.1)]]],
               paths=[[([7, 9, 4], [math.log(.9), math.log(.9), math.log(.9)])]])
    tree = AutoTree(FLAT, max_nodes=6).build(torch.tensor([1]), c)
    paths = _paths(tree)
    assert tree.tokens[0, 0] == 1 and tree.size == 6
    kept = set(paths.values()) - {()}
    assert len(kept) == 5, f"duplicates must merge: {kept}"
    # best five: (7) .9, (7,9) .81, (7,9,4) .729, (8) .3, (8,9) .15 ; (7,3) .06 is dropped
    assert kept == {(7,), (7, 9), (7, 9, 4), (8,), (8, 9)}
    for node, path in paths.items():  # prefix-closed, parents before children
        if node:
            parent = int(tree.parents[0, node])
            assert parent < node and paths[parent] == path[:-1]
    bits = ref.unpack_tree_mask(tree.mask, tree.size, 1, "cpu")[0]
    assert torch.equal(bits, ref.unpack_tree_mask(ref.tree_mask_from_parents(tree.parents[0]), tree.size, 1, "cpu")[0])


def test_size_follows_cost_curve():
    c = _cands([[[7], [9]]], [[[math.log(.9)], [math.log(.8)]]])
    assert AutoTree(STEEP, max_nodes=8).build(torch.tensor([1]), c).size == 1
    assert AutoTree(FLAT, max_nodes=8).build(torch.tensor([1]), c).size == 3
    # interpolation between measured sizes, linear extrapolation past the last
    t = AutoTree({1: 1.0, 5: 2.0, 9: 4.0})
    assert t.cost(3) == pytest.approx(1.5) and t.cost(13) == pytest.approx(6.0)


def test_chain_source_alone_is_not_counted_twice():
    nd = NgramDrafter(num_tokens=3)
    nd.reset(1, 64, torch.device("cpu"), torch.float32)
    c = nd.step(torch.tensor([[5, 6, 7, 8, 5, 6]]), None, torch.tensor([6]))
    assert c.per_depth_in_paths and c.paths[0][0][0] == [7, 8, 5]
    tree = AutoTree(FLAT, max_nodes=16).build(torch.tensor([6]), c)
    assert set(_paths(tree).values()) - {()} <= {p[:d] for chain, _ in c.paths[0] for p in [tuple(chain)]
                                                  for d in range(1, len(chain) + 1)}


@pytest.mark.parametrize("conditioned", [0, 1, 2])
def test_conditioned_candidates_hang_under_the_top1_chain(conditioned):
    """Candidates drafted after the top-1 tokens of the first c depths (EAGLE: c = k - 1; a
    parallel drafter fed its depth-1 token: c = 1) only extend that chain; with c = 0 every
    combination is a path. Scores are summed log-probabilities along the path either way."""
    lp = [[math.log(.9), math.log(.5)]] * 3
    c = _cands([[[10, 11], [20, 21], [30, 31]]], [lp])
    c.conditioned_depths = conditioned
    tree = AutoTree(FLAT, max_nodes=64).build(torch.tensor([1]), c)
    got = set(_paths(tree).values()) - {()}
    every = {p[:d] for p in itertools.product((10, 11), (20, 21), (30, 31)) for d in (1, 2, 3)}
    want = {p for p in every if all(p[i] == (10, 20)[i] for i in range(min(conditioned, len(p) - 1)))}
    assert got == want
    assert len(want) == {0: 14, 1: 8, 2: 6}[conditioned]


def test_batch_trees_are_sized_by_the_rows_they_add():
    """The verify cost is per forward over all rows: four sequences' trees of n nodes cost
    what one sequence's 4n nodes cost, so a batch gets smaller trees than one sequence with
    the same per-sequence gains (and the same tree when width is free)."""
    rising = {1: 1.0, 4: 1.1, 8: 1.3, 16: 1.9, 32: 3.2, 64: 6.0}
    gains = [0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1]
    tree = AutoTree(rising, max_nodes=16)
    one, four = tree.choose_size([gains]), tree.choose_size([gains] * 4)
    assert four < one
    flat = AutoTree(FLAT, max_nodes=16)
    assert flat.choose_size([gains] * 4) == flat.choose_size([gains]) == len(gains)


def test_bad_arguments():
    with pytest.raises(ValueError, match="verify_cost"):
        AutoTree({2: 1.0})
    with pytest.raises(ValueError, match="max_nodes"):
        AutoTree(FLAT, max_nodes=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="tree_depth: expected at least 1"):
            AutoTree(FLAT, depth=bad)
    with pytest.raises(TypeError, match="drafters"):
        HybridDrafter([])
    for bad in (0, 1.5, False):
        with pytest.raises(ValueError, match="defer_on_match: expected None or an n-gram length >= 1"):
            HybridDrafter([NgramDrafter()], defer_on_match=bad)
    with pytest.raises(ValueError, match="defer_on_match: needs a source that never sits out"):
        HybridDrafter([OracleDrafter([[1, 2]], VOCAB, hidden=[torch.zeros(2, 4)])], defer_on_match=2)


def test_for_model_refuses_bad_options_before_measuring(monkeypatch):
    """The verify-cost measurement takes seconds on first use: bad options are named first."""
    from parallelspec.trees import verify_cost
    monkeypatch.setattr(verify_cost, "measure_verify_cost", lambda *a, **k: pytest.fail("measured before checking"))
    for kwargs, name in (({"max_nodes": 0}, "max_nodes"), ({"depth": 0}, "tree_depth")):
        with pytest.raises(ValueError, match=f"{name}: expected at least 1"):
            AutoTree.for_model(None, **kwargs)


def test_ngram_reports_its_longest_match():
    d = NgramDrafter(num_tokens=2, ngram_sizes=(3, 2, 1))
    d.reset(2, 32, torch.device("cpu"), torch.float32)
    rows = torch.tensor([[5, 6, 7, 1, 5, 6, 7], [1, 2, 3, 4, 9, 8, 0]])
    d.step(rows, None, torch.tensor([7, 7]))
    assert d.last_match_n == [3, 0]      # "5 6 7" seen before; "8 9 0"/"9 0"/"0" never
    d.step(torch.tensor([[1], [9]]), None, torch.tensor([1, 1]))
    assert d.last_match_n == [3, 1]      # "6 7 1" seen before; for row 1 only "9"


def test_ngram_chain_estimates_follow_the_match_length():
    """A chain's path log-probabilities come from its match's length (how far back the context
    agrees with the copied place), halved per lesser match; a scalar serves every length."""
    first, nxt = (0.1, 0.4, 0.8), (0.5, 0.7, 0.9)
    d = NgramDrafter(num_tokens=2, ngram_sizes=(3, 2, 1), first_prob=first, next_prob=nxt)
    d.reset(3, 32, torch.device("cpu"), torch.float32)
    rows = torch.tensor([[1, 2, 3, 4, 9, 8, 7, 2, 3],       # "2 3": two tokens agree (1 vs 7 before them)
                         [5, 1, 2, 3, 4, 9, 1, 2, 3],       # "1 2 3": three agree
                         [1, 2, 3, 4, 9, 8, 7, 6, 3]])      # "3" alone
    cands = d.step(rows, None, torch.tensor([9, 9, 9]))
    (c0, lp0), = cands.paths[0]
    assert c0 == [4, 9] and lp0 == pytest.approx([math.log(0.4), math.log(0.7)])
    assert cands.paths[1][0] == ([4, 9], pytest.approx([math.log(0.8), math.log(0.9)]))
    assert cands.paths[2][0] == ([4, 9], pytest.approx([math.log(0.1), math.log(0.5)]))
    # the shorter n-grams of row 1 continue at the same place: one chain
    assert len(cands.paths[1]) == 1
    flat = NgramDrafter(num_tokens=2, first_prob=0.5, next_prob=0.88)
    flat.reset(1, 32, torch.device("cpu"), torch.float32)
    (c, lp), = flat.step(rows[1:2], None, torch.tensor([9])).paths[0]
    assert lp == pytest.approx([math.log(0.5), math.log(0.88)])
    for bad in ((), (0.5, 1.5), 0.0, "0.5"):
        with pytest.raises(ValueError, match="first_prob: expected a probability in \\(0, 1\\] or a tuple"):
            NgramDrafter(first_prob=bad)


def test_per_source_calibration_follows_each_sources_record():
    """Each source's scale is accepted / predicted over the nodes it contributed: a chain that the
    target keeps rejecting loses its place in the tree to the model's candidates, which keep
    theirs; the kept set stays prefix-closed under the scaled estimates; without the accepted
    nodes (observe(accept_lens) alone) one scale serves both sources, as before."""
    # model: depth 1 {7: .5, 8: .2}; lookup chain 5 -> 6 -> 4 at .6 / .54 / .49 (its fixed estimates)
    c = _cands([[[7, 8], [9, 3]]], [[[math.log(.5), math.log(.2)], [math.log(.6), math.log(.1)]]],
               paths=[[([5, 6, 4], [math.log(.6), math.log(.9), math.log(.9)])]])
    cost = {1: 1.0, 2: 1.05, 3: 1.1, 4: 1.3, 64: 80.0}     # room for about three nodes
    auto = AutoTree(cost, max_nodes=8)
    first = set(_paths(auto.build(torch.tensor([1]), c)).values()) - {()}
    assert (5,) in first and (5, 6) in first            # the chain wins while it is trusted
    for _ in range(12):                                 # the target takes the model's 7, never the chain's 5
        tree = auto.build(torch.tensor([1]), c)
        node7 = [i for i, p in _paths(tree).items() if p == (7,)]
        index = torch.tensor([[0, node7[0]]]) if node7 else torch.tensor([[0, -1]])
        auto.observe(torch.tensor([2 if node7 else 1]), index)
    chain_scale, model_scale = auto.source_calibration[1], auto.source_calibration[0]
    assert chain_scale < 0.6 and model_scale > 0.9, auto.source_calibration
    tree = auto.build(torch.tensor([1]), c)
    paths = _paths(tree)
    kept = set(paths.values()) - {()}
    assert (7,) in kept and (7, 9) in kept and (5, 6) not in kept, kept
    for node, path in paths.items():   # prefix-closed, parents before children
        if node:
            parent = int(tree.parents[0, node])
            assert parent < node and paths[parent] == path[:-1]
    # one scale for both when observe() is not told which nodes were accepted
    auto.observe(torch.tensor([1]))
    assert auto.source_calibration == [auto.calibration] * 2


def test_chain_scale_rises_past_its_estimates_up_to_chain_trust_and_restarts_per_call(monkeypatch):
    """Prompt lookup's estimates are fixed guesses: a chain the target always takes whole earns a
    scale above 1 (capped at CHAIN_TRUST), which buys its deeper nodes a place in the tree; the
    model's scale never passes 1; reset() (the engine calls it at every generate call) starts
    the record over."""
    # chain 5 -> 6 -> 4 -> 2 at .3 / .27 / .24 / .22 against a cost that keeps nodes worth ~.3
    chain = [5, 6, 4, 2]
    c = _cands([[[7], [9]]], [[[math.log(.2)], [math.log(.1)]]],
               paths=[[(chain, [math.log(.3)] + [math.log(.9)] * 3)]])
    cost = {1: 1.0, 2: 1.25, 4: 1.75, 64: 80.0}
    for trust, deep in ((1.0, False), (2.0, True)):
        monkeypatch.setattr(auto_module, "CHAIN_TRUST", trust)
        auto = AutoTree(cost, max_nodes=8)
        for _ in range(12):                               # the target takes every chain node drafted
            tree = auto.build(torch.tensor([1]), c)
            paths = _paths(tree)
            taken = [i for i in sorted(paths, key=lambda i: len(paths[i])) if paths[i] == tuple(chain[:len(paths[i])])]
            auto.observe(torch.tensor([len(taken)]), torch.tensor([taken + [-1] * (tree.size - len(taken))]))
        assert auto.source_calibration[1] == pytest.approx(trust), auto.source_calibration
        assert auto.source_calibration[0] <= 1.0
        kept = set(_paths(auto.build(torch.tensor([1]), c)).values())
        assert (tuple(chain[:3]) in kept) == deep, (trust, kept)
        auto.reset()
        assert auto.source_calibration == [1.0, 1.0] and auto.calibration == 1.0


def test_engine_restarts_the_builders_record_at_every_call():
    class Counting(AutoTree):
        resets = 0

        def reset(self):
            Counting.resets += 1
            super().reset()

    model = tiny_model("llama", VOCAB)
    ids, mask = left_padded([5, 9], VOCAB)
    tree = Counting(FLAT, max_nodes=8)
    Counting.resets = 0
    for _ in range(2):
        ps.generate(model, ids, NgramDrafter(num_tokens=3), attention_mask=mask, max_new_tokens=4, tree=tree)
    assert Counting.resets == 2


def test_verify_cost_is_measured_per_size_and_cached(tmp_path, monkeypatch):
    """measure_verify_cost: one positive time per asked size, written once and read back as is."""
    from parallelspec.trees import verify_cost

    monkeypatch.setenv("PARALLELSPEC_CACHE", str(tmp_path))
    model = tiny_model("llama", VOCAB)
    sizes = (1, 3, 8)
    costs = verify_cost.measure_verify_cost(model, sizes=sizes, prefix=16, repeats=2)
    assert sorted(costs) == list(sizes) and all(t > 0 for t in costs.values())
    assert len(list((tmp_path / "verify_cost").glob("*.json"))) == 1
    # timed again, the figures would differ: read back, they are equal to the last bit
    assert verify_cost.measure_verify_cost(model, sizes=sizes, prefix=16, repeats=2) == costs


def test_verify_cost_is_cached_per_cpu_level(tmp_path, monkeypatch):
    """The curve depends on the level the native kernels run at: a forced lower level measures its
    own curve instead of reading the one measured at another level (parallelspec bench compares
    levels in one process)."""
    import pytest

    from ps_kernels import _backend
    from parallelspec.trees import verify_cost

    levels = _backend.runnable_cpu_levels()
    if len(levels) < 2:
        pytest.skip(f"needs two runnable CPU capability levels, this machine runs {levels}")
    monkeypatch.setenv("PARALLELSPEC_CACHE", str(tmp_path))
    model = tiny_model("llama", VOCAB)
    for level in levels[-2:]:
        with _backend.force_cpu_capability(level):
            verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=1)
    assert len(list((tmp_path / "verify_cost").glob("*.json"))) == 2


@pytest.mark.parametrize("conditioned", [0, 1])
def test_candidates_made_after_the_loops_host_read_are_placed_blind(conditioned):
    """Inside the decoding loop (host_request called for the build), per-depth candidates that
    were not part of the step's host read (HybridDrafter's late network run) are not read: the
    top-1 chain and depth 1's 2nd / 3rd candidates are placed with the mean scores those slots had
    in the read beams, their tokens gathered on the device."""
    from sync_counter import SyncCounter

    lp = [[math.log(.9), math.log(.5), math.log(.2)]] * 3
    first = _cands([[[10, 11, 12], [20, 21, 22], [30, 31, 32]]], [lp])
    first.conditioned_depths = conditioned
    tree = AutoTree(FLAT, max_nodes=8)
    tree.build(torch.tensor([1]), first)   # outside the loop: reads its beam, records the slots' scores
    late = _cands([[[40, 41, 42], [50, 51, 52], [60, 61, 62]]], [lp])
    late.conditioned_depths = conditioned
    assert tree.host_request(None) == []   # the loop's request for a step whose drafter sat out
    with SyncCounter() as counter:
        built = tree.build(torch.tensor([2]), late)
    assert counter.events == [], f"blind placement read the host: {counter.events}"
    got = set(_paths(built).values()) - {()}
    # the top-1 chain .9 / .81 / .729 and depth 1's 2nd (.5) and 3rd (.2): all worth a flat cost
    assert got == {(40,), (40, 50), (40, 50, 60), (41,), (42,)}
    assert built.tokens[0, 0] == 2
    # outside the loop the same candidates are read as usual (depth 2's 2nd candidate too)
    assert (40, 51) in set(_paths(tree.build(torch.tensor([2]), late)).values())


def test_blind_placement_needs_a_record():
    """No read beam yet in this call: nothing to score blind nodes with, so none are placed."""
    late = _cands([[[40, 41], [50, 51]]], [[[math.log(.9), math.log(.5)]] * 2])
    tree = AutoTree(FLAT, max_nodes=8)
    tree.host_request(None)
    assert tree.build(torch.tensor([2]), late).size == 1


def test_cost_curve_is_read_through_its_increasing_envelope():
    """A curve measured on a busy machine may time fewer tokens slower than more (26.7 ms at 1
    token, 24.2 at 2): a tree of n nodes can always be padded to a larger measured size, so
    AutoTree reads min over the sizes >= n."""
    t = AutoTree({1: 26.7, 2: 24.2, 4: 27.0, 8: 28.2, 12: 28.6})
    assert t.cost(1) == pytest.approx(24.2) and t.cost(4) == pytest.approx(27.0)


def test_a_disturbed_measurement_gets_more_rounds(tmp_path, monkeypatch):
    """measure_verify_cost times more rounds (up to a limit) while the curve does not increase."""
    from parallelspec.trees import verify_cost

    monkeypatch.setenv("PARALLELSPEC_CACHE", str(tmp_path))
    model = tiny_model("llama", VOCAB)
    checks = []
    monkeypatch.setattr(verify_cost, "_monotone", lambda costs: checks.append(dict(costs)) or False)
    verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=2, cache=False)
    assert len(checks) == verify_cost._MAX_DISTURBED_BLOCKS - 1   # checked after each block but the last
    checks.clear()
    monkeypatch.setattr(verify_cost, "_monotone", lambda costs: checks.append(dict(costs)) or True)
    verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=2, cache=False)
    assert len(checks) == 1   # plausible after the first block: done


def test_a_disturbed_measurement_stops_at_its_time_budget(tmp_path, monkeypatch):
    """On a machine too busy for any block to give an increasing curve, no block starts past the
    time budget: one block, then the curve (read through its envelope) is kept."""
    from parallelspec.trees import verify_cost

    monkeypatch.setenv("PARALLELSPEC_CACHE", str(tmp_path))
    model = tiny_model("llama", VOCAB)
    checks = []
    monkeypatch.setattr(verify_cost, "_monotone", lambda costs: checks.append(dict(costs)) or False)
    monkeypatch.setattr(verify_cost, "_DISTURBED_BUDGET_S", 0.0)
    costs = verify_cost.measure_verify_cost(model, sizes=(1, 2), prefix=8, repeats=2, cache=False)
    assert len(checks) == 1 and set(costs) == {1, 2}
