"""The attention features of tree_attention and draft_attention (sliding window, logit soft-cap,
attention sinks; the contract is in the references' docstrings).

- The reference (the specification) against an independent formulation of the contract in which
  every query's and key's position is spelled out (attention_cases.spelled_out_*: depths by
  walking the parents, each (query, key) pair decided on its own), in fp64.
- The native CPU backend at every capability level this machine runs (forced, so a wide CPU also
  tests the narrow levels' code) against the reference, over odd shapes: windows smaller than,
  equal to and larger than the prefix, deep tree nodes (random parents, more than one mask
  word), GQA, ragged prefixes, draft padding rows, soft-caps and sinks alone and together,
  fp32/fp16/bf16, the parallel chunked path.
- The public ops refuse bad window / softcap / sinks with errors naming the argument, and the
  native binding still refuses them with validate=False.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import ps_kernels
from ps_kernels import _backend
from ps_kernels import reference as ref

from attention_cases import (check_against_reference, random_parents, random_qkv_cache,
                             spelled_out_draft_attention, spelled_out_tree_attention)
from helpers import cpu_level_params

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _native_reason():
    return _backend.why_unavailable("tree_attention", "cpu", CPU)


# one param per CPU level this machine runs, each forcing that level (conftest); a skip when the
# native library is missing, so the gap shows in the report
LEVELS = cpu_level_params() if _native_reason() is None else \
    [pytest.param("cpu", marks=pytest.mark.skip(reason=str(_native_reason())))]


# ---------------------------------------------------------------- cases

def parents_for(gen, kind: str, B: int, N: int):
    """[B, N] parents, or None for the causal chain. deep: a chain of N // 2 then nodes hanging
    off its last few (depths up to N // 2); random: uniform parents (random_parents)."""
    if kind == "causal":
        return None
    if kind == "deep":
        p = torch.arange(-1, N - 1)
        if N > 1:
            p[N // 2:] = torch.randint(max(0, N // 2 - 3), N // 2, (N - N // 2,), generator=gen)
        return p.expand(B, N).clone()
    return torch.stack([random_parents(gen, N) for _ in range(B)])


def tree_case(gen, dtype, B, Hkv, group, N, D, prefix, kind, extra=2, q_gain=1.0):
    S = max(prefix) + N + extra
    q, k, v, kc, vc = random_qkv_cache(gen, B, Hkv * group, Hkv, N, D, S, dtype, q_gain)
    lens = torch.tensor(prefix, dtype=torch.int64)
    parents = parents_for(gen, kind, B, N)
    mask = None if parents is None else ps_kernels.tree_mask_from_parents(parents)
    return [q, k, v, kc, vc, lens, mask], parents


def draft_case(gen, dtype, B, Hkv, group, R, M, D, prefix, new_lens, q_gain=1.0):
    S = max(p + r for p, r in zip(prefix, new_lens)) + 2
    q, k, v, kc, vc = random_qkv_cache(gen, B, Hkv * group, Hkv, R + M, D, S, dtype, q_gain)
    return [q, k, v, kc, vc, torch.tensor(prefix, dtype=torch.int64), torch.tensor(new_lens, dtype=torch.int64), M]


def sinks_for(gen, Hq, on=True):
    return torch.randn(Hq, generator=gen) * 2 if on else None


def check_tree(args, scale, window=None, softcap=None, sinks=None, backend="cpu"):
    kw = dict(scale=scale, window=window, softcap=softcap, sinks=sinks, return_lse=True)
    return check_against_reference(lambda a: ps_kernels.tree_attention(*a, backend=backend, **kw),
                                   lambda a: ref.tree_attention(*a, **kw), args)


def check_draft(args, scale, window=None, softcap=None, sinks=None, backend="cpu"):
    kw = dict(scale=scale, window=window, softcap=softcap, sinks=sinks, return_lse=True)
    out, lse = check_against_reference(lambda a: ps_kernels.draft_attention(*a, backend=backend, **kw),
                                       lambda a: ref.draft_attention(*a, **kw), args)
    q, new_lens, M = args[0], args[6], args[7]
    R = q.shape[2] - M
    for b, r in enumerate(new_lens.tolist()):   # padding rows: exactly 0 and -inf, sinks or not
        assert torch.all(out[b, :, r:R] == 0) and torch.all(lse[b, :, r:R] == float("-inf"))
    return out, lse


# ---------------------------------------------------------------- the reference is the contract

@pytest.mark.parametrize("window", [None, 1, 2, 7, 8, 9, 30])
@pytest.mark.parametrize("softcap,with_sinks", [(None, False), (1.5, False), (None, True), (2.0, True)])
def test_reference_tree_matches_spelled_out_positions(window, softcap, with_sinks):
    # prefixes 0, 8 and 3; windows below, at and above 8; random parents give uneven depths
    gen = torch.Generator().manual_seed(0 if window is None else window)
    args, parents = tree_case(gen, torch.float64, 3, 1, 2, 9, 16, [0, 8, 3], "random", q_gain=3.0)
    sinks = sinks_for(gen, 2, with_sinks)
    truth = spelled_out_tree_attention(*args[:6], parents, 0.3, window, softcap, sinks)
    got = ref.tree_attention(*[a.clone() if torch.is_tensor(a) else a for a in args], scale=0.3, window=window,
                             softcap=softcap, sinks=sinks, return_lse=True)
    torch.testing.assert_close(got, truth, atol=1e-12, rtol=1e-12)
    # the causal chain (no mask) too
    causal = ref.tree_attention(*args[:6], None, scale=0.3, window=window, softcap=softcap, sinks=sinks,
                                return_lse=True)
    torch.testing.assert_close(causal, spelled_out_tree_attention(*args[:6], None, 0.3, window, softcap, sinks),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("window", [None, 1, 3, 5, 6, 7, 20])
@pytest.mark.parametrize("softcap,with_sinks", [(None, False), (1.5, False), (None, True), (2.0, True)])
def test_reference_draft_matches_spelled_out_positions(window, softcap, with_sinks):
    gen = torch.Generator().manual_seed(10 if window is None else window)
    # prefixes 5, 0, 6; sequence 1 has padding rows, sequence 2 no real row
    args = draft_case(gen, torch.float64, 3, 1, 2, 3, 2, 16, [5, 0, 6], [3, 1, 0], q_gain=3.0)
    sinks = sinks_for(gen, 2, with_sinks)
    truth = spelled_out_draft_attention(*args, 0.3, window, softcap, sinks)
    got = ref.draft_attention(*[a.clone() if torch.is_tensor(a) else a for a in args], scale=0.3, window=window,
                              softcap=softcap, sinks=sinks, return_lse=True)
    torch.testing.assert_close(got, truth, atol=1e-12, rtol=1e-12)


def test_spelled_out_form_sees_the_window():
    # positive control: the independent form differs from the unwindowed reference when the window
    # hides keys (so the equality above is not vacuous)
    gen = torch.Generator().manual_seed(1)
    args, parents = tree_case(gen, torch.float64, 1, 1, 1, 6, 8, [10], "random")
    windowed, _ = spelled_out_tree_attention(*args[:6], parents, 0.5, 4)
    plain = ref.tree_attention(*args, scale=0.5)
    assert (windowed - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- native CPU, every level

# prefixes 0, 13 and 37 (ragged); windows 1 (self only), below / at / above the 13-row prefix,
# one that cuts the deep nodes' far ancestors, and one past every position (hides nothing)
TREE_WINDOWS = [1, 5, 12, 13, 14, 30, 200]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("window", TREE_WINDOWS)
def test_cpu_tree_window(level, window):
    gen = torch.Generator().manual_seed(window)
    for dtype, kind in zip(DTYPES, ["deep", "random", "causal"]):
        args, _ = tree_case(gen, dtype, 3, 2, 3, 20, 64, [0, 13, 37], kind)
        check_tree(args, 0.125, window)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("window", [3, 64, 66])
def test_cpu_tree_window_two_mask_words(level, window):
    # 70 nodes of a deep tree: depths up to 35 across two mask words, bit 63 the sign bit
    gen = torch.Generator().manual_seed(70 + window)
    args, _ = tree_case(gen, torch.float32, 1, 1, 2, 70, 40, [45], "deep")
    check_tree(args, 0.2, window)
    chain, _ = tree_case(gen, torch.bfloat16, 1, 1, 1, 70, 40, [5], "causal")
    check_tree(chain, 0.2, window)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("softcap,with_sinks", [(5.0, False), (None, True), (2.5, True)])
@pytest.mark.parametrize("window", [None, 6])
def test_cpu_tree_softcap_and_sinks(level, softcap, with_sinks, window):
    gen = torch.Generator().manual_seed(int((softcap or 0) * 10) + with_sinks)
    for dtype in DTYPES:
        # q scaled up so the soft-cap bites (scores well past the cap before it)
        args, _ = tree_case(gen, dtype, 2, 1, 3, 11, 72, [9, 0], "random", q_gain=3.0)
        check_tree(args, 1 / math.sqrt(72), window, softcap, sinks_for(gen, 3, with_sinks))


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_tree_long_prefix_window_chunked(level):
    # a 700-row prefix cut by windows not aligned to the key blocks; enough work that the rows of
    # one (sequence, KV head) are cut into chunks run apart (each chunk bounds its own window)
    gen = torch.Generator().manual_seed(3)
    for dtype, window in ((torch.float32, 100), (torch.bfloat16, 333), (torch.float16, 41)):
        args, _ = tree_case(gen, dtype, 2, 1, 4, 40, 64, [700, 250], "deep")
        check_tree(args, 0.1, window, 4.0, sinks_for(gen, 4))


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_window_past_every_position_changes_nothing(level):
    # a window longer than any position difference hides nothing: the same bits as no window
    gen = torch.Generator().manual_seed(4)
    args, _ = tree_case(gen, torch.float32, 2, 2, 2, 17, 64, [30, 4], "causal")
    plain = ps_kernels.tree_attention(*[a.clone() if torch.is_tensor(a) else a for a in args], backend="cpu",
                                      return_lse=True)
    wide = ps_kernels.tree_attention(*args, window=30 + 17, backend="cpu", return_lse=True)
    assert torch.equal(plain[0], wide[0]) and torch.equal(plain[1], wide[1])
    narrower = ps_kernels.tree_attention(*args, window=30 + 16, backend="cpu")  # hides prefix row 0 from the deepest
    assert not torch.equal(plain[0], narrower)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("window", [1, 3, 5, 6, 7, 12, 40])
def test_cpu_draft_window(level, window):
    gen = torch.Generator().manual_seed(100 + window)
    for dtype in DTYPES:
        # prefixes 6, 0, 11 around the windows; sequence 1: one real row of R = 4 (padding rows),
        # sequence 2: none (mask slots only)
        args = draft_case(gen, dtype, 3, 2, 2, 4, 3, 64, [6, 0, 11], [4, 1, 0])
        check_draft(args, 0.125, window)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("softcap,with_sinks", [(3.0, False), (None, True), (3.0, True)])
@pytest.mark.parametrize("window", [None, 4])
def test_cpu_draft_softcap_and_sinks(level, softcap, with_sinks, window):
    gen = torch.Generator().manual_seed(5 + with_sinks)
    for dtype in DTYPES:
        args = draft_case(gen, dtype, 2, 1, 3, 3, 2, 40, [0, 20], [2, 0], q_gain=3.0)
        check_draft(args, 0.15, window, softcap, sinks_for(gen, 3, with_sinks))


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_draft_edge_layouts_with_features(level):
    # no mask slots (a causal prefill of new rows); only mask slots; a long prefix, many rows
    gen = torch.Generator().manual_seed(6)
    sinks = sinks_for(gen, 4)
    check_draft(draft_case(gen, torch.float32, 2, 2, 2, 6, 0, 64, [0, 9], [6, 2]), 0.2, 3, 2.0, sinks)
    check_draft(draft_case(gen, torch.bfloat16, 2, 2, 2, 0, 4, 64, [3, 9], [0, 0]), 0.2, 2, None, sinks)
    check_draft(draft_case(gen, torch.float16, 1, 2, 2, 60, 7, 80, [500], [57]), 0.1, 90, 3.0, sinks)


@pytest.mark.parametrize("level", LEVELS)
@given(data=st.data())
def test_cpu_features_random(level, data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B = data.draw(st.integers(1, 3), label="B")
    Hkv = data.draw(st.integers(1, 2), label="Hkv")
    group = data.draw(st.sampled_from([1, 2, 3, 8]), label="group")
    D = data.draw(st.sampled_from([40, 64, 72, 96, 128]), label="D")
    prefix = data.draw(st.lists(st.one_of(st.just(0), st.integers(0, 90)), min_size=B, max_size=B), label="P")
    window = data.draw(st.one_of(st.none(), st.integers(1, 120)), label="window")
    softcap = data.draw(st.sampled_from([None, 1.0, 30.0]), label="softcap")
    with_sinks = data.draw(st.booleans(), label="sinks")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    sinks = sinks_for(gen, Hkv * group, with_sinks)
    if data.draw(st.booleans(), label="tree"):
        N = data.draw(st.integers(1, 40), label="N")
        kind = data.draw(st.sampled_from(["causal", "random", "deep"]), label="kind")
        args, _ = tree_case(gen, dtype, B, Hkv, group, N, D, prefix, kind, q_gain=2.0)
        check_tree(args, None, window, softcap, sinks)
    else:
        R, M = data.draw(st.integers(0, 8), label="R"), data.draw(st.integers(0, 5), label="M")
        real = data.draw(st.lists(st.integers(0, R), min_size=B, max_size=B), label="new_lens")
        check_draft(draft_case(gen, dtype, B, Hkv, group, R, M, D, prefix, real, q_gain=2.0), None, window, softcap,
                    sinks)


# ---------------------------------------------------------------- bad input

def _tree_args():
    gen = torch.Generator().manual_seed(0)
    return tree_case(gen, torch.float32, 2, 1, 2, 3, 16, [2, 5], "random")[0]


def _draft_args():
    return draft_case(torch.Generator().manual_seed(0), torch.float32, 2, 1, 2, 2, 1, 16, [2, 5], [2, 1])


BAD_FEATURES = [
    (dict(window=0), ValueError, r"window: expected None or an int >= 1 .*got 0"),
    (dict(window=-4), ValueError, r"window: expected None or an int >= 1 .*got -4"),
    (dict(window=2.5), TypeError, r"window: expected None or an int >= 1 .*got 2.5"),
    (dict(window=True), TypeError, r"window: expected None or an int >= 1 .*got True"),
    (dict(softcap=0.0), ValueError, r"softcap: expected None or a finite float > 0 .*got 0.0"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected None or a finite float > 0 .*got -1.0"),
    (dict(softcap=float("inf")), ValueError, r"softcap: expected .*got inf"),
    (dict(softcap=float("nan")), ValueError, r"softcap: expected .*got nan"),
    (dict(softcap="5"), TypeError, r"softcap: expected .*got '5'"),
    (dict(sinks=[0.0, 1.0]), TypeError, r"sinks: expected a torch.Tensor"),
    (dict(sinks=torch.zeros(2, dtype=torch.float64)), TypeError, r"sinks: expected dtype float32"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks: expected shape \(2\)"),
    (dict(sinks=torch.zeros(1, 2)), ValueError, r"sinks: expected a tensor of rank 1"),
]


@pytest.mark.parametrize("op", ["tree_attention", "draft_attention"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs, error, match", BAD_FEATURES)
def test_bad_features_name_the_argument_and_write_nothing(op, backend, kwargs, error, match):
    if _backend.why_unavailable(op, backend, CPU) is not None:
        pytest.skip(f"backend {backend} unavailable")
    args = _tree_args() if op == "tree_attention" else _draft_args()
    before = [a.clone() for a in args[3:5]]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        getattr(ps_kernels, op)(*args, backend=backend, **kwargs)
    assert info.type is error
    assert all(torch.equal(a, b) for a, b in zip(args[3:5], before))


@pytest.mark.parametrize("op", ["tree_attention", "draft_attention"])
@pytest.mark.parametrize("sinks, match", [
    (torch.zeros(3), r"sinks: expected a contiguous float32 CPU tensor \[2\]"),
    (torch.zeros(2, dtype=torch.float64), r"sinks: expected a contiguous float32 CPU tensor \[2\]"),
    (torch.zeros(2, 2), r"sinks: expected a contiguous float32 CPU tensor \[2\]"),
])
def test_native_binding_refuses_bad_sinks_without_validation(op, sinks, match):
    """validate=False skips the Python checks of the sinks tensor for the native backend: its
    binding must still refuse one it would read out of bounds, before writing the caches."""
    if _native_reason() is not None:
        pytest.skip(str(_native_reason()))
    args = _tree_args() if op == "tree_attention" else _draft_args()
    before = [a.clone() for a in args[3:5]]
    with pytest.raises(RuntimeError, match=match):
        getattr(ps_kernels, op)(*args, sinks=sinks, validate=False, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(args[3:5], before))


def test_native_schema_refuses_negative_window_and_softcap():
    # the backend-level convention (0 = off) still refuses what no op passes
    if _native_reason() is not None:
        pytest.skip(str(_native_reason()))
    q, k, v, kc, vc, lens, mask = _tree_args()
    mask = mask.contiguous()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    with pytest.raises(RuntimeError, match=r"window: expected >= 0 \(0 = no window\), got -1"):
        torch.ops.ps_kernels_C.tree_attention(q, k, v, kc, vc, lens, mask, 0.1, -1, 0.0, None, out, lse)
    with pytest.raises(RuntimeError, match=r"softcap: expected a finite value >= 0 \(0 = off\), got -2"):
        torch.ops.ps_kernels_C.tree_attention(q, k, v, kc, vc, lens, mask, 0.1, 0, -2.0, None, out, lse)
