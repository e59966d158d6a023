"""ParallelDrafter / EagleDrafter: inference agrees with the training forward, persistence,
target checks, bad inputs."""
import pytest
import torch
from drafter_helpers import tiny_target

from parallelspec.drafters import EagleDrafter, ParallelDrafter, build_network
from parallelspec.tools.training.forwards import eagle_train_forward
from parallelspec.tools.training.forwards import MaskedAttention, group_layout
from parallelspec.tools.training.forwards import parallel_train_forward

V, D = 96, 48
CPU = torch.device("cpu")


#: the peagle layout's aux layers on the 2-layer tiny target (EAGLE-3's default needs >= 4 layers)
AUX = [0, 1, 1]


def make(kind, depth=4, head="target", vocab=40, layers=1, seed=1, slot1="mask", layout="fused"):
    target = tiny_target()
    d2t = None if vocab is None else torch.randperm(V, generator=torch.Generator().manual_seed(3))[:vocab]
    net = build_network(target, parallel=kind is ParallelDrafter, depth=depth, draft_to_target=d2t, head=head,
                        num_layers=layers, slot1=slot1, layout=layout, aux_layers=AUX if layout == "peagle" else None,
                        seed=seed)
    return target, kind(net, top_m=net.draft_vocab_size)


def feature_width(drafter) -> int:
    """What step() reads: the last hidden state, then the aux hidden states (peagle layout)."""
    return D * (1 + len(drafter.aux_layers))


def training_logprobs(drafter, tokens, features, anchors):
    fwd = parallel_train_forward if isinstance(drafter, ParallelDrafter) else eagle_train_forward
    real, slots = fwd(drafter.net, tokens, features, anchors)
    with torch.no_grad():
        per_depth = drafter.net.logits(torch.cat([real[:, anchors, None], slots], dim=2))   # [B, A, k, Vd]
        lp = torch.log_softmax(per_depth, dim=-1)
    return lp, drafter.net.draft_to_target


def as_dense(cands, d2t):
    """DraftCandidates holding the whole draft vocabulary -> logprobs [B, k, Vd] in draft-id order."""
    t2d = torch.full((V,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(d2t.numel())
    out = torch.empty(cands.tokens.shape, dtype=torch.float32)
    return out.scatter_(2, t2d[cands.tokens], cands.logprobs)


SHAPES = [(4, 40, "target", 1), (3, None, "trained", 2), (1, 40, "trained", 1)]


@pytest.mark.parametrize("kind,slot1,depth,vocab,head,layers,layout",
                         [(kind, "mask", *shape, "fused") for kind in (ParallelDrafter, EagleDrafter) for shape in SHAPES]
                         + [(ParallelDrafter, "draft", *shape, "fused") for shape in SHAPES if shape[0] >= 2]
                         + [(ParallelDrafter, "mask", *shape, layout) for shape in SHAPES
                            for layout in ("eagle3", "peagle")])
def test_step_matches_training_forward(kind, slot1, depth, vocab, head, layers, layout):
    """Ragged batch stepped in chunks; each step's per-depth distributions equal the training
    forward's at that anchor (real row + its group of slots), to fp32 rounding; in every layer
    layout (fused; vLLM's eagle3 with one shared mask; peagle, that layer over aux features)."""
    _, drafter = make(kind, depth=depth, head=head, vocab=vocab, layers=layers, slot1=slot1, layout=layout)
    B, n = 3, 14
    W = feature_width(drafter)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, n), generator=g)
    features = torch.randn(B, n, W, generator=g)
    chunks = torch.tensor([[5, 3, 1, 2], [1, 4, 2, 3], [7, 1, 1, 1]])     # new tokens per step
    drafter.reset(B, 32, CPU, torch.float32)
    starts = torch.zeros(B, dtype=torch.long)
    for s in range(chunks.shape[1]):
        lens = chunks[:, s]
        R = int(lens.max())
        idx = (starts[:, None] + torch.arange(R)).clamp(max=n - 1)
        cands = drafter.step(tokens.gather(1, idx), features.gather(1, idx[..., None].expand(-1, -1, W)), lens)
        starts += lens
        assert torch.equal(drafter.cache_lens, starts)
        # which depths later candidates were drafted under (AutoTree hangs them there only)
        assert cands.conditioned_depths == (depth - 1 if kind is EagleDrafter else int(slot1 == "draft"))
        got = as_dense(cands, drafter.net.draft_to_target)
        for b in range(B):
            anchor = int(starts[b]) - 1
            seq_tokens = tokens[b:b + 1, :anchor + depth].clone()
            if kind is EagleDrafter or slot1 == "draft":
                # the training forward feeds the data's tokens: make them the step's top-1 chain
                seq_tokens = torch.cat([tokens[b:b + 1, :anchor + 1], cands.tokens[b:b + 1, :depth - 1, 0]], 1)
            seq_feats = torch.cat([features[b:b + 1, :anchor + 1], torch.randn(1, depth - 1, W)], 1)
            want, _ = training_logprobs(drafter, seq_tokens, seq_feats, torch.tensor([anchor]))
            torch.testing.assert_close(got[b], want[0, 0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [ParallelDrafter, EagleDrafter])
def test_half_precision_head_drafts_the_same_to_rounding(kind):
    """head_dtype=bf16 (a CPU drafter's head copy at half the bytes): the same candidates'
    log-probabilities to bf16 rounding of the head; a bad head_dtype is refused by name."""
    from parallelspec.hf.linear import native_serves

    _, ref = make(kind, vocab=None)
    half = kind(ref.net, top_m=ref.top_m, head_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    tokens, features = torch.randint(0, V, (2, 6), generator=g), torch.randn(2, 6, D, generator=g)
    lens = torch.tensor([6, 3])
    out = []
    for d in (ref, half):
        d.reset(2, 16, CPU, torch.float32)
        out.append(as_dense(d.step(tokens, features, lens), d.net.draft_to_target))
    assert (half._head is not None) == native_serves(CPU)
    torch.testing.assert_close(out[1], out[0], atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="head_dtype: expected None, torch.bfloat16 or torch.float16"):
        kind(ref.net, head_dtype=torch.float64)


def test_slot1_config_checked():
    target = tiny_target()
    for kw in (dict(parallel=False, depth=4), dict(parallel=True, depth=1)):
        with pytest.raises(ValueError, match="slot1='draft' needs a parallel drafter"):
            build_network(target, slot1="draft", **kw)
    with pytest.raises(ValueError, match="slot1: expected 'mask' or 'draft', got 'token'"):
        build_network(target, parallel=True, slot1="token")


def test_slot1_draft_conditions_later_depths_on_the_drafted_token():
    """With slot1='draft', depths 2..k move with the token fed to slot 1 (and depth 1 does not);
    with 'mask' they cannot (the slots never see the next token)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (1, 10), generator=g)
    features = torch.randn(1, 10, D, generator=g)
    anchors = torch.tensor([5])     # one anchor: the changed token is after every row it reads
    other = tokens.clone()
    other[0, anchors + 1] = (other[0, anchors + 1] + 1) % V
    for slot1, moves in (("draft", True), ("mask", False)):
        _, drafter = make(ParallelDrafter, slot1=slot1)
        a, _ = training_logprobs(drafter, tokens, features, anchors)
        b, _ = training_logprobs(drafter, other, features, anchors)
        assert torch.equal(a[..., 0, :], b[..., 0, :])
        assert (not torch.allclose(a[..., 1:, :], b[..., 1:, :])) == moves, slot1


def test_real_rows_ignore_slots_and_later_tokens():
    """Changing later tokens or the mask vectors does not move a group's or an earlier row's outputs."""
    _, drafter = make(ParallelDrafter)
    n = 10
    tokens, features = torch.randint(0, V, (1, n)), torch.randn(1, n, D)
    anchors = torch.tensor([2, 5])
    real, slots = parallel_train_forward(drafter.net, tokens, features, anchors)
    tokens2, features2 = tokens.clone(), features.clone()
    tokens2[:, 6:] = (tokens2[:, 6:] + 1) % V
    features2[:, 6:] += 1
    real2, slots2 = parallel_train_forward(drafter.net, tokens2, features2, anchors)
    torch.testing.assert_close(real[:, :6], real2[:, :6])
    torch.testing.assert_close(slots, slots2)
    with torch.no_grad():
        drafter.net.mask_embed.add_(1.0)
    real3, slots3 = parallel_train_forward(drafter.net, tokens, features, anchors)
    torch.testing.assert_close(real, real3)
    assert not torch.allclose(slots, slots3)


def test_eagle3_layout_shape_and_shared_mask():
    """eagle3: no fc, layer 0 has q/k/v over 2d and a hidden_norm, one mask_hidden [d] and the
    mask token's embedding feed every slot; the fused layout's tensors are unchanged."""
    _, fused = make(ParallelDrafter)
    assert fused.net.mask_hidden is None and fused.net.fc is not None
    assert "layers.0.hidden_norm.weight" not in fused.net.state_dict()
    _, drafter = make(ParallelDrafter, layout="eagle3", layers=2)
    net = drafter.net
    names = set(net.state_dict())
    assert net.fc is None and not any(k.startswith("fc.") or k == "mask_embed" for k in names)
    assert net.layers[0].q_proj.weight.shape == (48, 96) and net.layers[1].q_proj.weight.shape == (48, 48)
    assert "layers.0.hidden_norm.weight" in names and "layers.1.hidden_norm.weight" not in names
    assert net.mask_hidden.shape == (D,) and net.cfg.mask_token_id == V - 1
    slots = net.mask_inputs()
    assert slots.shape == (3, 2 * D) and torch.equal(slots[0], slots[2])
    torch.testing.assert_close(slots[0, :D], net.embed_weight[V - 1])
    torch.testing.assert_close(slots[0, D:], net.mask_hidden)


def test_eagle3_slots_differ_by_position_only():
    """One shared mask input: a group's slots still draft different distributions (their
    positions differ), and moving mask_hidden moves the slots but not the real rows."""
    _, drafter = make(ParallelDrafter, layout="eagle3")
    g = torch.Generator().manual_seed(7)
    tokens, features = torch.randint(0, V, (1, 10), generator=g), torch.randn(1, 10, D, generator=g)
    anchors = torch.tensor([3, 6])
    real, slots = parallel_train_forward(drafter.net, tokens, features, anchors)
    assert not torch.allclose(slots[:, :, 0], slots[:, :, 1])
    with torch.no_grad():
        drafter.net.mask_hidden.add_(1.0)
    real2, slots2 = parallel_train_forward(drafter.net, tokens, features, anchors)
    torch.testing.assert_close(real, real2)
    assert not torch.allclose(slots, slots2)


def test_eagle3_config_checked():
    target = tiny_target()
    for kw in (dict(parallel=False), dict(parallel=True, slot1="draft")):
        with pytest.raises(ValueError, match="layout='eagle3' is vLLM's parallel drafting"):
            build_network(target, layout="eagle3", **kw)
    with pytest.raises(ValueError, match="layout: expected one of 'fused', 'eagle3', 'peagle', got 'medusa'"):
        build_network(target, parallel=True, layout="medusa")
    with pytest.raises(ValueError, match=r"mask_token_id: expected a target id in \[0, 96\), got 96"):
        build_network(target, parallel=True, layout="eagle3", mask_token_id=96)
    with pytest.raises(ValueError, match="mask_token_id: only layouts 'eagle3' and 'peagle' have one"):
        build_network(target, parallel=True, mask_token_id=3)
    with pytest.raises(ValueError, match=r"aux_layers: layout='peagle' reads .* got \[2, -1\]"):
        build_network(target, parallel=True, layout="peagle", aux_layers=[2, -1])
    with pytest.raises(ValueError, match=r"aux_layers: only layout='peagle' .* got \[0\] with layout='eagle3'"):
        build_network(target, parallel=True, layout="eagle3", aux_layers=[0])


def test_peagle_layout_reads_the_aux_columns_through_fc():
    """peagle: fc over the aux hidden states (n d -> d), mask_hidden n d wide fed through the same fc;
    the step reads [last; aux] and ignores the last hidden state (it is not the layout's input),
    while every aux column moves the drafts; a feature tensor of the wrong width is refused by name."""
    _, drafter = make(ParallelDrafter, layout="peagle")
    net = drafter.net
    assert net.fc.weight.shape == (D, 3 * D) and net.mask_hidden.shape == (3 * D,)
    assert drafter.aux_layers == tuple(AUX)
    g = torch.Generator().manual_seed(6)
    tokens, features = torch.randint(0, V, (1, 5), generator=g), torch.randn(1, 5, 4 * D, generator=g)
    lens = torch.tensor([5])

    def drafts(f):
        drafter.reset(1, 16, CPU, torch.float32)
        return drafter.step(tokens, f, lens).logprobs

    base = drafts(features)
    last_changed = features.clone()
    last_changed[..., :D] += 1.0
    torch.testing.assert_close(drafts(last_changed), base, atol=0, rtol=0)
    for a in range(3):
        moved = features.clone()
        moved[..., D * (1 + a):D * (2 + a)] += 1.0
        assert not torch.allclose(drafts(moved), base)
    drafter.reset(1, 16, CPU, torch.float32)
    with pytest.raises(ValueError, match=r"features: expected \(1, 5, 192\) \(the last hidden state and the inputs of "
                                         r"target layers \[0, 1, 1\]"):
        drafter.step(tokens, features[..., :D], lens)


@pytest.mark.parametrize("layers", [1, 2])
def test_run_out_rows_equals_the_full_run_at_those_rows(layers):
    """run(out_rows=...) skips the last layer's projection and MLP on the other rows: the kept
    rows' outputs are the full run's (per sequence, repeated and unordered rows too)."""
    _, drafter = make(ParallelDrafter, layers=layers)
    net = drafter.net
    B, T = 2, 9
    x = torch.randn(B, T, D)
    positions = torch.arange(T).expand(B, -1) + torch.tensor([[0], [5]])
    rows = torch.tensor([[8, 0, 3], [2, 2, 7]])
    with torch.no_grad():
        full = net.run(x, positions, causal_attention(net, T))
        kept = net.run(x, positions, causal_attention(net, T), out_rows=rows)
    assert kept.shape == (B, 3, D)
    torch.testing.assert_close(kept, full.gather(1, rows[:, :, None].expand(-1, -1, D)), atol=1e-6, rtol=1e-6)


def causal_attention(net, T):
    attend = MaskedAttention(net.cfg.num_heads, net.cfg.num_kv_heads)
    attend.allowed = torch.ones(T, T, dtype=torch.bool).tril()
    return attend


def test_group_layout():
    positions, allowed = group_layout(4, torch.tensor([0, 2]), 2)
    assert positions.tolist() == [0, 1, 2, 3, 1, 3, 2, 4]
    rows = allowed.int().tolist()
    assert rows[3] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert rows[4] == [1, 0, 0, 0, 1, 0, 0, 0]          # anchor 0, slot 0
    assert rows[7] == [1, 1, 1, 0, 0, 1, 0, 1]          # anchor 2, slot 1: prefix 0..2, own slots


@pytest.mark.parametrize("kind,layout", [(ParallelDrafter, "fused"), (EagleDrafter, "fused"),
                                         (ParallelDrafter, "eagle3"), (ParallelDrafter, "peagle")])
def test_save_load_round_trip(kind, layout, tmp_path):
    target, drafter = make(kind, head="trained", layout=layout)
    drafter.save_pretrained(tmp_path, dtype=torch.float32)
    names = set(__import__("safetensors.torch").torch.load_file(str(tmp_path / "model.safetensors")))
    assert not any("embed" in k and "mask" not in k for k in names), names   # the target's tensors stay out
    loaded = kind.from_pretrained(tmp_path, target)
    assert loaded.top_m == drafter.top_m and loaded.net.cfg == drafter.net.cfg
    tokens, features, lens = torch.randint(0, V, (2, 5)), torch.randn(2, 5, feature_width(drafter)), torch.tensor([5, 3])
    outs = []
    for d in (drafter, loaded):
        d.reset(2, 16, CPU, torch.float32)
        outs.append(d.step(tokens, features, lens))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs)
    with pytest.raises(ValueError, match="expected a 'eagle'|expected a 'parallel'"):
        (EagleDrafter if kind is ParallelDrafter else ParallelDrafter).from_pretrained(tmp_path, target)


def test_half_precision_save_is_small_and_close(tmp_path):
    target, drafter = make(ParallelDrafter)
    drafter.save_pretrained(tmp_path)
    loaded = ParallelDrafter.from_pretrained(tmp_path, target)
    for a, b in zip(drafter.net.parameters(), loaded.net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_check_target_refuses_other_models():
    target, drafter = make(ParallelDrafter)
    drafter.check_target(target)
    drafter.check_target(tiny_target().to(torch.bfloat16))        # same weights, other dtype: fine
    with pytest.raises(ValueError, match="hidden_size: expected 48, got 60"):
        drafter.check_target(tiny_target(hidden=60))
    with pytest.raises(ValueError, match="vocab_size: expected 96, got 97"):
        drafter.check_target(tiny_target(vocab=97))
    with pytest.raises(ValueError, match="embedding fingerprint"):
        drafter.check_target(tiny_target(seed=5))                # same shapes, other weights


def test_bad_step_inputs():
    _, drafter = make(ParallelDrafter)
    with pytest.raises(RuntimeError, match="reset"):
        drafter.step(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, D), torch.tensor([2]))
    drafter.reset(2, 8, CPU, torch.float32)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="features: the parallel drafter needs"):
        drafter.step(tokens, None, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"features: expected \(2, 3, 48\)"):
        drafter.step(tokens, torch.zeros(2, 3, 40), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"tokens: expected \[B=2, R\]"):
        drafter.step(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, D), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"lens: expected \[B=2\]"):
        drafter.step(tokens, torch.zeros(2, 3, D), torch.tensor([3]))


def test_eagle_anchor_range_checked():
    _, drafter = make(EagleDrafter)
    with pytest.raises(ValueError, match="anchors: expected every anchor"):
        eagle_train_forward(drafter.net, torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, D), torch.tensor([3]))
