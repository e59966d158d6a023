"""The target pass: features and top-K probabilities for every position, cached in shards.

Each generation shard ``<split>-gen-NNNNN.pt`` becomes ``<split>-ext-NNNNN.pt`` holding, per
sequence x_0..x_{N-1} (prompt + the target's continuation, cut at ``max_len``):

    ids       int32 [N]
    start     int   index of the first generated token
    feat      bf16  [N, d]   f_t, the target's last hidden state (input of its LM head)
    topk_ids  int32 [N, K]   the target's K most likely next tokens after x_0..x_t
    topk_p    fp16  [N, K]   their probabilities (fp32 logits; the LM head runs in fp32)

Shards that exist are skipped, so the pass resumes; it is the cost that bounds how much data a
CPU can see (~450 tok/s fp32, ~670 tok/s bf16 autocast on 2 cores, method.md).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..cli import device_arg
from ..models import load_target
from .data import autocast_for, load_prompts, save_atomic, shard_path, sharegpt_token_counts


@torch.no_grad()
def target_pass(model, seqs: list[list[int]], top_k: int, autocast_dtype=torch.bfloat16):
    """(features [B, N, d], topk ids, topk probs, lens) for right-padded sequences."""
    device = next(model.parameters()).device
    lens = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
    mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
    with autocast_for(device, autocast_dtype):
        h = model.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    head = model.get_output_embeddings()
    logits = torch.nn.functional.linear(h.float(), head.weight.float())
    p, i = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return h, i, p, lens


def extract_shard(model, seqs: list[list[int]], starts: list[int], top_k: int = 32, max_len: int = 640,
                  batch_tokens: int = 8192, autocast_dtype=torch.bfloat16, progress=None) -> dict:
    """The target pass over given sequences (cut at max_len); labels count from starts[i] on.
    progress(done, total): called after each batch with the sequences done so far."""
    seqs = [s[:max_len] for s in seqs]
    out = {"ids": [], "start": [], "feat": [], "topk_ids": [], "topk_p": []}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    results: dict[int, tuple] = {}
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and (e + 1 - s) * len(seqs[order[e]]) <= batch_tokens:
            e += 1
        idx = order[s:e]
        h, ti, tp, lens = target_pass(model, [seqs[i] for i in idx], top_k, autocast_dtype)
        for r, i in enumerate(idx):
            n = int(lens[r])
            results[i] = (h[r, :n].to(torch.bfloat16).cpu(), ti[r, :n].int().cpu(), tp[r, :n].half().cpu())
        s = e
        if progress is not None:
            progress(s, len(order))
    for i, seq in enumerate(seqs):
        f, ti, tp = results[i]
        out["ids"].append(torch.tensor(seq, dtype=torch.int32))
        out["start"].append(min(starts[i], len(seq)))
        out["feat"].append(f)
        out["topk_ids"].append(ti)
        out["topk_p"].append(tp)
    return out


@torch.no_grad()
def generate_and_extract(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, top_k: int = 32,
                         batch_size: int = 32, autocast_dtype=torch.bfloat16, progress=None) -> dict:
    """Self-distillation and the target pass in one: the target continues every prompt
    greedily (KV cache, left-padded batches grouped by length, finished rows dropped from the
    batch), and the features / top-K probabilities computed on the way are kept, so no second
    pass over the generated text is needed. Same layout as extract_shard (top-K only where a
    label can be: from the last prompt position on; zeros before). progress(done, total): called
    after each batch with the prompts done so far."""
    import inspect

    from transformers import DynamicCache

    # transformers renamed past_key_values to cache (5.x); take whichever this version has
    cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    device = next(model.parameters()).device
    head = model.get_output_embeddings().weight
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = {"ids": [None] * len(prompts), "start": [len(p) for p in prompts], "feat": [None] * len(prompts),
           "topk_ids": [None] * len(prompts), "topk_p": [None] * len(prompts)}

    def top(h):       # fp32 LM head: bf16 ties flipped 2-3% of argmaxes (method.md)
        return torch.softmax(torch.nn.functional.linear(h.float(), head.float()), dim=-1).topk(top_k, dim=-1)

    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        with autocast_for(device, autocast_dtype):
            h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{cache_kw: cache}).last_hidden_state
        p, t = top(h[:, -1])
        feats = [[h[r, width - len(prompts[i]):].cpu()] for r, i in enumerate(rows)]
        tks = [[t[r:r + 1].cpu()] for r in range(len(rows))]
        tps = [[p[r:r + 1].cpu()] for r in range(len(rows))]
        gen = [[] for _ in rows]
        live = torch.arange(len(rows), device=device)        # batch row -> index into `rows`
        nxt = t[:, 0]
        for step in range(max_new_tokens):
            for r, tok in zip(live.tolist(), nxt.tolist()):
                gen[r].append(tok)
            keep = (nxt != eos_id).nonzero().squeeze(1)
            if step + 1 == max_new_tokens or keep.numel() == 0:
                break
            if keep.numel() < live.numel():
                cache.batch_select_indices(keep)
                live, nxt, mask, pos = live[keep], nxt[keep], mask[keep], pos[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            with autocast_for(device, autocast_dtype):
                h = model.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                                **{cache_kw: cache}).last_hidden_state[:, 0]
            p, t = top(h)
            hc, tc, pc = h.cpu(), t.cpu(), p.cpu()
            for j, r in enumerate(live.tolist()):
                feats[r].append(hc[j:j + 1])
                tks[r].append(tc[j:j + 1])
                tps[r].append(pc[j:j + 1])
            nxt = t[:, 0]
        for r, i in enumerate(rows):
            P, n = len(prompts[i]), len(prompts[i]) + len(gen[r])
            # the last generated token's own feature is never computed (nothing is predicted after
            # it); it is only ever a label, so pad that row: no training input reads it
            f = torch.cat(feats[r])
            f = torch.cat([f, f.new_zeros(n - f.shape[0], f.shape[1])])
            tk = torch.zeros(n, top_k, dtype=torch.int32)
            tp = torch.zeros(n, top_k, dtype=torch.float16)
            tk[P - 1:P - 1 + len(tks[r])] = torch.cat(tks[r]).int()
            tp[P - 1:P - 1 + len(tps[r])] = torch.cat(tps[r]).half()
            out["ids"][i] = torch.tensor(prompts[i] + gen[r], dtype=torch.int32)
            out["feat"][i] = f.to(torch.bfloat16)
            out["topk_ids"][i], out["topk_p"][i] = tk, tp
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    return out


def build_data(model, tokenizer, out_dir, *, train_shards: int | None, heldout_shards: int | None = 1,
               source: str = "self", shard_size: int = 256, max_new_tokens: int = 384, gen_batch: int = 32,
               top_k: int = 32, max_len: int = 640, held_out: float = 0.02, max_prompt_tokens: int = 256,
               autocast_dtype=torch.bfloat16, log=print) -> None:
    """Shards ``<split>-ext-NNNNN.pt``, held-out first (evaluation needs it from the start),
    then training shards one at a time, so the data grows while the job runs; shards that
    exist are kept, so rerunning resumes.

    source="self": the target's greedy continuations of the first user turns (self-distillation);
    source="sharegpt": ShareGPT's own conversations, labels from the first answer on."""
    if source not in ("self", "sharegpt"):
        raise ValueError(f"source: expected 'self' or 'sharegpt', got {source!r}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    prior = Path(out_dir) / "sharegpt-counts.pt"
    if not prior.exists():      # the draft vocabulary's prior (train.build_draft_vocab), ~1.5 min once
        save_atomic(sharegpt_token_counts(tokenizer, held_out), prior)
    t0, tokens = time.time(), 0
    last_log = [t0]

    def batch_progress(what):   # a line at most every 30 s: a shard takes minutes to an hour
        def report(done, total):
            now = time.time()
            if now - last_log[0] >= 30.0 and done < total:
                last_log[0] = now
                log(f"{what}: {done}/{total} sequences, {now - t0:.0f} s")
        return report

    for split, count in (("heldout", heldout_shards), ("train", train_shards)):
        items = load_prompts(tokenizer, split, held_out, max_prompt_tokens, conversations=source == "sharegpt")
        n = (len(items) + shard_size - 1) // shard_size
        n = n if count is None else min(n, count)
        for s in range(n):
            path = shard_path(out_dir, split, s)
            if path.exists():
                continue
            chunk = items[s * shard_size:(s + 1) * shard_size]
            report = batch_progress(f"{split} shard {s + 1}/{n}")
            if source == "self":
                shard = generate_and_extract(model, [p for _, p, _ in chunk], max_new_tokens, tokenizer.eos_token_id,
                                             top_k, gen_batch, autocast_dtype, progress=report)
            else:
                shard = extract_shard(model, [c for _, _, c in chunk], [len(p) for _, p, _ in chunk], top_k,
                                      max_len, autocast_dtype=autocast_dtype, progress=report)
            shard["conv"] = [c for c, _, _ in chunk]
            save_atomic(shard, path)
            new = sum(len(x) - st for x, st in zip(shard["ids"], shard["start"]))
            tokens += new
            el = time.time() - t0
            last_log[0] = time.time()
            log(f"{split} shard {s + 1}/{n}: +{new} tokens ({tokens} this run, {tokens / el:.0f} tok/s), {el:.0f} s")


def main_extract(argv=None) -> int:
    """`parallelspec extract`: self-distilled data + the target pass, resumable shards.
    Returns the exit code."""
    ap = argparse.ArgumentParser(prog="parallelspec extract", description=main_extract.__doc__)
    ap.add_argument("--target", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="shard directory (outside git)")
    ap.add_argument("--source", choices=("self", "sharegpt"), default="self",
                    help="self: the target's own continuations (default); sharegpt: the dataset's answers")
    ap.add_argument("--train-shards", type=int, default=None, help="default: every prompt")
    ap.add_argument("--heldout-shards", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=640)
    ap.add_argument("--held-out", type=float, default=0.02, help="fraction of conversations held out")
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, args.device)
    build_data(model, tokenizer, args.out, train_shards=args.train_shards, heldout_shards=args.heldout_shards,
               source=args.source,               shard_size=args.shard_size, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
               top_k=args.top_k, max_len=args.max_len, held_out=args.held_out, max_prompt_tokens=args.max_prompt_tokens,
               autocast_dtype=None if args.fp32 else torch.bfloat16, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    main_extract()
