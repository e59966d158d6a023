"""Tree builders (chain, static, dynamic) against brute force, and the static KV cache."""
import itertools

import pytest
import torch
from hypothesis import given, strategies as st

from parallelspec import ChainTree, DraftCandidates, DynamicTree, KVCache, StaticTree
from ps_kernels.reference import tree_mask_from_parents, unpack_tree_mask


def _candidates(B, k, m, seed=0, empty=0.0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (B, k, m), generator=g)
    logprobs = -torch.rand(B, k, m, generator=g) * 4
    logprobs[torch.rand(B, k, m, generator=g) < empty] = float("-inf")
    return DraftCandidates(tokens, logprobs)


def _check_structure(tree, B):
    N = tree.size
    parents = tree.parents.expand(B, N)
    depths = tree.depths.expand(B, N)
    assert (parents[:, 0] == -1).all() and (depths[:, 0] == 0).all()
    assert (parents[:, 1:] < torch.arange(1, N)).all() and (parents[:, 1:] >= 0).all()
    assert (depths[:, 1:] == depths.gather(1, parents[:, 1:]) + 1).all()
    expected_mask = unpack_tree_mask(tree_mask_from_parents(parents), N, B, "cpu")
    got = unpack_tree_mask(tree.mask, N, B, "cpu")
    assert torch.equal(got, expected_mask)


def _paths(tree, b, cands):
    """Each node's path of candidate indices, recovered from its token chain (tokens are unique)."""
    parents = tree.parents.expand(tree.tokens.shape)[b].tolist()
    depths = tree.depths.expand(tree.tokens.shape)[b].tolist()
    paths = [()]
    for i in range(1, tree.size):
        d = depths[i]
        choice = (cands.tokens[b, d - 1] == tree.tokens[b, i]).nonzero()[0].item()
        paths.append(paths[parents[i]] + (choice,))
    return paths


def test_chain_and_static_buffers_are_built_once():
    cands = _candidates(3, 4, 3)
    root = torch.tensor([7, 8, 9])
    chain = ChainTree()
    t = chain.build(root, cands)
    assert t.mask is None and t.size == 5
    assert torch.equal(t.tokens, torch.cat([root[:, None], cands.tokens[:, :, 0]], dim=1))
    assert chain.build(root, cands).parents is t.parents  # cached
    static = StaticTree([[0], [1], [0, 0], [0, 2], [1, 0], [0, 0, 0], [5], [0, 0, 0, 0], [0, 0, 0, 0, 0]])
    t = static.build(root, cands)  # [5] (m = 3) and the depth-5 path (k = 4) are dropped
    assert t.size == 8
    _check_structure(t, 3)
    assert _paths(t, 1, cands) == [(), (0,), (1,), (0, 0), (0, 2), (1, 0), (0, 0, 0), (0, 0, 0, 0)]
    assert static.build(root, cands).mask is t.mask


@given(B=st.integers(1, 3), k=st.integers(1, 4), m=st.integers(1, 4), nodes=st.integers(2, 20),
       depth=st.one_of(st.none(), st.integers(1, 4)), seed=st.integers(0, 100), empty=st.sampled_from([0.0, 0.3]))
def test_dynamic_tree_is_the_global_top_n(B, k, m, nodes, depth, seed, empty):
    cands = _candidates(B, k, m, seed, empty)
    cands.tokens = torch.arange(B * k * m).view(B, k, m)  # unique tokens: paths are recoverable
    tree = DynamicTree(nodes, depth).build(torch.zeros(B, dtype=torch.int64), cands)
    _check_structure(tree, B)
    kk = k if depth is None else min(depth, k)
    lp = cands.logprobs.double().clamp(min=-1e4)
    for b in range(B):
        every = [p for d in range(1, kk + 1) for p in itertools.product(range(m), repeat=d)]
        score = {p: sum(float(lp[b, j, i]) for j, i in enumerate(p)) for p in every}
        got = _paths(tree, b, cands)[1:]
        assert len(got) == min(nodes - 1, len(every)) == len(set(got))
        assert all(p[:-1] in got for p in got if len(p) > 1)  # prefix-closed
        worst_in = min(score[p] for p in got)
        best_out = max((score[p] for p in every if p not in got), default=float("-inf"))
        assert worst_in >= best_out - 1e-5 * kk  # a global top set (up to the tie-breaking epsilon)


def test_static_tree_refuses_bad_paths():
    with pytest.raises(ValueError, match="tree_choices: expected at least one path"):
        StaticTree([])
    with pytest.raises(ValueError, match=r"tree_choices: expected non-empty paths .* got \[0, -1\]"):
        StaticTree([[0], [0, -1]])
    with pytest.raises(ValueError, match="no path fits"):
        StaticTree([[3]]).build(torch.zeros(1, dtype=torch.int64), _candidates(1, 2, 2))


def test_cache_reserve_grows_and_keeps_rows():
    cache = KVCache(2, 3, 2, 4, 5)
    cache.kv.normal_()
    before = cache.kv.clone()
    cache.reserve(4)
    assert cache.capacity == 5
    cache.reserve(7)   # exactly what is asked: no doubling
    assert cache.capacity == 7 and torch.equal(cache.kv[..., :5, :], before) and cache.reallocations == 1
    limited = KVCache(1, 1, 1, 4, 8, max_capacity=12)
    limited.reserve(11)
    assert limited.capacity == 11
    with pytest.raises(ValueError, match="13 rows per sequence are needed but the cache is limited to 12 rows"):
        limited.reserve(13)


def test_cache_commit_moves_the_accepted_rows():
    cache = KVCache(2, 2, 1, 3, 10)
    cache.kv.normal_()
    cache.lens[:] = torch.tensor([2, 4])
    before = cache.kv.clone()
    cache.commit(torch.tensor([[0, 2, 3], [0, 1, -1]]), torch.tensor([3, 0]))
    assert cache.lens.tolist() == [5, 4]
    torch.testing.assert_close(cache.kv[:, :, 0, :, 2:5], before[:, :, 0, :, [2, 4, 5]])
    torch.testing.assert_close(cache.kv[:, :, 1], before[:, :, 1])
