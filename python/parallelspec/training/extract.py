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

from .data import autocast_for, generate_shard, load_prompts, save_atomic, shard_path


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


def extract_shard(model, gen: dict, top_k: int = 32, max_len: int = 640, batch_tokens: int = 8192,
                  autocast_dtype=torch.bfloat16) -> dict:
    seqs = [(p + g)[:max_len] for p, g in zip(gen["ids"], gen["gen"])]
    out = {"ids": [], "start": [], "feat": [], "topk_ids": [], "topk_p": [], "conv": list(gen["conv"])}
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
    for i, seq in enumerate(seqs):
        out["ids"].append(torch.tensor(seq, dtype=torch.int32))
        out["start"].append(min(len(gen["ids"][i]), len(seq)))
        f, ti, tp = results[i]
        out["feat"].append(f)
        out["topk_ids"].append(ti)
        out["topk_p"].append(tp)
    return out


def build_data(model, tokenizer, out_dir, *, train_shards: int | None, heldout_shards: int | None = 1,
               shard_size: int = 256, max_new_tokens: int = 384, gen_batch: int = 32, top_k: int = 32,
               max_len: int = 640, held_out: float = 0.02, max_prompt_tokens: int = 256,
               autocast_dtype=torch.bfloat16, log=print) -> None:
    """Generate, then extract, shard by shard: held-out first (evaluation needs it from the
    start), then training shards, so the extracted data grows while the job runs. Shards that
    exist are kept: rerunning resumes."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    t0, made, seen = time.time(), 0, 0
    for split, count in (("heldout", heldout_shards), ("train", train_shards)):
        prompts = load_prompts(tokenizer, split, held_out, max_prompt_tokens)
        n = (len(prompts) + shard_size - 1) // shard_size
        n = n if count is None else min(n, count)
        for s in range(n):
            gen_path, ext_path = shard_path(out_dir, split, "gen", s), shard_path(out_dir, split, "ext", s)
            if ext_path.exists():
                continue
            if not gen_path.exists():
                made += generate_shard(model, tokenizer, prompts[s * shard_size:(s + 1) * shard_size], gen_path,
                                       max_new_tokens, gen_batch, autocast_dtype)
            shard = extract_shard(model, torch.load(gen_path), top_k, max_len, autocast_dtype=autocast_dtype)
            save_atomic(shard, ext_path)
            seen += sum(len(x) for x in shard["ids"])
            el = time.time() - t0
            log(f"{split} shard {s + 1}/{n}: {made} tokens generated, {seen} extracted in {el:.0f} s "
                f"({made / el:.0f} gen tok/s overall)")


def main_extract(argv=None) -> None:
    """`parallelspec extract`: self-distilled data + the target pass, resumable shards."""
    ap = argparse.ArgumentParser(prog="parallelspec extract", description=main_extract.__doc__)
    ap.add_argument("--target", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="shard directory (outside git)")
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
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, torch.device(args.device))
    build_data(model, tokenizer, args.out, train_shards=args.train_shards, heldout_shards=args.heldout_shards,
               shard_size=args.shard_size, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
               top_k=args.top_k, max_len=args.max_len, held_out=args.held_out, max_prompt_tokens=args.max_prompt_tokens,
               autocast_dtype=None if args.fp32 else torch.bfloat16, log=lambda m: print(m, flush=True))


def load_target(path, device=torch.device("cpu")):
    """(model, tokenizer): a HF causal LM directory, or the embedded default target."""
    if path is None:
        from ..models import load_default_target

        model, tokenizer = load_default_target()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device), tokenizer


if __name__ == "__main__":
    main_extract()
