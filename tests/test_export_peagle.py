"""The peagle layout (a parallel drafter over EAGLE-3's aux features) exported for vLLM and as
SpecForge's P-EAGLE head, then read back by this package's published-drafter loader
(``parallelspec.load_drafter``, checked against the publishers' own forwards in
tests/test_published_drafters.py) and by ``import_vllm``: every reader drafts what the trained
network drafts, in our loop too."""
import json

import pytest
import torch
from drafter_helpers import peaked_random_weights, tiny_target

import parallelspec as ps
from parallelspec.drafters import ParallelDrafter, build_network
from parallelspec.tools.export import export_drafter, import_vllm

V, D = 96, 48
K = 3
AUX = [1, 0, 1]     # the tiny target has 2 layers; repeats and order are kept as given


def _peagle_drafter(target, vocab=40, head="trained", seed=1):
    """A peagle-layout drafter with random weights large enough for peaked drafts."""
    d2t = None if vocab is None else torch.randperm(V, generator=torch.Generator().manual_seed(3))[:vocab]
    net = build_network(target, parallel=True, depth=K, draft_to_target=d2t, head=head, layout="peagle",
                        aux_layers=AUX, mask_token_id=7, seed=seed)
    peaked_random_weights(net, seed)
    return ParallelDrafter(net, top_m=net.draft_vocab_size)


def _steps(drafter, seed=2):
    """Two steps at batch 2 over [last; aux] features: (candidates of each step), draft order
    normalised by sorting each depth's candidates by target id."""
    g = torch.Generator().manual_seed(seed)
    W = D * (1 + len(AUX))
    tokens, features = torch.randint(0, V, (2, 6), generator=g), torch.randn(2, 6, W, generator=g)
    drafter.reset(2, 32, torch.device("cpu"), torch.float32)
    out = []
    for c in (drafter.step(tokens, features, torch.tensor([6, 2])),
              drafter.step(tokens[:, :3], features[:, :3], torch.tensor([3, 1]))):
        order = c.tokens.argsort(dim=-1)
        out.append((c.tokens.gather(-1, order), c.logprobs.gather(-1, order)))
    return out


def _same_drafts(a, b):
    for (ta, la), (tb, lb) in zip(_steps(a), _steps(b)):
        assert torch.equal(ta, tb)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab,head", [(40, "trained"), (None, "trained"), (40, "target")])
def test_vllm_and_specforge_files_draft_what_the_network_drafts(tmp_path, vocab, head):
    target = tiny_target()
    drafter = _peagle_drafter(target, vocab, head)
    drafter.save_pretrained(tmp_path / "run" / "drafter", dtype=torch.float32)
    vllm = export_drafter(tmp_path / "run", tmp_path / "vllm", target, "float32", "vllm")
    sf = export_drafter(tmp_path / "run", tmp_path / "specforge", target, "float32", "specforge")
    from safetensors.torch import load_file

    conf, state = json.loads((vllm / "config.json").read_text()), load_file(str(vllm / "model.safetensors"))
    assert conf["architectures"] == ["Eagle3LlamaForCausalLM"] and conf["target_hidden_size"] == D
    assert conf["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": AUX}
    assert state["fc.weight"].shape == (D, 3 * D) and state["mask_hidden"].shape == (3 * D,)
    assert ("d2t" in state) == (vocab is not None)
    conf, state = json.loads((sf / "config.json").read_text()), load_file(str(sf / "model.safetensors"))
    assert conf["architectures"] == ["PEagleDraftModel"] and conf["mask_token_id"] == 7
    assert state["mask_hidden"].shape == (1, 1, 3 * D) and state["t2d"].dtype == torch.bool
    d2t = drafter.net.draft_to_target
    assert torch.equal(torch.arange(d2t.numel()) + state["d2t"], d2t.sort().values)   # target = draft + d2t[draft]
    assert torch.equal(state["t2d"].nonzero()[:, 0], d2t.sort().values)
    head_rows = drafter.net.head.weight if head == "trained" else target.get_output_embeddings().weight[d2t]
    torch.testing.assert_close(state["lm_head.weight"], head_rows.detach()[d2t.argsort()])   # target-id order
    top = drafter.net.draft_vocab_size
    for path in (vllm, sf):
        back = ps.load_drafter(str(path), target, top_m=top)
        assert type(back).__name__ == "PEagleDrafter" and back.depth == K and back.aux_layers == tuple(AUX)
        _same_drafts(drafter, back)
    _same_drafts(drafter, import_vllm(vllm, target, top_m=top))


def test_specforge_format_holds_the_peagle_layout_only(tmp_path, capsys):
    from parallelspec.tools.cli import main

    target = tiny_target()
    ParallelDrafter(build_network(target, parallel=True, layout="eagle3", head="trained")).save_pretrained(tmp_path / "e3")
    with pytest.raises(ValueError, match=r"RUN: expected a parallel drafter in layout 'peagle' .* for --format specforge, "
                                         r"got kind 'parallel', layout 'eagle3'"):
        export_drafter(tmp_path / "e3", tmp_path / "out", None, "float32", "specforge")
    assert main(["export", "--format", "specforge", str(tmp_path / "e3"), str(tmp_path / "out")]) == 2
    assert "layout 'peagle'" in capsys.readouterr().err
    _peagle_drafter(target).save_pretrained(tmp_path / "pe")
    assert main(["export", "--format", "specforge", str(tmp_path / "pe"), str(tmp_path / "out")]) == 0
    assert "PEagleDraftModel" in capsys.readouterr().out


@pytest.mark.parametrize("tree", ["chain", "auto", "hybrid"])
def test_peagle_drafter_in_our_loop_is_lossless(tree, tmp_path):
    """The trained layout and its SpecForge file in the decoding loop (which gathers the aux
    hidden states in the verify pass): greedy output equal to transformers' at batch 2, left-padded."""
    from engine_helpers import hf_greedy, left_padded

    target = tiny_target()
    ids, mask = left_padded([5, 9], V)
    reference = hf_greedy(target, ids, mask, 12)
    drafter = _peagle_drafter(target)
    drafter.save_pretrained(tmp_path / "run" / "drafter", dtype=torch.float32)
    sf = export_drafter(tmp_path / "run", tmp_path / "sf", None, "float32", "specforge")
    for d in (drafter, ps.load_drafter(str(sf), target)):
        kw = {"tree": "chain"} if tree == "chain" else {"tree": ps.AutoTree({1: 1.0, 64: 1.05}, max_nodes=8)}
        if tree == "hybrid":
            d = ps.HybridDrafter([ps.NgramDrafter(num_tokens=3), d])
        out = ps.generate(target, ids, d, attention_mask=mask, max_new_tokens=12, **kw)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
