"""PARD (AMD, ``pard/pard_infer.py``): an ordinary small causal LM whose config names a
``pard_token``. A step feeds the tokens committed since the last step followed by k - 1 pard
tokens, in one causal pass over the drafter's own KV cache; the logits at the last real token and
at the k - 1 pard tokens are the k draft distributions. After verification the pard tokens' K/V
are dropped (PARD's ``draft_cache_length - (k - 1)``) and the next step feeds the accepted tokens.

Here the draft LM runs through the same machinery as the target (``TargetModel`` over a
``KVCache``): the new real tokens and the pard tokens go in as one "tree" whose mask is causal
(real j sees reals <= j; pard slot m sees the sequence's real tokens and slots <= m, whatever the
row's padding), and ``KVCache.commit`` (``ps_kernels.kv_rollback``) keeps the real rows and drops
the pard rows. The draft LM sees the whole sequence, token 0 included (``begin``), and no target
features: it needs none, so one PARD drafter serves every target that shares its tokenizer.
"""
from __future__ import annotations

import torch

import ps_kernels

from ...hf.target import TargetModel
from ..base import DraftCandidates, Drafter
from ..network import top_candidates


class PardDrafter(Drafter):
    needs_features = False

    def __init__(self, lm, pard_token: int, *, depth: int = 4, top_m: int = 8, source: str = ""):
        if depth < 1:
            raise ValueError(f"depth: expected >= 1, got {depth}")
        self.lm = TargetModel(lm)
        self.pard_token = int(pard_token)
        self.depth = depth
        self.top_m = top_m
        self.source = source
        self.vocab = None        # the target's vocabulary size (check_target); None: the LM's own
        self.cache = None
        self.max_len = 0
        self._first = None

    def check_target(self, model) -> None:
        ours, theirs = self.lm.vocab_size, model.config.vocab_size
        # families pad their embedding tables differently (Qwen2.5-0.5B 151936 vs 7B 152064) over one tokenizer
        if abs(ours - theirs) > max(256, theirs // 100):
            raise ValueError(f"drafter {self.source}: made for another tokenizer than this model's: the PARD "
                             f"model's vocab_size is {ours}, the target's is {theirs}")
        self.vocab = theirs

    def reset(self, batch_size, max_len, device, dtype) -> None:
        self.lm.model.to(device=device, dtype=dtype).eval()
        self.max_len = max_len
        self.cache = self.lm.new_cache(batch_size, max_len + self.depth + 8)
        self._ids = torch.arange(self.lm.vocab_size, device=device)
        self._first = None

    def begin(self, first_tokens: torch.Tensor) -> None:
        """The prompts' first tokens [B] (the decoding loop's first step() feeds tokens 1..)."""
        self._first = first_tokens

    def step(self, tokens, features, lens) -> DraftCandidates:
        if self.cache is None:
            raise RuntimeError("call reset(batch_size, max_len, device, dtype) before step()")
        if self._first is not None:
            tokens = torch.cat([self._first[:, None], tokens], dim=1)
            lens = lens + 1
            self._first = None
        with torch.no_grad(), self.lm.attention():
            return self._step(tokens, lens)

    def _step(self, tokens, lens) -> DraftCandidates:
        B, R = tokens.shape
        M = self.depth - 1
        dev = tokens.device
        cache = self.cache
        cache.reserve(self.max_len + R + M)   # host ints: rows a step may touch (grows once, for the prompt)
        ids = torch.cat([tokens, torch.full((B, M), self.pard_token, dtype=tokens.dtype, device=dev)], dim=1)
        last = (lens - 1).clamp(min=0)
        col = torch.arange(R, device=dev)
        slot = torch.arange(1, M + 1, device=dev)
        positions = torch.cat([cache.lens[:, None] + col, (cache.lens + lens - 1)[:, None] + slot], dim=1)
        # a chain per row: reals 0..R-1, then the slots hang after the row's last real token
        parents = torch.cat([col - 1, R + slot - 2], dim=0).expand(B, -1).clone()
        if M:
            parents[:, R] = last
        mask = ps_kernels.tree_mask_from_parents(parents, validate=False)
        hidden = self.lm.forward(ids, positions, cache, mask)
        rows = torch.cat([last[:, None], (R + slot - 1).expand(B, -1)], dim=1)
        out = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
        logits = self.lm.logits(out)
        if self.vocab is not None and logits.shape[-1] > self.vocab:
            logits = logits[..., :self.vocab]   # padding rows of a larger table: never target tokens
        # keep the real rows, drop the pard rows (PARD's rollback), in every layer
        cache.commit(torch.arange(R + M, device=dev).expand(B, -1), lens)
        top, logp = top_candidates(logits, self._ids[:logits.shape[-1]], self.top_m)
        return DraftCandidates(top, logp)


def load_pard(path, config: dict, state: dict, model, *, depth: int | None = None, top_m: int = 8,
              arg: str = "drafter") -> PardDrafter:
    """A PardDrafter from the directory's config (a transformers causal LM config with pard_token)
    and its tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.get("pard_token") is None:
        raise ValueError(f"{arg}: {path}/config.json has no pard_token; a PARD drafter's config names it")
    try:
        lm_config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ValueError(f"{arg}: {path}/config.json is not a transformers config "
                         f"({type(exc).__name__}: {exc})") from None
    gen_state = torch.random.get_rng_state()
    lm = AutoModelForCausalLM.from_config(lm_config, dtype=torch.float32)
    torch.random.set_rng_state(gen_state)
    expected = set(lm.state_dict())
    tied = bool(getattr(lm_config, "tie_word_embeddings", False))
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if tied else set()))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{arg}: {path}: the weights do not match the {type(lm).__name__} its config.json describes: "
                         f"missing tensors {missing}, extra tensors {extra}")
    wrong = [f"{k}: expected {tuple(lm.state_dict()[k].shape)}, got {tuple(v.shape)}" for k, v in state.items()
             if tuple(v.shape) != tuple(lm.state_dict()[k].shape)]
    if wrong:
        raise ValueError(f"{arg}: {path}: tensor shapes do not match config.json: " + "; ".join(wrong))
    lm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if tied:
        lm.tie_weights()
    token = int(config["pard_token"])
    if not 0 <= token < lm_config.vocab_size:
        raise ValueError(f"{arg}: {path}: pard_token {token} is outside the model's vocabulary "
                         f"[0, {lm_config.vocab_size})")
    return PardDrafter(lm.eval(), token, depth=depth or 4, top_m=top_m, source=str(path))
