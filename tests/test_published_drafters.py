"""Drafters other people publish, checked against their own code rather than ours.

Tiny random checkpoints are written the way each publisher's code writes them (file names, config
keys, tensor names, dtypes, the d2t convention):

* EAGLE authors (SafeAILab/EAGLE ``traineagle3``: ``save_16bit_model(exclude_frozen_parameters=
  True)``): ``pytorch_model.bin`` in fp16, ``midlayer.*``, no ``embed_tokens`` (frozen), config with
  ``LlamaForCausalLMEagle3`` and ``draft_vocab_size``, no ``rope_theta``;
* SpecForge (``LlamaForCausalLMEagle3.save_pretrained`` with the trainer's filter dropping
  ``embed``): ``model.safetensors`` in bf16; a second variant pins the aux layers with
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` (vLLM / speculators numbering);
* AngelSlim (``Eagle3LlamaForCausalLM``, HF Trainer save): ``model.safetensors`` with its own
  ``embed_tokens.weight`` and ``aux_hidden_states_layer_ids`` (layer-output numbering);
* P-EAGLE (SpecForge ``PEagleDraftModel``): two layers ``layers.0.*`` (EAGLE-3 layer) and
  ``layers.1.*`` (plain), ``mask_hidden`` [1, 1, 3 d] in the fc input space, ``mask_token_id``;
* PARD (AMD): a transformers ``LlamaForCausalLM`` saved with ``save_pretrained``, ``pard_token`` in
  its config.

The reference forwards below are plain torch written from the publishers' code (EAGLE's
``cnets.Model.forward`` / ``topK_genrate``, SpecForge's ``OnlinePEagleModel.forward``, PARD's
``pard_infer.py`` feeding ``k - 1`` pard tokens to the HF model), with the target's hidden states
taken from transformers' ``output_hidden_states`` (EAGLE's ``modeling_llama_kv.py`` keeps the states
entering layers 2, L // 2, L - 3). They import nothing from parallelspec. Our drafters run inside
``parallelspec.generate`` at batch 2 (prefill and the verify steps after it); at every step, the
k distributions they computed must equal the reference's over the same committed sequence.
Injected mistakes (a wrong aux layer, the wrong d2t convention, the embedding taken from the
target's LM head) must make that comparison fail.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import parallelspec as ps
from engine_helpers import left_padded, tiny_model

V, D_MODEL, HEADS, KV_HEADS, HEAD_DIM, INTER = 256, 64, 4, 2, 16, 96
LAYERS = 8                      # default aux layers (2, 4, 5)
DRAFT_VOCAB = 160
MASK_TOKEN = 251
PARD_TOKEN = 250
DEPTH = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", V, layers=LAYERS)


# --------------------------------------------------------------------------- publisher files

def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g) * 0.2


def _layer(w, prefix, first):
    width = 2 * D_MODEL if first else D_MODEL
    sd = {f"{prefix}.self_attn.q_proj.weight": w(HEADS * HEAD_DIM, width),
          f"{prefix}.self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, width),
          f"{prefix}.self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, width),
          f"{prefix}.self_attn.o_proj.weight": w(D_MODEL, HEADS * HEAD_DIM),
          f"{prefix}.mlp.gate_proj.weight": w(INTER, D_MODEL), f"{prefix}.mlp.up_proj.weight": w(INTER, D_MODEL),
          f"{prefix}.mlp.down_proj.weight": w(D_MODEL, INTER),
          f"{prefix}.input_layernorm.weight": 1 + w(D_MODEL),
          f"{prefix}.post_attention_layernorm.weight": 1 + w(D_MODEL)}
    if first:
        sd[f"{prefix}.hidden_norm.weight"] = 1 + w(D_MODEL)
    return sd


def _vocab_buffers(seed):
    """SpecForge / EAGLE generate_vocab_mapping: d2t[i] = used[i] - i, t2d = membership of used."""
    used = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    return {"d2t": used - torch.arange(DRAFT_VOCAB), "t2d": t2d}


def _head_config(arch, **extra):
    return {"architectures": [arch], "model_type": "llama", "hidden_act": "silu", "hidden_size": D_MODEL,
            "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "vocab_size": V, "draft_vocab_size": DRAFT_VOCAB,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, **extra}


def _save_safetensors(path, state, dtype):
    from safetensors.torch import save_file
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(path / "model.safetensors"))


def write_eagle_authors(path, seed=11):
    w = _weights(seed)
    state = {**_layer(w, "midlayer", True), "fc.weight": w(D_MODEL, 3 * D_MODEL), "norm.weight": 1 + w(D_MODEL),
             "lm_head.weight": w(DRAFT_VOCAB, D_MODEL), **_vocab_buffers(seed)}
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path / "pytorch_model.bin")
    config = _head_config("LlamaForCausalLMEagle3", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          torch_dtype="float16", transformers_version="4.28.1", use_cache=True,
                          initializer_range=0.02)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_specforge(path, seed=12, aux_ids=None):
    w = _weights(seed)
    state = {**_layer(w, "midlayer", True), "fc.weight": w(D_MODEL, 3 * D_MODEL), "norm.weight": 1 + w(D_MODEL),
             "lm_head.weight": w(DRAFT_VOCAB, D_MODEL), **_vocab_buffers(seed)}
    path.mkdir(parents=True, exist_ok=True)
    _save_safetensors(path, state, torch.bfloat16)
    pinned = {"eagle_aux_hidden_state_layer_ids": aux_ids, "use_aux_hidden_state": True}
    extra = {"eagle_config": pinned} if aux_ids else {}
    config = _head_config("LlamaForCausalLMEagle3", rope_theta=10000.0, torch_dtype="bfloat16", pad_token_id=None,
                          **extra)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_angelslim(path, target, seed=13):
    w = _weights(seed)
    state = {**_layer(w, "midlayer", True), "fc.weight": w(D_MODEL, 3 * D_MODEL), "norm.weight": 1 + w(D_MODEL),
             "lm_head.weight": w(DRAFT_VOCAB, D_MODEL), **_vocab_buffers(seed),
             "embed_tokens.weight": target.get_input_embeddings().weight.detach().clone()}  # loaded from the target
    path.mkdir(parents=True, exist_ok=True)
    _save_safetensors(path, state, torch.bfloat16)
    config = _head_config("Eagle3LlamaForCausalLM", rope_theta=10000.0, torch_dtype="bfloat16", head_dim=HEAD_DIM,
                          aux_hidden_states_layer_ids=[1, 3, 4])   # outputs of layers 1, 3, 4 = inputs of 2, 4, 5
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_peagle(path, seed=14):
    w = _weights(seed)
    state = {**_layer(w, "layers.0", True), **_layer(w, "layers.1", False), "fc.weight": w(D_MODEL, 3 * D_MODEL),
             "norm.weight": 1 + w(D_MODEL), "lm_head.weight": w(DRAFT_VOCAB, D_MODEL), **_vocab_buffers(seed),
             "mask_hidden": w(1, 1, 3 * D_MODEL) * 5}
    path.mkdir(parents=True, exist_ok=True)
    _save_safetensors(path, state, torch.bfloat16)
    config = _head_config("PEagleDraftModel", num_hidden_layers=2, rope_theta=10000.0, mask_token_id=MASK_TOKEN,
                          torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_pard(path, seed=15):
    import transformers as tf
    config = tf.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            initializer_range=0.2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)
    config.pard_token = PARD_TOKEN
    torch.manual_seed(seed)
    lm = tf.LlamaForCausalLM(config).eval()
    lm.save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------- references (publishers' code)

def _rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta=10000.0):
    """EAGLE's LlamaRotaryEmbedding + apply_rotary_pos_emb. x [H, T, D], pos [T]."""
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    f = pos.float()[:, None] * inv
    emb = torch.cat([f, f], -1)
    rot = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
    return x * emb.cos() + rot * emb.sin()


class RefLayer:
    """cnets.LlamaDecoderLayeremb (first) / SpecForge PEagleStandardLayer, with EAGLE's
    concatenated past K/V (``past_key_value`` tuple) and a boolean attention mask."""

    def __init__(self, sd, prefix, first):
        self.sd = {k[len(prefix) + 1:]: v.float() for k, v in sd.items() if k.startswith(prefix + ".")}
        self.first = first
        self.k = self.v = None

    def __call__(self, emb, hidden, pos, allowed):
        s = self.sd
        if self.first:
            residual = hidden
            x = torch.cat([_rms(emb, s["input_layernorm.weight"]), _rms(hidden, s["hidden_norm.weight"])], -1)
        else:
            residual = hidden
            x = _rms(hidden, s["input_layernorm.weight"])
        T = x.shape[0]
        q = (x @ s["self_attn.q_proj.weight"].T).view(T, HEADS, HEAD_DIM).transpose(0, 1)
        k = (x @ s["self_attn.k_proj.weight"].T).view(T, KV_HEADS, HEAD_DIM).transpose(0, 1)
        v = (x @ s["self_attn.v_proj.weight"].T).view(T, KV_HEADS, HEAD_DIM).transpose(0, 1)
        q, k = _rope(q, pos), _rope(k, pos)
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        self.k, self.v = k, v
        rep = HEADS // KV_HEADS
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, HEADS * HEAD_DIM) @ s["self_attn.o_proj.weight"].T
        h = residual + out
        m = _rms(h, s["post_attention_layernorm.weight"])
        act = F.silu(m @ s["mlp.gate_proj.weight"].T) * (m @ s["mlp.up_proj.weight"].T)
        return h + act @ s["mlp.down_proj.weight"].T


def _causal(T, past=0):
    return torch.ones(T, past + T, dtype=torch.bool).tril(past)


def target_features(target, seq, layers):
    """The target's hidden states entering `layers` (output_hidden_states[i]), concatenated [n, 3d]."""
    with torch.no_grad():
        hs = target(torch.tensor([seq]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i][0] for i in layers], -1).float()


def _to_target_vocab(logp_draft, d2t):
    """vLLM's compute_logits: draft logit i lands at target id i + d2t[i], -inf elsewhere."""
    full = torch.full((*logp_draft.shape[:-1], V), float("-inf"))
    full[..., torch.arange(d2t.numel()) + d2t] = logp_draft
    return full


def ref_eagle3(sd, embed, target, seq, layers, k):
    """cnets.Model: forward over (seq[1:], hidden[:-1]) with fc, then topK_genrate's chain: each
    depth feeds the top-1 token (target id = draft id + d2t) and the layer's own output."""
    sd = {kk: (v.float() if v.is_floating_point() else v) for kk, v in sd.items()}
    aux = target_features(target, seq, layers)
    layer = RefLayer(sd, "midlayer", True)
    n = len(seq)
    hidden = aux[:-1] @ sd["fc.weight"].T
    emb = embed[torch.tensor(seq[1:])]
    pos = torch.arange(n - 1)
    out = layer(emb, hidden, pos, _causal(n - 1))[-1:]
    dists = []
    for j in range(k):
        logp = torch.log_softmax(_rms(out, sd["norm.weight"]) @ sd["lm_head.weight"].T, -1)
        dists.append(_to_target_vocab(logp[0], sd["d2t"]))
        tok = int(logp[0].argmax())
        tok = tok + int(sd["d2t"][tok])
        out = layer(embed[tok][None], out, torch.tensor([n - 1 + j]), torch.ones(1, n + j, dtype=torch.bool))
    return torch.stack(dists)


def ref_peagle(sd, embed, target, seq, layers, k):
    """SpecForge OnlinePEagleModel: depth-0 rows (seq[1:], hidden[:-1]) at their positions, the
    rollout of the last anchor: k - 1 rows (mask token, mask_hidden) at anchor + d, each seeing the
    depth-0 rows up to the anchor and its own rollout's lower depths; fc over [hidden; mask_hidden]."""
    sd = {kk: (v.float() if v.is_floating_point() else v) for kk, v in sd.items()}
    aux = target_features(target, seq, layers)
    n = len(seq)
    anchor = n - 2
    hidden = torch.cat([aux[:-1], sd["mask_hidden"].reshape(1, -1).expand(k - 1, -1)]) @ sd["fc.weight"].T
    ids = torch.tensor(seq[1:] + [MASK_TOKEN] * (k - 1))
    pos = torch.cat([torch.arange(n - 1), anchor + torch.arange(1, k)])
    T = n - 1 + k - 1
    h = RefLayer(sd, "layers.0", True)(embed[ids], hidden, pos, _causal(T))
    h = RefLayer(sd, "layers.1", False)(None, h, pos, _causal(T))
    logp = torch.log_softmax(_rms(h[anchor:], sd["norm.weight"]) @ sd["lm_head.weight"].T, -1)
    return _to_target_vocab(logp, sd["d2t"])


def ref_pard(lm, seq, k):
    """pard_infer.py (--para): the draft model over the sequence + k - 1 pard tokens; the last k logits."""
    with torch.no_grad():
        logits = lm(torch.tensor([seq + [PARD_TOKEN] * (k - 1)])).logits[0, -k:].float()
    return torch.log_softmax(logits, -1)


# --------------------------------------------------------------------------- running ours

def _record(monkeypatch, module):
    """Capture the draft logits our drafter turns into candidates (as target-vocabulary log-probs)."""
    seen = []
    original = module.top_candidates

    def spy(logits, draft_to_target, m):
        logp = torch.log_softmax(logits.float(), -1)
        full = torch.full((*logp.shape[:-1], V), float("-inf"))
        full[..., draft_to_target.cpu()] = logp.cpu()
        seen.append(full)
        return original(logits, draft_to_target, m)
    monkeypatch.setattr(module, "top_candidates", spy)
    return seen


def run_ours(monkeypatch, target, drafter, module, max_new_tokens=10):
    """Generate at batch 2 with ragged prompts; per step: each live sequence's committed tokens and
    our k distributions [B, k, V]."""
    seen = _record(monkeypatch, module)
    steps = []
    original_step = type(drafter).step

    def step(self, tokens, features, lens):
        at = len(seen)
        out = original_step(self, tokens, features, lens)
        steps.append((tokens.clone(), lens.clone(), torch.cat(seen[at:], dim=1)))
        return out
    monkeypatch.setattr(type(drafter), "step", step)
    ids, mask = left_padded([6, 11], V, seed=4)
    out = ps.generate(target, ids, drafter, attention_mask=mask, max_new_tokens=max_new_tokens, tree="chain")
    monkeypatch.undo()
    committed = [[int(t) for t in ids[b][mask[b].bool()][:1]] for b in range(2)]
    records = []
    for tokens, lens, dists in steps:
        for b in range(2):
            n = int(lens[b])
            committed[b] += tokens[b, :n].tolist()
            if n:
                records.append((b, list(committed[b]), dists[b]))
    return records, out, ids, mask


def compare(records, reference, atol=2e-4):
    """Largest difference of probabilities (and matching -inf patterns) over every record."""
    worst = 0.0
    for b, seq, ours in records:
        ref = reference(seq)
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        if not torch.equal(torch.isinf(ours), torch.isinf(ref)):
            return float("inf")
        worst = max(worst, float((ours.exp() - ref.exp()).abs().max()))
    return worst


def _load_state(path):
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(str(path / "model.safetensors"))
    return torch.load(path / "pytorch_model.bin", weights_only=True)


EAGLE3_WRITERS = {"eagle_authors": lambda p, t: write_eagle_authors(p), "specforge": lambda p, t: write_specforge(p),
                  "specforge_pinned_layers": lambda p, t: write_specforge(p, aux_ids=[1, 3, 6]),
                  "angelslim": write_angelslim}
EAGLE3_LAYERS = {"eagle_authors": (2, 4, 5), "specforge": (2, 4, 5), "specforge_pinned_layers": (1, 3, 6),
                 "angelslim": (2, 4, 5)}


def _eagle3_reference(path, target, layers):
    state = _load_state(path)
    embed = state["embed_tokens.weight"].float() if "embed_tokens.weight" in state else \
        target.get_input_embeddings().weight.detach().float()
    return lambda seq: ref_eagle3(state, embed, target, seq, layers, DEPTH)


@pytest.mark.parametrize("publisher", list(EAGLE3_WRITERS))
def test_eagle3_distributions_equal_the_publishers_forward(publisher, target, tmp_path, monkeypatch):
    from parallelspec.drafters.published import eagle3
    path = EAGLE3_WRITERS[publisher](tmp_path / publisher, target)
    drafter = ps.load_drafter(str(path), target, depth=DEPTH)
    assert drafter.format == "eagle3" and drafter.aux_layers == EAGLE3_LAYERS[publisher]
    records, *_ = run_ours(monkeypatch, target, drafter, eagle3)
    assert len(records) >= 8 and {b for b, *_ in records} == {0, 1}
    assert compare(records, _eagle3_reference(path, target, EAGLE3_LAYERS[publisher])) < 2e-4


def test_peagle_distributions_equal_the_publishers_forward(target, tmp_path, monkeypatch):
    from parallelspec.drafters.published import eagle3
    path = write_peagle(tmp_path / "peagle")
    drafter = ps.load_drafter(str(path), target, depth=DEPTH)
    assert drafter.format == "peagle" and type(drafter).__name__ == "PEagleDrafter"
    records, *_ = run_ours(monkeypatch, target, drafter, eagle3)
    state = _load_state(path)
    embed = target.get_input_embeddings().weight.detach().float()
    assert len(records) >= 8
    assert compare(records, lambda seq: ref_peagle(state, embed, target, seq, (2, 4, 5), DEPTH)) < 2e-4


def test_pard_distributions_equal_the_publishers_forward(target, tmp_path, monkeypatch):
    import transformers as tf
    from parallelspec.drafters.published import pard
    path = write_pard(tmp_path / "pard")
    drafter = ps.load_drafter(str(path), target, depth=DEPTH)
    assert drafter.format == "pard"
    records, *_ = run_ours(monkeypatch, target, drafter, pard)
    lm = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert len(records) >= 8
    assert compare(records, lambda seq: ref_pard(lm, seq, DEPTH)) < 2e-4


# --------------------------------------------------------------------------- the check catches mistakes

def _wrong_aux(monkeypatch, eagle3):
    original = eagle3.aux_layer_ids
    monkeypatch.setattr(eagle3, "aux_layer_ids", lambda *a, **k: tuple(i + 1 for i in original(*a, **k)))


def _wrong_d2t(monkeypatch, eagle3):
    monkeypatch.setattr(eagle3, "vocab_map", lambda state, dv, v, arg="drafter": state["d2t"].long().clamp(0, v - 1))


def _embedding_from_lm_head(monkeypatch, eagle3):
    monkeypatch.setattr(eagle3, "embedding", lambda state, model: model.get_output_embeddings().weight.detach())


@pytest.mark.parametrize("mistake", [_wrong_aux, _wrong_d2t, _embedding_from_lm_head])
def test_the_comparison_catches_injected_mistakes(mistake, target, tmp_path, monkeypatch):
    from parallelspec.drafters.published import eagle3
    path = write_specforge(tmp_path / "specforge")
    with monkeypatch.context() as patch:
        mistake(patch, eagle3)
        drafter = ps.load_drafter(str(path), target, depth=DEPTH)
    records, *_ = run_ours(monkeypatch, target, drafter, eagle3, max_new_tokens=4)
    assert compare(records, _eagle3_reference(path, target, (2, 4, 5))) > 1e-2


def test_the_peagle_and_pard_comparisons_catch_injected_mistakes(target, tmp_path, monkeypatch):
    """P-EAGLE's mask slots fed another token than the config's mask token, and a PARD drafter
    that never saw the prompt's first token: both comparisons fail."""
    import transformers as tf
    from parallelspec.drafters.published import eagle3, pard
    path = write_peagle(tmp_path / "peagle")
    with monkeypatch.context() as patch:
        patch.setattr(eagle3, "mask_token_id", lambda config, arg="drafter": 0)
        drafter = ps.load_drafter(str(path), target, depth=DEPTH)
    records, *_ = run_ours(monkeypatch, target, drafter, eagle3, max_new_tokens=4)
    state = _load_state(path)
    embed = target.get_input_embeddings().weight.detach().float()
    assert compare(records, lambda seq: ref_peagle(state, embed, target, seq, (2, 4, 5), DEPTH)) > 1e-2

    path = write_pard(tmp_path / "pard")
    drafter = ps.load_drafter(str(path), target, depth=DEPTH)
    monkeypatch.setattr(pard.PardDrafter, "begin", lambda self, first: None)
    records, *_ = run_ours(monkeypatch, target, drafter, pard, max_new_tokens=4)
    lm = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert compare(records, lambda seq: ref_pard(lm, seq, DEPTH)) > 1e-2


# --------------------------------------------------------------------------- lossless, trees, hybrid

def _all_formats(target, root):
    return {"eagle3": write_specforge(root / "eagle3"), "peagle": write_peagle(root / "peagle"),
            "pard": write_pard(root / "pard")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_the_target_gathers_the_aux_hidden_states_in_its_own_pass(arch):
    """TargetModel.aux_hidden_states: the verify pass returns [last hidden; inputs of the layers],
    equal to transformers' output_hidden_states[i], for every family; without layers, unchanged."""
    from parallelspec.hf.target import TargetModel
    model = tiny_model(arch, V, layers=LAYERS)
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    target = TargetModel(model)
    layers = (5, 2, 4)
    for aux in ((), layers):
        cache = target.new_cache(2, 16)
        with torch.inference_mode(), target.attention(), target.aux_hidden_states(aux):
            out = target.forward(ids, torch.arange(7).expand(2, -1), cache, None)
            logits = target.logits(out)
        assert out.shape[-1] == D_MODEL * (1 + len(aux))
        for n, i in enumerate(aux):
            assert torch.allclose(out[..., D_MODEL * (n + 1):D_MODEL * (n + 2)], hs[i], atol=1e-5), (arch, i)
        assert torch.allclose(logits, model(ids).logits.float(), atol=1e-4)
    assert not any(layer._forward_pre_hooks for layer in model.model.layers)   # removed after the run
    with pytest.raises(ValueError, match=r"aux layers: expected decoder layer indices in \[0, 8\)"):
        with target.aux_hidden_states((2, 8)):
            pass


@pytest.mark.parametrize("tree", ["auto", "dynamic"])
def test_greedy_output_equals_transformers(target, tmp_path, tree):
    ids, mask = left_padded([5, 9], V, seed=7)
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    from parallelspec.trees import AutoTree
    for kind, path in _all_formats(target, tmp_path).items():
        for spec in (str(path), f"hybrid:{path}"):
            drafter = ps.load_drafter(spec, target)
            builder = AutoTree({1: 1.0, 64: 1.05}, max_nodes=12) if tree == "auto" else tree
            out = ps.generate(target, ids, drafter, attention_mask=mask, max_new_tokens=14, tree=builder)
            assert torch.equal(out, ref), f"{kind} ({spec}, tree {tree})"


def test_accepted_drafts_with_a_drafter_that_agrees(target, tmp_path):
    """A PARD drafter that is the target itself (plus a pard token) makes depth-1 drafts the
    target's own next tokens: they are accepted, and the output is still transformers'."""
    import transformers as tf
    target.save_pretrained(str(tmp_path / "self"))
    config = json.loads((tmp_path / "self" / "config.json").read_text())
    (tmp_path / "self" / "config.json").write_text(json.dumps({**config, "pard_token": PARD_TOKEN}))
    drafter = ps.load_drafter(str(tmp_path / "self"), target, depth=DEPTH)
    ids, mask = left_padded([5, 9], V, seed=7)
    out, stats = ps.generate(target, ids, drafter, attention_mask=mask, max_new_tokens=16, tree="chain",
                             return_stats=True)
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert stats.mean_accepted > 1.5
    assert isinstance(tf, object)


def test_one_host_sync_a_step(target, tmp_path):
    from parallelspec import engine
    from sync_counter import count_step_syncs
    ids, mask = left_padded([6, 9], V)
    for kind, path in _all_formats(target, tmp_path).items():
        drafter = ps.load_drafter(f"hybrid:{path}", target)

        def run():
            ps.generate(target, ids, drafter, attention_mask=mask, max_new_tokens=12, tree="dynamic", tree_nodes=8)
        counter = count_step_syncs(run, (engine._Output, "record"), (engine._Output, "padded"))
        steps = counter.intervals[1:-1]
        assert len(steps) >= 3
        worst = max(steps, key=len)
        assert len(worst) <= 1, f"{kind}: {len(worst)} host syncs in a step: {worst}"


# --------------------------------------------------------------------------- errors that say what to do

def test_unknown_format_names_what_was_looked_for(target, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "medusa"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"], "medusa_num_heads": 4}))
    save_file({"medusa_head.0.weight": torch.zeros(4, 4)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"looked for EAGLE-3 .*P-EAGLE .*PARD .*found architectures \['MedusaModel'\]"
                                         r".*medusa_head.0.weight"):
        ps.load_drafter(str(path), target)
    with pytest.raises(ValueError, match="format: expected None"):
        ps.load_drafter(str(path), target, format="medusa")


def test_a_drafter_for_another_target_names_both_sides(tmp_path):
    path = write_specforge(tmp_path / "sf")
    wider = tiny_model("llama", V, layers=LAYERS)
    import transformers as tf
    narrow = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=8,
                                                num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match=r"hidden size: the drafter reads 64-wide target features, the model's "
                                         r"hidden_size is 32"):
        ps.load_drafter(str(path), narrow)
    other_vocab = tiny_model("llama", 300, layers=LAYERS)
    with pytest.raises(ValueError, match=r"vocabulary: the drafter's vocab_size is 256, the model's is 300"):
        ps.load_drafter(str(path), other_vocab)
    pard_path = write_pard(tmp_path / "pard")
    with pytest.raises(ValueError, match=r"the PARD model's vocab_size is 256, the target's is 1024"):
        ps.load_drafter(str(pard_path), tiny_model("llama", 1024, layers=2))
    assert ps.load_drafter(str(path), wider) is not None


def test_missing_and_extra_tensors_are_named(target, tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_specforge(tmp_path / "sf")
    state = load_file(str(path / "model.safetensors"))
    del state["midlayer.mlp.up_proj.weight"]
    state["medusa_head.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['midlayer.mlp.up_proj.weight.*extra tensors "
                                         r"\['medusa_head.weight'\]"):
        ps.load_drafter(str(path), target)
    peagle = write_peagle(tmp_path / "pe")
    state = load_file(str(peagle / "model.safetensors"))
    del state["mask_hidden"]
    save_file(state, str(peagle / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['mask_hidden'\]"):
        ps.load_drafter(str(peagle), target, format="peagle")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_truncated_weights_file_is_named(target, tmp_path, name):
    path = write_specforge(tmp_path / "sf") if name == "model.safetensors" else write_eagle_authors(tmp_path / "ea")
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=rf"drafter: .*{name} \(\d+ bytes\) is not a readable .*truncated or "
                                         r"damaged.*download it again"):
        ps.load_drafter(str(path), target)


def test_a_pickle_that_is_not_weights_is_refused(target, tmp_path):
    import pickle
    path = write_eagle_authors(tmp_path / "ea")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(ValueError, match=r"pytorch_model.bin .* is not a readable PyTorch weights file: it holds "
                                         r"objects other than tensors.*weights_only=True"):
        ps.load_drafter(str(path), target)


def test_a_repo_id_offline_says_to_download_it(target, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert huggingface_hub is not None
    with pytest.raises(FileNotFoundError, match=r"'someone/EAGLE3-tiny' is not a local directory, is not in the "
                                                r"Hugging Face cache.*download it where the Hub is reachable.*"
                                                r"pass the directory"):
        ps.load_drafter("someone/EAGLE3-tiny", target)


def test_a_repo_id_resolves_from_the_local_cache(target, tmp_path, monkeypatch):
    """A repo id already in huggingface_hub's cache loads offline (snapshot layout written by hand)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--EAGLE3-tiny"
    write_specforge(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    drafter = ps.load_drafter("someone/EAGLE3-tiny", target)
    assert drafter.format == "eagle3"


def test_sampling_follows_the_target_distribution(tmp_path):
    """Speculative sampling with a PARD drafter (the target itself plus a pard token: many
    acceptances, some rejections): the first new tokens follow the target's exact distribution."""
    from test_engine_sampling import SAMPLES, SETTINGS, VOCAB as SMALL, _chi_square_pvalue, _exact_joint
    from parallelspec.sampling import SamplingParams
    model = tiny_model("llama", SMALL, seed=3)
    model.config.max_position_embeddings = 64
    model.save_pretrained(str(tmp_path / "pard"))
    config = json.loads((tmp_path / "pard" / "config.json").read_text())
    (tmp_path / "pard" / "config.json").write_text(json.dumps({**config, "pard_token": SMALL - 1}))
    drafter = ps.load_drafter(str(tmp_path / "pard"), model, depth=3, top_m=1)   # some steps reject all
    prompt, n = [1, 4, 2, 4, 1], 3
    exact = _exact_joint(model, prompt, n, SamplingParams(True, **SETTINGS))
    torch.manual_seed(1234)
    out, stats = ps.generate(model, torch.tensor([prompt] * SAMPLES), drafter, max_new_tokens=n, do_sample=True,
                             tree="dynamic", return_stats=True, **SETTINGS)
    assert stats.accept_histogram[1] > 0 and sum(stats.accept_histogram[2:]) > 0
    new = out[:, len(prompt):]
    counts = torch.zeros([SMALL] * n, dtype=torch.float64)
    counts.index_put_(tuple(new.T), torch.ones(SAMPLES, dtype=torch.float64), accumulate=True)
    assert _chi_square_pvalue(counts, exact) > 1e-3
    for j in range(n):
        dims = tuple(i for i in range(n) if i != j)
        assert _chi_square_pvalue(counts.sum(dim=dims), exact.sum(dim=dims)) > 1e-3, f"position {j}"


def test_our_vllm_export_loads_as_a_peagle_head_and_drafts_the_same(target, tmp_path, monkeypatch):
    """`parallelspec export --format vllm` writes vLLM's P-EAGLE files (no aux hidden states); read
    back by the P-EAGLE loader they draft exactly what the parallel drafter they came from drafts."""
    from parallelspec.drafters import ParallelDrafter, build_network
    from parallelspec.drafters import parallel as native_module
    from parallelspec.drafters.published import eagle3
    from parallelspec.tools.export import export_vllm
    net = build_network(target, parallel=True, depth=DEPTH, layout="eagle3", head="trained", seed=5)
    with torch.no_grad():
        net.mask_hidden.normal_(std=1.0)
    native = ParallelDrafter(net, top_m=4)
    native.save_pretrained(tmp_path / "native", dtype=torch.float32)
    export_vllm(tmp_path / "native", tmp_path / "vllm", target=target)
    published = ps.load_drafter(str(tmp_path / "vllm"), target)
    assert published.format == "peagle" and published.depth == DEPTH and published.aux_layers == ()
    ours, *_ = run_ours(monkeypatch, target, published, eagle3)
    theirs, *_ = run_ours(monkeypatch, target, native, native_module)
    assert len(ours) == len(theirs) >= 8
    for (b1, s1, d1), (b2, s2, d2) in zip(ours, theirs):
        assert (b1, s1) == (b2, s2)
        assert torch.allclose(d1.exp(), d2.exp(), atol=1e-5)


def test_heads_in_one_hybrid_share_one_set_of_aux_layers(target, tmp_path):
    ids, mask = left_padded([5, 9], V, seed=7)
    a = ps.load_drafter(str(write_specforge(tmp_path / "a")), target)
    b = ps.load_drafter(str(write_peagle(tmp_path / "b")), target)
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ps.generate(target, ids, [ps.NgramDrafter(num_tokens=4), a, b], attention_mask=mask,
                                   max_new_tokens=8, tree="dynamic"), ref)
    pinned = ps.load_drafter(str(write_specforge(tmp_path / "c", aux_ids=[1, 3, 6])), target)
    with pytest.raises(ValueError, match=r"its sources read different target layers \[\(1, 3, 6\), \(2, 4, 5\)\]"):
        ps.generate(target, ids, [a, pinned], attention_mask=mask, max_new_tokens=8)
