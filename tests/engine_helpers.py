"""Tiny random HF models and test drafters for the decoding-loop tests."""
from __future__ import annotations

import torch

from parallelspec.drafters.base import DraftCandidates, Drafter

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
MISTRAL_WINDOW = 8   # the tiny Mistral's sliding window


def tiny_model(arch: str = "llama", vocab: int = 256, layers: int = 2, seed: int = 0, max_positions: int = 256):
    """A few-layer random model of the family; initializer_range is raised so the logits are
    peaked enough that argmax ties (which any change of summation order may flip) are absent.
    No special tokens: EOS only where a test asks for it."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  initializer_range=0.1, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=24, **common),
        # a real sliding window, shorter than most test sequences (prompt + new tokens), and
        # its own weights (seed + 1): not the Llama model under another name
        "mistral": lambda: tf.MistralConfig(sliding_window=MISTRAL_WINDOW, **common),
    }[arch]()
    model_cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
                 "mistral": tf.MistralForCausalLM}[arch]
    torch.manual_seed(seed + (arch == "mistral"))
    return model_cls(config).eval()


def left_padded(lengths, vocab: int, pad: int = 0, seed: int = 1):
    """Random prompts of the given lengths, left-padded: (input_ids [B, T], attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


class OracleDrafter(Drafter):
    """Proposes, per depth, the true continuation (known in advance) with probability p_true,
    and random tokens elsewhere: any candidates must give the target's output,
    and the true ones make long acceptances (and rollbacks) happen.

    It also checks the step() contract against the reference: the tokens it is given extend the
    committed sequence (EAGLE shift: x_2.., then each step's accepted tokens and next token) and,
    when `hidden` is given, the features are the target's hidden states one position earlier."""

    def __init__(self, sequences: list[list[int]], vocab: int, depth: int = 4, width: int = 3, p_true: float = 0.7,
                 hidden: list[torch.Tensor] | None = None, check_lens: list[int] | None = None, seed: int = 0):
        self.sequences, self.vocab, self.depth, self.width, self.p_true = sequences, vocab, depth, width, p_true
        # the contract is checked while a sequence is live: up to its output's length
        self.check_lens = check_lens or [len(s) for s in sequences]
        self.hidden = hidden
        self.needs_features = hidden is not None
        self.generator = torch.Generator().manual_seed(seed)
        self.checked_tokens = 0

    def reset(self, batch_size, max_len, device, dtype):
        assert batch_size == len(self.sequences)
        self.lens = [1] * batch_size  # tokens received so far + the first prompt token

    def check_target(self, model):
        if model.config.vocab_size != self.vocab:
            raise ValueError(f"drafter: built for vocab {self.vocab}, the model has {model.config.vocab_size}")

    def step(self, tokens, features, lens):
        B = tokens.shape[0]
        out = torch.randint(0, self.vocab, (B, self.depth, self.width), generator=self.generator)
        logprobs = -torch.rand(B, self.depth, self.width, generator=self.generator) * 3
        for b in range(B):
            ref, start, n = self.sequences[b], self.lens[b], int(lens[b])
            usable = max(0, min(n, self.check_lens[b] - start))  # past it: a finished sequence's filler
            got = tokens[b, :usable].tolist()
            assert got == ref[start:start + usable], f"sequence {b}: drafter got {got}, expected {ref[start:start + usable]}"
            if self.hidden is not None:
                want = self.hidden[b][start - 1:start - 1 + usable]
                torch.testing.assert_close(features[b, :usable], want, atol=1e-4, rtol=1e-4)
            self.checked_tokens += usable
            self.lens[b] += n
            for d in range(self.depth):
                pos = self.lens[b] + d
                if pos < len(ref) and float(torch.rand((), generator=self.generator)) < self.p_true:
                    # mostly the top slot (what a chain follows), sometimes another (trees branch)
                    slot = 0 if float(torch.rand((), generator=self.generator)) < 0.7 else \
                        int(torch.randint(0, self.width, (), generator=self.generator))
                    out[b, d, slot] = ref[pos]
        return DraftCandidates(out, logprobs)


def hf_greedy(model, ids, mask, max_new_tokens, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def unpadded_rows(sequences: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Per sequence: prompt tokens (without left padding) + the generated tokens."""
    T = mask.shape[1]
    return [sequences[b, T - int(mask[b].sum()):].tolist() for b in range(sequences.shape[0])]


def oracle_network(model, parallel: bool, depth: int = 4, slot1: str = "mask"):
    """A drafter network that copies a Llama target: as many layers as the target, each the
    target's layer (norms, projections, MLP), the target's final norm and head, and the fused
    input keeping the token's embedding only. A real row then computes the target's own hidden
    state over the tokens the drafter has seen, so its top candidate is (nearly: the drafter never
    sees the first prompt token) the target's next token; the EAGLE-style drafter, fed its own
    drafts, continues the target's greedy chain, and the parallel one's mask slots guess.
    Acceptance is high but not certain, so drafts are accepted and rejected in one run."""
    from parallelspec.drafters import build_network

    c = model.config
    if c.model_type != "llama":
        raise ValueError(f"model: the oracle network copies a Llama target's layers, got {c.model_type}")
    net = build_network(model, parallel=parallel, depth=depth, num_layers=c.num_hidden_layers, slot1=slot1)
    d = c.hidden_size
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.weight[:, :d] = torch.eye(d)
        for mine, theirs in zip(net.layers, model.model.layers):
            mine.input_norm.weight.copy_(theirs.input_layernorm.weight)
            mine.post_norm.weight.copy_(theirs.post_attention_layernorm.weight)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(mine, name).weight.copy_(getattr(theirs.self_attn, name).weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(mine, name).weight.copy_(getattr(theirs.mlp, name).weight)
        net.norm.weight.copy_(model.model.norm.weight)
    return net


def record_step_lens(drafter):
    """Wrap drafter.step to record each step's `lens` (tokens committed per sequence since the
    last step: the previous step's accepted count, 0 once finished); returns the list."""
    steps, step = [], drafter.step

    def recording(tokens, features, lens, *args, **kwargs):
        steps.append(lens.tolist())
        return step(tokens, features, lens, *args, **kwargs)
    drafter.step = recording
    return steps


def assert_equal_or_near_tie(model, mask, ours, reference, ulps: int = 4) -> list:
    """Greedy outputs in a low-precision dtype: each row of `ours` equals `reference` (transformers'
    generate, same model and dtype), or the first token where they differ is a near-tie of the
    target's own logits there: the two tokens' logits (the model's forward over the common prefix,
    in its dtype) within `ulps` units in the last place of the dtype at their magnitude. Rows are
    compared up to the shorter length. Returns [(row, column, logit gap, tolerance)] of the
    divergences (empty when every row is equal)."""
    eps = torch.finfo(model.dtype).eps
    T = min(ours.shape[1], reference.shape[1])
    found = []
    for b in range(ours.shape[0]):
        differ = (ours[b, :T] != reference[b, :T]).nonzero()
        if not len(differ):
            continue
        t = int(differ[0])
        assert t >= mask.shape[1], f"row {b}: the prompt itself differs at column {t}"
        prefix_mask = torch.cat([mask[b], mask.new_ones(t - mask.shape[1])])[None]
        with torch.no_grad():
            logits = model(reference[b:b + 1, :t], attention_mask=prefix_mask).logits[0, -1].float()
        a, c = int(reference[b, t]), int(ours[b, t])
        gap = abs(float(logits[a] - logits[c]))
        tolerance = ulps * eps * max(abs(float(logits[a])), abs(float(logits[c])), 1.0)
        assert gap <= tolerance, (f"row {b}, column {t}: ours {c} vs transformers' {a}, logits "
                                  f"{float(logits[c]):.4f} vs {float(logits[a]):.4f} (gap {gap:.4f} > {tolerance:.4f}): "
                                  "not a near-tie")
        found.append((b, t, gap, tolerance))
    return found


_DISTILLED: dict = {}


def distilled_eagle3_network(model, depth: int = 3, steps: int = 300, seed: int = 0):
    """An eagle3-layout parallel drafter network (the layout vLLM serves) briefly distilled on
    `model`, so that its drafts are accepted: the layout cannot copy the target (layer 0's residual
    starts at the feature f, not at the token's embedding), so it learns instead. Data: the
    target's greedy continuations (24 tokens) of 1,024 random prompts of 1 to 10 tokens, their
    features (model.model's last hidden state, what the loop passes) and the target's argmax at
    every position. Training: the package's parallel training forward over anchors every other
    position, cross-entropy against the target's next token at the real rows and at the mask
    slots (those whose context up to the label is the target's own greedy output), Adam. A few
    seconds on one core; the weights are cached per model (its config and weights) and each call
    returns a fresh copy attached to `model`. Deterministic under a fixed thread count.
    Measured on the tiny Llama (4 prompts of tests/test_export_vllm.py, 16 new tokens): mean
    accepted tokens per step 1.6 (chain) to 2.0 (auto tree), against 1.2-1.6 for a random one."""
    import copy
    import json

    src = model if next(model.parameters()).device.type == "cpu" and model.dtype == torch.float32 \
        else copy.deepcopy(model).to("cpu", torch.float32)
    key = (json.dumps(src.config.to_dict(), sort_keys=True, default=str),
           tuple(float(p.detach().double().sum()) for p in src.parameters()), depth, steps, seed)
    if key not in _DISTILLED:
        _DISTILLED[key] = _distill_eagle3(src, depth, steps, seed)
    net = copy.deepcopy(_DISTILLED[key])
    net.attach_target(model)
    return net


def _distill_eagle3(model, depth, steps, seed, pool: int = 1024, new_tokens: int = 24, batch: int = 16,
                    lr: float = 6e-3):
    import torch.nn.functional as F

    from parallelspec.drafters import build_network
    from parallelspec.tools.training.forwards import parallel_train_forward

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 11, (pool,), generator=g)
    ids, mask = left_padded(lengths.tolist(), V, seed=seed + 100)
    with torch.no_grad():
        seqs = hf_greedy(model, ids, mask, new_tokens, pad_token_id=0)
        full_mask = torch.cat([mask, mask.new_ones(pool, new_tokens)], dim=1)
        feat = model.model(seqs, attention_mask=full_mask).last_hidden_state
        label = model.get_output_embeddings()(feat).argmax(-1)   # label[s]: the target's token after position s
    # left-align each row: tokens, features and labels from the row's first prompt token
    P, N = ids.shape[1], seqs.shape[1]
    tok, fea, lab = torch.zeros_like(seqs), torch.zeros_like(feat), torch.zeros_like(label)
    for b, n in enumerate(lengths.tolist()):
        tok[b, :n + new_tokens], fea[b, :n + new_tokens], lab[b, :n + new_tokens] = \
            seqs[b, P - n:], feat[b, P - n:], label[b, P - n:]
    ends = lengths + new_tokens                          # tokens per row
    net = build_network(model, parallel=True, depth=depth, layout="eagle3", seed=seed)
    n = N - 1                                            # real input t = (x_{t+1}, f_t)
    anchors = torch.arange(0, n, 2)
    real_pos = torch.arange(n) + 1                       # real row t predicts label[t + 1]
    slot_pos = anchors[:, None] + 2 + torch.arange(depth - 1)   # slot j of anchor a: label[a + 2 + j]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        rows = torch.randint(0, pool, (batch,), generator=g)
        end, start = ends[rows], lengths[rows]
        real_ok = real_pos[None] < end[:, None] - 1
        # a slot's label is the target's greedy choice after tokens the slots never saw: only where
        # those tokens (from position a + 2) are the target's own greedy output
        slot_ok = (slot_pos[None] < end[:, None, None] - 1) & (anchors[None, :, None] + 2 >= start[:, None, None])
        real_g, slot_g = parallel_train_forward(net, tok[rows, 1:], fea[rows, :-1], anchors)
        y = lab[rows]
        loss = (F.cross_entropy(net.logits(real_g[real_ok]), y[:, real_pos][real_ok])
                + F.cross_entropy(net.logits(slot_g[slot_ok]), y[:, slot_pos.clamp(max=N - 1)][slot_ok]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
