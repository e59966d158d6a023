"""`parallelspec export --format vllm`: the files vLLM's loader reads, checked without vLLM.

* manifest: the exact tensor names, shapes and dtypes and the config.json keys;
* an independent forward (``VllmParallelEagle3`` below, plain torch, reading only the exported
  files and the target's embedding, which vLLM shares with the drafter) written from vLLM's
  code: EAGLE-3 layer 0 without aux hidden states, stacked names, ``d2t`` offsets, and
  parallel drafting's input layout (shifted tokens, bonus row, K - 1 mask rows at last + j,
  rejected rows after them with unwritten K/V, one causal pass over a position-indexed cache).
  Several verify steps with accepts and rejects, batch 3, must give our drafter's ``step()``;
* the round trip (export -> import_vllm -> the same drafts; in the loop, the same accepted
  drafts) and refusals;
* the eagle3-layout drafter in our loop, distilled so that its drafts are accepted: greedy
  output equal to transformers' with acceptance above a floor, on every tree kind.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from drafter_helpers import peaked_random_weights, tiny_target

V, D = 96, 48
K = 4


def _eagle3_drafter(target, vocab=40, layers=1, head="trained", seed=1):
    """An eagle3-layout parallel drafter with random weights large enough for peaked drafts."""
    from parallelspec.drafters import ParallelDrafter, build_network

    d2t = None if vocab is None else torch.randperm(V, generator=torch.Generator().manual_seed(3))[:vocab]
    net = build_network(target, parallel=True, depth=K, draft_to_target=d2t, head=head, num_layers=layers,
                        layout="eagle3", mask_token_id=7, seed=seed)
    peaked_random_weights(net, seed)
    return ParallelDrafter(net, top_m=net.draft_vocab_size)


def _export(tmp_path, drafter, target=None, dtype="float32"):
    from parallelspec.tools.export import export_vllm

    drafter.save_pretrained(tmp_path / "run" / "drafter", dtype=torch.float32)
    return export_vllm(tmp_path / "run", tmp_path / "vllm", target, dtype)


# ---------------------------------------------------------------- manifest

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab,layers", [(40, 1), (None, 2)])
def test_manifest(tmp_path, vocab, layers, dtype):
    from safetensors import safe_open

    target = tiny_target()
    out = _export(tmp_path, _eagle3_drafter(target, vocab, layers), dtype=dtype)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    Vd, wt = vocab or V, getattr(torch, dtype)
    want = {"norm.weight": ((D,), wt), "lm_head.weight": ((Vd, D), wt), "mask_hidden": ((D,), wt)}
    if vocab is not None:
        want["d2t"] = ((Vd,), torch.int64)
    for i in range(layers):
        p, width = f"layers.{i}.", 2 * D if i == 0 else D
        want |= {p + "input_layernorm.weight": ((D,), wt), p + "post_attention_layernorm.weight": ((D,), wt),
                 p + "self_attn.q_proj.weight": ((48, width), wt), p + "self_attn.k_proj.weight": ((16, width), wt),
                 p + "self_attn.v_proj.weight": ((16, width), wt), p + "self_attn.o_proj.weight": ((D, 48), wt),
                 p + "mlp.gate_proj.weight": ((96, D), wt), p + "mlp.up_proj.weight": ((96, D), wt),
                 p + "mlp.down_proj.weight": ((D, 96), wt)}
        if i == 0:
            want[p + "hidden_norm.weight"] = ((D,), wt)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}
    assert got == want
    conf = json.loads((out / "config.json").read_text())
    assert set(conf) == {"architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "num_hidden_layers", "hidden_act", "rms_norm_eps",
                         "rope_theta", "rope_parameters", "max_position_embeddings", "vocab_size", "draft_vocab_size",
                         "tie_word_embeddings", "attention_bias", "mlp_bias", "norm_before_residual", "eagle_config",
                         "mask_token_id", "pard_token", "torch_dtype", "parallelspec"}
    assert conf["architectures"] == ["Eagle3LlamaForCausalLM"] and conf["model_type"] == "llama"
    assert conf["eagle_config"] == {"use_aux_hidden_state": False} and conf["norm_before_residual"] is False
    assert (conf["vocab_size"], conf["draft_vocab_size"], conf["mask_token_id"], conf["pard_token"]) == (V, Vd, 7, 7)
    assert (conf["hidden_size"], conf["num_attention_heads"], conf["num_key_value_heads"], conf["head_dim"],
            conf["intermediate_size"], conf["num_hidden_layers"]) == (D, 6, 2, 8, 96, layers)
    assert conf["torch_dtype"] == dtype and conf["parallelspec"]["depth"] == K


def test_d2t_offsets_map_draft_ids_to_target_ids(tmp_path):
    from safetensors.torch import load_file

    target = tiny_target()
    drafter = _eagle3_drafter(target)
    out = _export(tmp_path, drafter)
    d2t = load_file(str(out / "model.safetensors"))["d2t"]
    assert torch.equal(torch.arange(40) + d2t, drafter.net.draft_to_target)


# ---------------------------------------------------------------- vLLM's forward, independently

def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


class VllmParallelEagle3:
    """vLLM's Eagle3LlamaForCausalLM (no aux hidden states) with parallel drafting, from the
    exported files: a per-request KV cache indexed by position (vLLM's slot mapping)."""

    def __init__(self, path, embed_tokens: torch.Tensor):
        from safetensors.torch import load_file

        self.c = json.loads((path / "config.json").read_text())
        self.w = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / "model.safetensors")).items()}
        self.embed = embed_tokens.float()
        c = self.c
        self.H, self.Hkv, self.Dh = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.eps, self.L = c["rms_norm_eps"], c["num_hidden_layers"]
        self.mask_id = c["mask_token_id"]
        self.cache = {}           # (request, layer) -> {position: (k, v)}

    def rope(self, x, pos):
        half = self.Dh // 2
        inv = 1.0 / (self.c["rope_parameters"]["rope_theta"] ** (torch.arange(0, half).float() * 2 / self.Dh))
        ang = pos.float()[:, None] * inv[None]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def layer(self, i, embeds, hidden, residual, positions, requests, write):
        w, p = self.w, f"layers.{i}."
        if i == 0:
            x = torch.cat([_rms(embeds, w[p + "input_layernorm.weight"], self.eps),
                           _rms(hidden, w[p + "hidden_norm.weight"], self.eps)], dim=-1)
            residual = hidden
        else:
            residual = hidden + residual
            x = _rms(residual, w[p + "input_layernorm.weight"], self.eps)
        # qkv_proj stacks q, k, v (load_weights' stacked_params_mapping); applied as one matmul
        qkv = x @ torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).T
        q, k, v = qkv.split([self.H * self.Dh, self.Hkv * self.Dh, self.Hkv * self.Dh], dim=-1)
        q = self.rope(q.view(-1, self.H, self.Dh), positions)
        k = self.rope(k.view(-1, self.Hkv, self.Dh), positions)
        v = v.view(-1, self.Hkv, self.Dh)
        for r in range(len(positions)):          # reshape_and_cache: rejected rows have no slot
            if write[r]:
                self.cache.setdefault((requests[r], i), {})[int(positions[r])] = (k[r], v[r])
        out = torch.empty_like(q)
        for r in range(len(positions)):          # causal over the request's cache
            kv = self.cache[(requests[r], i)]
            keys = sorted(t for t in kv if t <= int(positions[r]))
            kk = torch.stack([kv[t][0] for t in keys]).repeat_interleave(self.H // self.Hkv, dim=1)
            vv = torch.stack([kv[t][1] for t in keys]).repeat_interleave(self.H // self.Hkv, dim=1)
            att = torch.softmax(torch.einsum("hd,thd->ht", q[r], kk) / math.sqrt(self.Dh), dim=-1)
            out[r] = torch.einsum("ht,thd->hd", att, vv)
        h = out.reshape(len(positions), -1) @ w[p + "self_attn.o_proj.weight"].T
        residual = h + residual                   # post_attention_layernorm(h, residual)
        x = _rms(residual, w[p + "post_attention_layernorm.weight"], self.eps)
        gate_up = x @ torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]).T
        gate, up = gate_up.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T, residual

    def compute_logits(self, h):
        logits = h @ self.w["lm_head.weight"].T
        Vd = self.c["draft_vocab_size"]
        if "d2t" not in self.w:
            return logits
        full = logits.new_full((logits.shape[0], self.c["vocab_size"]), float("-inf"))
        full[:, torch.arange(Vd) + self.w["d2t"]] = logits
        return full

    def propose(self, queries):
        """queries: per request (target_token_ids, target_positions, target_hidden_states,
        next_token_id, num_rejected) of the target's last pass. Returns logits [B, K, V]."""
        K = self.c["parallelspec"]["depth"]
        ids, pos, hid, is_mask, write, req, sample = [], [], [], [], [], [], []
        for b, (tok, tpos, th, nxt, rej) in enumerate(queries):
            n_valid = len(tok) - 1 - rej               # query_end - query_start (shifted)
            start = int(tpos[0])
            for j in range(len(tok) + K - 1):          # copy_and_expand_eagle_inputs, one request
                if j < n_valid:
                    t, m = int(tok[j + 1]), False
                elif j == n_valid:
                    t, m = int(nxt), False
                    sample.append(len(ids))
                elif j < n_valid + K:
                    t, m = self.mask_id, True
                    sample.append(len(ids))
                else:
                    t, m = 0, False                      # rejected: padding token, no KV slot
                ids.append(t)
                pos.append(start + j if j < n_valid + K else 0)
                hid.append(th[j] if j < len(tok) else torch.zeros_like(th[0]))
                is_mask.append(m)
                write.append(j < n_valid + K)
                req.append(b)
        hidden = torch.stack(hid).float()
        is_mask = torch.tensor(is_mask)
        hidden[is_mask] = self.w["mask_hidden"].view(1, -1).expand(int(is_mask.sum()), -1)
        embeds = self.embed[torch.tensor(ids)]
        positions = torch.tensor(pos)
        residual = None
        for i in range(self.L):
            hidden, residual = self.layer(i, embeds, hidden, residual, positions, req, write)
        h = _rms(hidden + residual, self.w["norm.weight"], self.eps)
        return self.compute_logits(h[torch.tensor(sample)]).view(len(queries), K, -1)


def _target_hidden(target, seqs):
    with torch.no_grad():
        return [target(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0] for s in seqs]


@pytest.mark.parametrize("vocab,layers", [(40, 1), (None, 2)])
def test_independent_vllm_forward_equals_our_step(tmp_path, vocab, layers):
    """Prefill then verify steps with 0..K accepted per request (rejected drafts and their hidden
    states are garbage: they must not matter), batch 3 with ragged prompts; at every step
    vLLM's K draft distributions equal our step()'s, and so do the greedy drafts."""
    torch.manual_seed(0)
    target = tiny_target()
    drafter = _eagle3_drafter(target, vocab, layers)
    out = _export(tmp_path, drafter)
    ref = VllmParallelEagle3(out, target.get_input_embeddings().weight.detach())
    g = torch.Generator().manual_seed(11)
    prompts = [5, 8, 3]
    seqs = [torch.randint(0, V, (n + 24,), generator=g).tolist() for n in prompts]
    hidden = _target_hidden(target, seqs)
    accepts = [[0, 2, 4], [4, 0, 1], [1, 3, 0], [2, 4, 4], [3, 1, 2]]
    B = len(prompts)
    drafter.reset(B, 64, torch.device("cpu"), torch.float32)
    committed = list(prompts)                          # tokens known to the target before its pass

    def compare(queries, ours):
        want = torch.log_softmax(ref.propose(queries), dim=-1)
        got = drafter.step(*ours)
        assert got.tokens.shape == (B, K, drafter.net.draft_vocab_size)
        torch.testing.assert_close(got.logprobs, want.gather(2, got.tokens), atol=2e-5, rtol=1e-5)
        assert torch.equal(got.tokens[:, :, 0], want.argmax(-1))

    # prefill: the target's pass over the prompt, the token it samples is x_n
    queries, tok, feat = [], torch.zeros(B, max(prompts), dtype=torch.long), torch.zeros(B, max(prompts), D)
    for b, n in enumerate(prompts):
        queries.append((seqs[b][:n], torch.arange(n), hidden[b][:n], seqs[b][n], 0))
        tok[b, :n], feat[b, :n] = torch.tensor(seqs[b][1:n + 1]), hidden[b][:n]
    compare(queries, (tok, feat, torch.tensor(prompts)))
    committed = [n + 1 for n in prompts]
    for step_accepts in accepts:
        queries, tok, feat = [], torch.zeros(B, K + 1, dtype=torch.long), torch.zeros(B, K + 1, D)
        for b, a in enumerate(step_accepts):
            C = committed[b]
            # the verify pass: bonus token at C - 1, K drafts (a accepted), hidden per query token
            query = seqs[b][C - 1:C + a] + torch.randint(0, V, (K - a,), generator=g).tolist()
            h = torch.cat([hidden[b][C - 1:C + a], 50 * torch.randn(K - a, D, generator=g)])
            queries.append((query, torch.arange(C - 1, C + K), h, seqs[b][C + a], K - a))
            tok[b, :a + 1], feat[b, :a + 1] = torch.tensor(seqs[b][C:C + a + 1]), hidden[b][C - 1:C + a]
            committed[b] = C + a + 1
        compare(queries, (tok, feat, torch.tensor(step_accepts) + 1))


# ---------------------------------------------------------------- round trip, refusals, CLI

@pytest.mark.parametrize("head", ["trained", "target"])
def test_round_trip_drafts_the_same(tmp_path, head):
    from parallelspec.tools.export import import_vllm

    target = tiny_target()
    drafter = _eagle3_drafter(target, head=head)
    out = _export(tmp_path, drafter, target if head == "target" else None)
    back = import_vllm(out, target, top_m=drafter.top_m)
    assert back.net.cfg.depth == K and back.net.cfg.mask_token_id == 7
    assert torch.equal(back.net.draft_to_target, drafter.net.draft_to_target)
    g = torch.Generator().manual_seed(2)
    tokens, features, lens = torch.randint(0, V, (2, 6), generator=g), torch.randn(2, 6, D, generator=g), torch.tensor([6, 2])
    outs = []
    for d in (drafter, back):
        d.reset(2, 32, torch.device("cpu"), torch.float32)
        outs.append([d.step(tokens, features, lens), d.step(tokens[:, :3], features[:, :3], torch.tensor([3, 1]))])
    for a, b in zip(*outs):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


def test_export_refuses_other_layouts_and_kinds(tmp_path):
    from parallelspec.drafters import EagleDrafter, ParallelDrafter, build_network
    from parallelspec.tools.export import export_vllm

    target = tiny_target()
    ParallelDrafter(build_network(target, parallel=True)).save_pretrained(tmp_path / "fused")
    with pytest.raises(ValueError, match="RUN: expected a parallel drafter in layout 'eagle3'.*got kind 'parallel', "
                                         "layout 'fused'"):
        export_vllm(tmp_path / "fused", tmp_path / "out")
    EagleDrafter(build_network(target, parallel=False)).save_pretrained(tmp_path / "eagle")
    with pytest.raises(ValueError, match="got kind 'eagle', layout 'fused'"):
        export_vllm(tmp_path / "eagle", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="RUN: expected a saved drafter"):
        export_vllm(tmp_path / "nothing", tmp_path / "out")
    ParallelDrafter(build_network(target, parallel=True, layout="eagle3")).save_pretrained(tmp_path / "e3")
    with pytest.raises(ValueError, match="target: the drafter's head is the target's"):
        export_vllm(tmp_path / "e3", tmp_path / "out")
    with pytest.raises(ValueError, match="embedding fingerprint"):
        export_vllm(tmp_path / "e3", tmp_path / "out", tiny_target(seed=5))
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path, capsys):
    from parallelspec.tools.cli import main

    target = tiny_target()
    _eagle3_drafter(target).save_pretrained(tmp_path / "run" / "drafter")
    assert main(["export", "--format", "vllm", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert '"num_speculative_tokens": 4, "parallel_drafting": true' in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists()
    from parallelspec.drafters import ParallelDrafter, build_network
    ParallelDrafter(build_network(target, parallel=True, head="trained")).save_pretrained(tmp_path / "fused")
    assert main(["export", "--format", "vllm", str(tmp_path / "fused"), str(tmp_path / "out2")]) == 2
    assert "layout 'eagle3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--format", "sglang", str(tmp_path / "run"), str(tmp_path / "out3")])


# ---------------------------------------------------------------- in our loop
# A drafter distilled on the tiny Llama (engine_helpers.distilled_eagle3_network: seconds, cached
# for the session), so that drafts are accepted and several tokens are committed in a step and
# rolled back per sequence through this layout. Mean accepted tokens per step, measured on these
# 4 prompts x 16 tokens: chain 1.62, dynamic 1.97, auto 1.97, hybrid 1.94; the random network of
# build_network: 1.24, 1.43, 1.43, 1.57, and never all three drafts of a step accepted.

ACCEPT_FLOOR = {"chain": 1.45, "dynamic": 1.7, "auto": 1.7, "hybrid": 1.75}


def _tiny_llama_case():
    from engine_helpers import hf_greedy, left_padded, tiny_model

    model = tiny_model("llama", 256)
    ids, mask = left_padded([5, 9, 1, 7], 256)
    return model, ids, mask, hf_greedy(model, ids, mask, 16)


def _tree_kwargs(tree):
    from parallelspec.trees import AutoTree

    if tree in ("auto", "hybrid"):
        return {"tree": AutoTree({1: 1.0, 64: 1.05}, max_nodes=10)}
    return {"tree": "chain"} if tree == "chain" else {"tree": "dynamic", "tree_nodes": 8}


def _assert_accepted(stats, steps, tree):
    """Drafts accepted: mean tokens per step above the tree's floor, some step committing all
    three drafts and its bonus token, and a step where the sequences commit different counts."""
    assert stats.mean_accepted > ACCEPT_FLOOR[tree], (stats.mean_accepted, stats.accept_histogram)
    assert len(stats.accept_histogram) > 4 and stats.accept_histogram[4] > 0, stats.accept_histogram
    assert any(len({n for n in s if n}) > 1 for s in steps[1:]), steps   # after prefill: accepted counts


@pytest.mark.parametrize("tree", ["chain", "dynamic", "auto", "hybrid"])
def test_eagle3_drafter_in_our_loop_is_lossless(tree, one_thread):
    """Batch 4, left-padded: transformers' greedy output with the distilled eagle3 drafter
    (alone, or with prompt lookup in a hybrid) accepted on every tree kind."""
    import parallelspec as ps
    from engine_helpers import distilled_eagle3_network, record_step_lens

    model, ids, mask, reference = _tiny_llama_case()
    drafter = ps.ParallelDrafter(distilled_eagle3_network(model), top_m=4)
    if tree == "hybrid":
        drafter = ps.HybridDrafter([ps.NgramDrafter(num_tokens=3), drafter])
    steps = record_step_lens(drafter)
    out, stats = ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=16, return_stats=True,
                             **_tree_kwargs(tree))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    _assert_accepted(stats, steps, tree)


@pytest.mark.parametrize("tree", ["chain", "auto"])
def test_vllm_round_trip_generates_the_same_with_accepted_drafts(tmp_path, tree, one_thread):
    """The distilled drafter exported for vLLM (fp32) and imported back: in the loop, the same
    accepted drafts step by step (equal step records and acceptance histogram) and
    transformers' greedy output."""
    import parallelspec as ps
    from engine_helpers import distilled_eagle3_network, record_step_lens
    from parallelspec.tools.export import import_vllm

    model, ids, mask, reference = _tiny_llama_case()
    drafter = ps.ParallelDrafter(distilled_eagle3_network(model), top_m=4)
    back = import_vllm(_export(tmp_path, drafter, model), model, top_m=4)
    runs = []
    for d in (drafter, back):
        steps = record_step_lens(d)
        out, stats = ps.generate(model, ids, d, attention_mask=mask, max_new_tokens=16, return_stats=True,
                                 **_tree_kwargs(tree))
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
        _assert_accepted(stats, steps, tree)
        runs.append((steps, stats.accept_histogram))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("tree", ["dynamic", "auto"])
def test_eagle3_drafter_eos_inside_an_accepted_run(tree, one_thread):
    """Batch 4: an EOS that the distilled drafter's first run committed as an accepted draft
    followed by another accepted draft and the bonus token of the same step (and not earlier in its
    sequence, so decoding up to it is the same with and without the EOS; on the chain, measured,
    every such draft repeats a token). With that EOS the sequence ends there, the tokens after it
    dropped, and every sequence is transformers' output with that EOS."""
    import parallelspec as ps
    from engine_helpers import distilled_eagle3_network, hf_greedy, record_step_lens

    model, ids, mask, free = _tiny_llama_case()
    drafter = ps.ParallelDrafter(distilled_eagle3_network(model), top_m=4)
    steps = record_step_lens(drafter)
    assert torch.equal(ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=16,
                                   **_tree_kwargs(tree)), free)
    T = ids.shape[1]
    found = None
    for b in range(ids.shape[0]):
        new = free[b, T:].tolist()
        start = 1                                      # new token 0 comes from the prefill
        for lens in steps[1:]:
            n = lens[b]
            for p in range(start, start + n - 2):      # a draft with another draft after it
                if found is None and new[p] not in new[:p]:
                    found = (b, p, new[p])
            start += n
    assert found is not None, f"no accepted draft with a fresh token: {steps}"
    b, at, eos = found
    want = hf_greedy(model, ids, mask, 16, eos_token_id=eos, pad_token_id=0)
    out = ps.generate(model, ids, ps.ParallelDrafter(distilled_eagle3_network(model), top_m=4), attention_mask=mask,
                      max_new_tokens=16, eos_token_id=eos, pad_token_id=0, **_tree_kwargs(tree))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    row = out[b, T:].tolist()
    assert row[at] == eos and (len(row) == at + 1 or set(row[at + 1:]) == {0}), (at, row)
