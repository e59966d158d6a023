"""A model's weights in 2 MiB pages (parallelspec/hugepages.py, what generate does on the CPU)
against the same weights where torch's allocator put them (4 KiB pages), paired in one process.

    python benchmarks/bench_hugepages.py [--model PATH] [--dtype bf16|fp32] [--methods plain_loop]
        [--compile false|true] [--threads 1] [--prompts 1] [--max-new-tokens 64] [--repeats 4] [--name NAME]

Two copies of the model are loaded; one is moved into huge pages, the other's calls run with
PARALLELSPEC_HUGE_PAGES=0 (nothing moved). Per repeat, per prompt, per method, both copies run back
to back, the order reversed every other repeat (machine noise hits both alike); outputs are compared
token for token. --model: the default target (SmolLM2-135M-Instruct) when omitted, else a local
transformers model folder with its tokenizer (e.g. the random Llama-3.2-1B-shaped model that
benchmarks/llamacpp_check.py prepares). Decode tok/s = (new tokens - 1) / (wall - prefill), as the
llama.cpp comparison counts it. Writes benchmarks/results/hugepages/<name>.json with the CPU model,
instruction-set level and the kernel's huge-page setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compiled_step import DTYPES, machine  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "hugepages"
PLACEMENTS = ("4 KiB pages", "2 MiB pages")


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallelspec.models import load_default_target
    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        return [AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]) for _ in PLACEMENTS], tok
    loaded = [load_default_target(DTYPES[args.dtype], verbose=False) for _ in PLACEMENTS]
    return [m for m, _ in loaded], loaded[0][1]


def start(threads: int):
    """torch's threads set and huge pages checked: the parallelspec.hugepages module."""
    torch.set_num_threads(threads)
    from parallelspec import hugepages
    usable, why = hugepages.available()
    if not usable:
        raise SystemExit(f"huge pages unavailable here: {why}")
    return hugepages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local transformers model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--methods", default="plain_loop")
    ap.add_argument("--compile", choices=("false", "true"), default="false")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=1, help="per category (chat, code, long)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-nodes", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--name", default=None, help="the results file's name (no .json)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    hugepages = start(args.threads)
    from parallelspec.tools.bench import build_methods, prompt_sets

    models, tok = load(args)
    for m in models:
        m.generation_config.eos_token_id = None    # every call makes max_new_tokens tokens
    moved = hugepages.move(models[1])
    huge = hugepages.huge_bytes(next(models[1].parameters()))
    print(f"moved {moved / 1e6:.0f} MB; {huge / 1e6 if huge is not None else float('nan'):.0f} MB of the mapping in "
          "huge pages", file=sys.stderr, flush=True)
    prompts = [(cat, i, ids) for cat, items in prompt_sets(tok, args.prompts).items() for i, ids in enumerate(items)]
    names = args.methods.split(",")
    methods = [build_methods(m, names, args.max_nodes, huge_pages=False) for m in models]
    bad = {n: f for table in methods for n, f in table.items() if isinstance(f, str)}
    if bad:
        raise SystemExit(f"methods unavailable: {bad}")
    compile_ = args.compile == "true"

    def call(which: int, name: str, ids, new: int):
        if which == 0:
            os.environ[hugepages.ENV] = "0"
        try:
            return methods[which][name](ids, max_new_tokens=new, do_sample=False, compile=compile_)
        finally:
            os.environ.pop(hugepages.ENV, None)

    for which in range(2):    # warm-up: allocator, compiled shapes (compile=true), verify-cost table
        for name in names:
            for _, _, ids in prompts:
                call(which, name, ids, args.max_new_tokens if compile_ else 4)
    rows = []
    for rep in range(args.repeats):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for cat, i, ids in prompts:
            for name in names:
                got = {}
                for which in order:
                    out, stats = call(which, name, ids, args.max_new_tokens)
                    n = out.shape[1] - ids.shape[1]
                    got[which] = out
                    rows.append({"repeat": rep, "prompt": f"{cat}{i}", "method": name, "placement": PLACEMENTS[which],
                                 "new_tokens": n, "wall_s": stats.total_time,
                                 "decode_tok_s": (n - 1) / (stats.total_time - stats.prefill_time)})
                rows[-1]["same_output"] = rows[-2]["same_output"] = bool(torch.equal(got[0], got[1]))
                print(f"repeat {rep} {cat}{i} {name}: " + ", ".join(
                    f"{r['placement']} {r['decode_tok_s']:.2f}" for r in rows[-2:]) + " tok/s", file=sys.stderr, flush=True)
    summary = {}
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        med = {p: statistics.median(r["decode_tok_s"] for r in mine if r["placement"] == p) for p in PLACEMENTS}
        pairs = [b["decode_tok_s"] / a["decode_tok_s"] for a, b in zip(
            *[[r for r in mine if r["placement"] == p] for p in PLACEMENTS])]
        summary[name] = {"median_decode_tok_s": med, "ratio_of_medians": med[PLACEMENTS[1]] / med[PLACEMENTS[0]],
                         "median_pair_ratio": statistics.median(pairs), "pair_ratio_range": [min(pairs), max(pairs)],
                         "same_output": all(r["same_output"] for r in mine)}
        print(f"{name}: 2 MiB / 4 KiB pages = {summary[name]['ratio_of_medians']:.3f} (pairs "
              f"{min(pairs):.3f}-{max(pairs):.3f}); outputs equal: {summary[name]['same_output']}", flush=True)
    thp = hugepages.THP_SETTING.read_text().strip()
    meta = {**machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model or "SmolLM2-135M-Instruct",
            "dtype": args.dtype, "compile": compile_, "max_new_tokens": args.max_new_tokens, "prompts": len(prompts),
            "repeats": args.repeats, "transparent_hugepage": thp, "moved_bytes": moved, "huge_page_bytes": huge,
            "command": "python benchmarks/bench_hugepages.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"hugepages_{meta['cpu_level']}_{args.dtype}_{args.threads}thread{'_compiled' if compile_ else ''}"
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
