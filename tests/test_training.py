"""Training pipeline: ShareGPT parsing and split, self-distillation and the target pass on a
tiny model, the training loop (learning, resume), and DDP over 2 CPU processes."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from drafter_helpers import target_features, tiny_target

from parallelspec.drafters import ParallelDrafter
from parallelspec.tools.training import data as D
from parallelspec.tools.training.extract import check_aux_layers, extract_shard, generate_and_extract
from parallelspec.tools.training.train import TrainConfig, build_draft_vocab, ShardData, train

V = 96


def test_iter_sharegpt_stops_at_truncated_tail(tmp_path):
    records = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": "q%d, {]\\\"} [" % i},
                                                  {"from": "gpt", "value": "a" * (i + 1)}]} for i in range(5)]
    text = json.dumps(records, indent=1)
    path = tmp_path / "s.json"
    path.write_text(text[:text.rindex('"a')])                      # cut inside the last record
    got = list(D.iter_sharegpt(path, chunk_chars=37))               # small chunks: records span reads
    assert [r["id"] for r in got] == [f"c{i}_0" for i in range(4)]
    path.write_text(text)
    assert len(list(D.iter_sharegpt(path, chunk_chars=50))) == 5


def test_shipped_sharegpt_parses():
    ids = [r["id"] for r in D.iter_sharegpt()]
    assert 17_000 < len(ids) < 18_500


def test_split_is_by_conversation_and_deterministic():
    ids = [f"abc{i}" for i in range(2000)]
    held = [D.is_held_out(i + "_0", 0.1) for i in ids]
    assert 120 < sum(held) < 280
    assert held == [D.is_held_out(i + "_3", 0.1) for i in ids]     # parts of one chat together


def test_messages_and_prompt():
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                             {"from": "human", "value": " "}]}
    assert D.conversation_messages(rec) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert D.conversation_messages({"conversations": [{"from": "alien", "value": "x"}]}) == []

    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + ("|>" if add_generation_prompt else "")

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    assert D.first_prompt(Tok(), rec) == [ord(c) for c in "hi|>"]
    assert D.first_prompt(Tok(), {"conversations": [{"from": "gpt", "value": "x"}]}) is None


def test_extract_shard_matches_target():
    model = tiny_target()
    seqs = [[1, 2, 3, 6, 7, 8, 9], [4, 5, 10]]
    calls = []
    # batches of at most 7 tokens: one sequence each (shortest first), progress after each
    out = extract_shard(model, seqs, [3, 2], top_k=5, batch_tokens=7, autocast_dtype=None,
                        progress=lambda done, total: calls.append((done, total)))
    assert out["start"] == [3, 2] and calls == [(1, 2), (2, 2)]
    for i, seq in enumerate(seqs):
        feats, probs = target_features(model, torch.tensor([seq]))
        assert out["ids"][i].tolist() == seq
        torch.testing.assert_close(out["feat"][i].float(), feats[0], atol=2e-2, rtol=1e-2)
        want_p, want_i = probs[0].topk(5)
        assert torch.equal(out["topk_ids"][i].long(), want_i)
        torch.testing.assert_close(out["topk_p"][i].float(), want_p, atol=1e-3, rtol=1e-3)


def test_generate_and_extract_is_greedy_and_matches_the_target_pass():
    """Batched (ragged, rows finishing early at EOS) equals one prompt at a time; every token is
    the target's argmax; features and top-K equal a plain target pass over the result."""
    model = tiny_target()
    prompts = [[1, 5, 7], [3, 4, 9, 10, 11, 2, 8], [6], [12, 13]]
    probe = generate_and_extract(model, prompts, 7, -1, top_k=1, autocast_dtype=None)
    eos = int(probe["ids"][1][len(prompts[1]) + 2])          # a token some row makes early
    calls = []
    batched = generate_and_extract(model, prompts, 7, eos, top_k=4, batch_size=3, autocast_dtype=None,
                                   progress=lambda done, total: calls.append((done, total)))
    # within a batch after every step (fractional), and each batch's end
    assert (3, 4) in calls and calls[-1] == (4, 4) and {t for _, t in calls} == {4}
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and 0 < calls[0][0] < 3
    early = 0
    for i, p in enumerate(prompts):
        single = generate_and_extract(model, [p], 7, eos, top_k=4, autocast_dtype=None)
        seq = batched["ids"][i].tolist()
        assert seq == single["ids"][0].tolist() and seq[:len(p)] == p and batched["start"][i] == len(p)
        assert len(seq) == len(p) + 7 or seq[-1] == eos
        early += len(seq) < len(p) + 7
        ref = extract_shard(model, [seq], [len(p)], top_k=4, autocast_dtype=None)
        n = len(seq) - 1            # the last token's own feature/top-K are never needed
        torch.testing.assert_close(batched["feat"][i][:n].float(), ref["feat"][0][:n].float(), atol=1e-2, rtol=1e-2)
        assert torch.equal(batched["topk_ids"][i][len(p) - 1:n], ref["topk_ids"][0][len(p) - 1:n])
        assert torch.equal(batched["topk_ids"][i][len(p) - 1:n, 0].long(), torch.tensor(seq[len(p):]))
        torch.testing.assert_close(batched["topk_p"][i][len(p) - 1:n].float(),
                                   ref["topk_p"][0][len(p) - 1:n].float(), atol=1e-3, rtol=1e-3)
    assert early, "no row finished early: pick another eos"


def tiny_shards(tmp_path, n_train=12, n_held=4, seed=0, aux_layers=()):
    """Extracted shards of random sequences through the tiny target (aux_layers: with aux features)."""
    model = tiny_target()
    g = torch.Generator().manual_seed(seed)

    def shard(n):
        prompts = [torch.randint(1, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
        gens = [torch.randint(1, V, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
        return extract_shard(model, [p + g for p, g in zip(prompts, gens)], [len(p) for p in prompts], top_k=8,
                             autocast_dtype=None, aux_layers=aux_layers)

    torch.save(shard(n_train), tmp_path / "train-ext-00000.pt")
    torch.save(shard(n_held), tmp_path / "heldout-ext-00000.pt")
    return model, [tmp_path / "train-ext-00000.pt"], [tmp_path / "heldout-ext-00000.pt"]


def small_cfg(**kw):
    base = dict(depth=3, draft_vocab=64, steps=8, batch_size=4, anchor_frac=0.5, lr=3e-3, warmup=2,
                eval_every=4, eval_sequences=4, checkpoint_every=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind,layout", [("parallel", "fused"), ("eagle", "fused"), ("parallel", "eagle3"),
                                         ("parallel", "peagle")])
def test_training_learns_and_saves(kind, layout, tmp_path):
    model, tr, ho = tiny_shards(tmp_path, aux_layers=[0, 1, 1] if layout == "peagle" else ())
    net, summary = train(small_cfg(kind=kind, layout=layout, steps=30, eval_every=30), model, tr, ho,
                         tmp_path / "run", log=lambda m: None)
    losses = summary["losses"]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    ev = summary["history"][-1]
    top1 = ev["heldout_top1"]
    assert len(top1) == 3
    # a chain step takes 1 + the run of correct depths from depth 1: at most 1 + depth 1's rate per
    # depth, and at most 1 + the sum of the per-depth rates (rounded to 4 decimals)
    assert 1.0 <= ev["chain_accept"] <= 1 + min(3 * top1[0], sum(top1)) + 2e-4, ev
    cls = ParallelDrafter if kind == "parallel" else __import__("parallelspec").drafters.EagleDrafter
    loaded = cls.from_pretrained(tmp_path / "run" / "drafter", model)
    assert loaded.net.draft_vocab_size == 64 and loaded.net.cfg.layout == layout
    assert loaded.aux_layers == ((0, 1, 1) if layout == "peagle" else ())


def test_aux_features_are_the_hidden_states_entering_those_layers():
    """extract --aux-layers keeps, per position, the hidden states entering the named layers
    (repeats allowed, in the given order), equal to the layers' inputs caught by forward pre-hooks
    (what TargetModel.aux_hidden_states gathers in the decoding loop); the batched
    self-distillation path keeps the same; out-of-range layers are refused by flag name."""
    model = tiny_target()
    d = model.config.hidden_size
    seqs = [[1, 2, 3, 6, 7, 8, 9], [4, 5, 10]]
    layers = [1, 0, 1]
    out = extract_shard(model, seqs, [3, 2], top_k=4, autocast_dtype=None, aux_layers=layers)
    assert out["aux_layers"] == layers
    for i, seq in enumerate(seqs):
        store = {}
        hooks = [model.model.layers[j].register_forward_pre_hook(
            lambda m, a, k, j=j: store.__setitem__(j, a[0] if a else k["hidden_states"]), with_kwargs=True)
            for j in (0, 1)]
        with torch.no_grad():
            model.model(input_ids=torch.tensor([seq]))
        for h in hooks:
            h.remove()
        want = torch.cat([store[j][0] for j in layers], dim=-1)
        assert out["aux"][i].dtype == torch.bfloat16 and out["aux"][i].shape == (len(seq), 3 * d)
        torch.testing.assert_close(out["aux"][i].float(), want, atol=2e-2, rtol=1e-2)
    gen = generate_and_extract(model, [[1, 5, 7], [3, 4]], 5, -1, top_k=2, autocast_dtype=None, aux_layers=layers)
    for i, seq in enumerate(gen["ids"]):
        ref = extract_shard(model, [seq.tolist()], [3], top_k=2, autocast_dtype=None, aux_layers=layers)
        n = len(seq) - 1            # the last token's own features are never needed
        torch.testing.assert_close(gen["aux"][i][:n].float(), ref["aux"][0][:n].float(), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"--aux-layers: expected decoder layer indices in \[0, 2\) .* got \[0, 2\]"):
        check_aux_layers([0, 2], model)


def test_peagle_training_needs_aux_shards(tmp_path):
    """--layout peagle on shards made without --aux-layers says which flag makes them."""
    model, tr, ho = tiny_shards(tmp_path)
    with pytest.raises(ValueError, match="holds no aux features.*extract --aux-layers eagle3"):
        train(small_cfg(layout="peagle"), model, tr, ho, tmp_path / "run", log=lambda m: None)


def test_main_train_cli(tmp_path):
    from parallelspec.tools.training.train import main_train

    model, _, _ = tiny_shards(tmp_path)
    model.save_pretrained(tmp_path / "target")
    argv = ["--target", str(tmp_path / "target"), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
            "--k", "2", "--draft-vocab", "50", "--steps", "3", "--batch", "2", "--warmup", "1", "--eval-sequences", "2"]
    assert main_train(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["config"]["depth"] == 2
    assert ParallelDrafter.from_pretrained(tmp_path / "run" / "drafter", model).net.draft_vocab_size == 50


def test_resume_continues_the_same_run(tmp_path):
    model, tr, ho = tiny_shards(tmp_path)
    net_a, straight = train(small_cfg(), model, tr, ho, tmp_path / "a", log=lambda m: None)
    train(small_cfg(stop_after=3), model, tr, ho, tmp_path / "b", log=lambda m: None)
    net_b, resumed = train(small_cfg(), model, tr, ho, tmp_path / "b", log=lambda m: None)
    assert resumed["losses"] == straight["losses"][3:]
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in e.items() if k != "elapsed"} for e in h if e["step"] in (4, 8)]
    assert strip(resumed["history"]) == strip(straight["history"])


def test_draft_vocab_counts_generated_choices(tmp_path):
    _, tr, _ = tiny_shards(tmp_path)
    data = ShardData(tr)
    d2t, coverage = build_draft_vocab(data, 10)
    counts = torch.zeros(V, dtype=torch.long)
    for s in data.seqs:
        counts += torch.bincount(s["topk_ids"][s["start"] - 1:len(s["ids"]) - 1, 0].long(), minlength=V)
    assert torch.equal(counts[d2t], counts.sort(descending=True).values[:10])
    assert coverage == pytest.approx(float(counts[d2t].sum() / counts.sum()))
    # a prior ranks what the generated text never chose, and mixes into the rest
    seen = int((counts > 0).sum())
    prior = torch.arange(V, 0, -1)                    # id 0 most frequent
    d2t, _ = build_draft_vocab(data, seen + 5, prior, prior_weight=1e-6)
    assert set(d2t[:seen].tolist()) == set(counts.nonzero().squeeze(1).tolist())
    assert d2t[seen:].tolist() == [i for i in range(V) if counts[i] == 0][:5]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp, kind, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from parallelspec.tools.training import dist as pdist

    pdist.init()
    model = tiny_target()
    net, summary = train(small_cfg(kind=kind, eval_every=100), model, [tmp / "train-ext-00000.pt"], [],
                         tmp / "ddp", device=torch.device("cpu"), log=lambda m: None)
    result[rank] = ({k: v.detach().clone() for k, v in net.state_dict().items()}, summary["losses"])
    pdist.shutdown()


@pytest.mark.parametrize("kind", ["parallel", "eagle"])
def test_ddp_two_processes_match_single(kind, tmp_path):
    model, tr, _ = tiny_shards(tmp_path)
    net1, single = train(small_cfg(kind=kind, eval_every=100), model, tr, [], tmp_path / "one", log=lambda m: None)
    port = _free_port()
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, tmp_path, kind, result), nprocs=2, join=True)
        (w0, l0), (w1, l1) = result[0], result[1]
    for name, value in w0.items():
        assert torch.equal(value, w1[name]), name                  # ranks hold identical weights
        torch.testing.assert_close(value, net1.state_dict()[name], atol=1e-5, rtol=1e-4)
    assert l0 == l1
    torch.testing.assert_close(torch.tensor(l0), torch.tensor(single["losses"]), atol=1e-5, rtol=1e-5)


def test_ngram_proposal_copies_the_latest_longest_match():
    from parallelspec.tools.training.report import ngram_proposal

    ctx = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert ngram_proposal(ctx, 3) == [4, 5, 7]     # no earlier "7 2 3"; the latest earlier "2 3" precedes 4 5 7
    assert ngram_proposal([5, 6, 7], 2) == []
    assert ngram_proposal([4, 8, 4], 2) == [8, 4]


# ---------------------------------------------------------------- distillation, schedule restart

def test_distilled_slot_loss_is_the_mix_of_target_and_teacher_ce(tmp_path):
    """Depths >= 2: CE = (1 - w) * CE(target labels) + w * CE(the EAGLE teacher's top-32 at the
    same anchor) where the teacher's chain reaches, the target's CE alone where it does not;
    depth 1 never sees the teacher. Reference: the teacher's own forward, row by row."""
    from parallelspec.tools.training.train import (forward_losses, gather_labels, label_rows, load_teacher, soft_ce,
                                             target_to_draft)
    from parallelspec.drafters import build_network
    from parallelspec.tools.training.forwards import TrainingForward, train_forward

    model, tr, ho = tiny_shards(tmp_path)
    train(small_cfg(kind="eagle", steps=4), model, tr, ho, tmp_path / "eagle", log=lambda m: None)
    w = 0.3
    cfg = small_cfg(distill_from=str(tmp_path / "eagle" / "drafter"), distill_weight=w)
    teacher = load_teacher(cfg, model, torch.device("cpu"))
    data = ShardData(tr)
    student = build_network(model, parallel=True, depth=3, draft_to_target=teacher.draft_to_target[:40], seed=1)
    t2d = target_to_draft(student.draft_to_target, model.config.vocab_size)
    batch = data.batch([0, 1, 2], torch.device("cpu"))
    n = batch["tokens"].shape[1]
    anchors = torch.arange(batch["first_anchor"], n)          # the last two run past the teacher's reach
    plain = forward_losses(TrainingForward(student), student, cfg, batch, anchors, t2d)
    mixed = forward_losses(TrainingForward(student), student, cfg, batch, anchors, t2d, teacher)
    assert torch.equal(plain[0][0], mixed[0][0]) and torch.equal(plain[2], mixed[2])
    with torch.no_grad():
        _, slot_g = train_forward(student, batch["tokens"], batch["features"], anchors)
        reach = anchors + 2 < n
        _, t_slots = train_forward(teacher, batch["tokens"], batch["features"], anchors[reach])
    _, slot_pos = label_rows(anchors, 3, n)
    for d in (1, 2):
        ids, p, valid = gather_labels(batch, slot_pos[:, d - 1])
        valid = valid & (t2d[ids[..., 0]] >= 0)
        want = 0.0
        for b in range(3):
            for a in range(len(anchors)):
                if not valid[b, a]:
                    continue
                logits = student.logits(slot_g[b, a, d - 1][None])
                ce_t = soft_ce(logits, ids[b, a][None], p[b, a][None], t2d)[0]
                if reach[a]:
                    tp = torch.softmax(teacher.logits(t_slots[b, int(reach[:a].sum()), d - 1][None]), -1)
                    top = tp.topk(32, dim=-1)
                    ce_q = soft_ce(logits, teacher.draft_to_target[top.indices], top.values, t2d)[0]
                    ce_t = (1 - w) * ce_t + w * ce_q
                want += float(ce_t)
        assert float(mixed[0][d].detach()) == pytest.approx(want, rel=1e-4)
        assert float(mixed[0][d].detach()) != pytest.approx(float(plain[0][d].detach()), rel=1e-4)


def test_distilled_training_learns_and_checks_its_teacher(tmp_path):
    model, tr, ho = tiny_shards(tmp_path)
    train(small_cfg(kind="eagle", steps=4), model, tr, ho, tmp_path / "eagle", log=lambda m: None)
    train(small_cfg(kind="parallel", steps=4), model, tr, ho, tmp_path / "par", log=lambda m: None)
    teacher = str(tmp_path / "eagle" / "drafter")
    _, summary = train(small_cfg(steps=30, eval_every=30, distill_from=teacher), model, tr, ho, tmp_path / "run",
                       log=lambda m: None)
    assert sum(summary["losses"][-5:]) < sum(summary["losses"][:5])
    for kw, match in ((dict(distill_from=str(tmp_path / "par" / "drafter")), "EAGLE-style drafter of depth 3"),
                      (dict(distill_from=teacher, depth=2), "EAGLE-style drafter of depth 2"),
                      (dict(distill_from=teacher, kind="eagle"), "--kind eagle"),
                      (dict(distill_from=teacher, distill_weight=1.5), "--distill-weight")):
        with pytest.raises(ValueError, match=match):
            train(small_cfg(**kw), model, tr, ho, tmp_path / f"bad{len(match)}", log=lambda m: None)


def test_restart_schedule_starts_a_fresh_cycle_on_resume(tmp_path):
    from parallelspec.tools.training.train import lr_at

    cfg = small_cfg(steps=20, warmup=2, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(5e-4) and lr_at(20, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg, cycle_start=10) == lr_at(0, cfg)                # warmup again
    assert lr_at(20, cfg, cycle_start=10) == pytest.approx(1e-4)          # the floor at --steps
    assert lr_at(11, cfg, cycle_start=10) > lr_at(15, cfg, cycle_start=10) > lr_at(19, cfg, cycle_start=10)
    model, tr, ho = tiny_shards(tmp_path)
    logs = []
    train(small_cfg(steps=6), model, tr, ho, tmp_path / "r", log=lambda m: None)
    train(small_cfg(steps=16, restart_schedule=True), model, tr, ho, tmp_path / "r", log=logs.append)
    lrs = [json.loads(m)["lr"] for m in logs if m.startswith('{"step"')]
    assert lrs[0] == pytest.approx(lr_at(9, small_cfg(steps=16), cycle_start=6), abs=1e-6)   # step 10's lr
    assert torch.load(tmp_path / "r" / "checkpoint.pt")["cycle_start"] == 6
    # resumed again without the flag: the restarted cycle goes on
    train(small_cfg(steps=18), model, tr, ho, tmp_path / "r", log=lambda m: None)
    assert torch.load(tmp_path / "r" / "checkpoint.pt")["cycle_start"] == 6


def _fused_and_eagle3(model, depth=3, seed=0):
    from parallelspec.drafters import build_network

    src = build_network(model, parallel=True, depth=depth, draft_to_target=torch.arange(64), seed=seed)
    dst = build_network(model, parallel=True, depth=depth, draft_to_target=torch.arange(64), layout="eagle3",
                        seed=seed + 1)
    return src, dst


def test_warm_start_same_layout_copies_every_tensor():
    from parallelspec.drafters import build_network
    from parallelspec.tools.training.warmstart import warm_start

    model = tiny_target()
    src, _ = _fused_and_eagle3(model)
    dst = build_network(model, parallel=True, depth=3, draft_to_target=torch.arange(64), seed=5)
    assert warm_start(dst, src, torch.tensor([1]), torch.zeros(1, src.cfg.hidden_size))["fit_rel_err"] == 0.0
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_warm_start_fused_to_eagle3_reproduces_an_exactly_mappable_layer_0():
    """A fused fc that ignores e and rotates f (c * Q, Q orthogonal): RMSNorm(c Q f) = Q rms(f) is
    linear in eagle3's inputs, so the fitted map must reproduce layer 0's q/k/v on unseen rows."""
    from parallelspec.drafters.network import rope_cos_sin
    from parallelspec.tools.training.warmstart import warm_start

    model = tiny_target()
    src, dst = _fused_and_eagle3(model)
    d = src.cfg.hidden_size
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        src.fc.weight.copy_(torch.cat([torch.zeros(d, d), 3.0 * q], 1))
        src.layers[0].input_norm.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    fit_tokens, fit_feat = torch.randint(0, V, (200,), generator=g), torch.randn(200, d, generator=g)
    fit = warm_start(dst, src, fit_tokens, fit_feat)
    assert fit["fit_rel_err"] < 1e-2
    tokens, feat = torch.randint(0, V, (1, 9), generator=g), torch.randn(1, 9, d, generator=g)
    cos, sin = rope_cos_sin(torch.arange(9)[None], src.cfg.head_dim, src.cfg.rope_theta, torch.float32)
    with torch.no_grad():
        want = src.layers[0].qkv(src.fuse(tokens, feat), cos, sin)
        got = dst.layers[0].qkv(dst.fuse(tokens, feat), cos, sin)
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, atol=2e-2, rtol=2e-2)
    for name in ("o_proj", "gate_proj", "up_proj", "down_proj", "post_norm"):
        assert torch.equal(getattr(dst.layers[0], name).weight, getattr(src.layers[0], name).weight), name
    assert torch.equal(dst.norm.weight, src.norm.weight)


def test_init_from_takes_the_source_vocabulary_and_refuses_another_shape(tmp_path):
    model, tr, ho = tiny_shards(tmp_path)
    train(small_cfg(steps=4), model, tr, ho, tmp_path / "src", log=lambda m: None)
    source = tmp_path / "src" / "drafter"
    logs = []
    net, _ = train(small_cfg(steps=2, layout="eagle3", draft_vocab=32, init_from=str(source)), model, tr, ho,
                   tmp_path / "dst", log=logs.append)
    src_net = ParallelDrafter.from_pretrained(source, model).net
    assert torch.equal(net.draft_to_target, src_net.draft_to_target)        # 64 ids, not --draft-vocab 32
    assert any("fused -> eagle3" in m for m in logs)
    with pytest.raises(ValueError, match="depth 3 \\(this run: 2\\)"):
        train(small_cfg(depth=2, init_from=str(source)), model, tr, ho, tmp_path / "bad", log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="--init-from"):
        train(small_cfg(init_from=str(tmp_path / "nowhere")), model, tr, ho, tmp_path / "bad2", log=lambda m: None)
