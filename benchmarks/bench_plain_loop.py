"""Plain decoding through parallelspec's loop (drafter=None) vs transformers' generate, and the
n-gram drafter, on the default target (SmolLM2-135M-Instruct), greedy, batch 1.

    python benchmarks/bench_plain_loop.py [--max-new-tokens 64] [--dtype fp32] [--repeats 2] [--threads N]

Every run is checked token-for-token against transformers' output. Methods alternate prompt by
prompt and the best of --repeats runs is kept, so load from other processes hits all of them
alike. Writes medians over the prompts (and the per-prompt rows) to
benchmarks/results/plain_loop.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import parallelspec as ps
import ps_kernels
from parallelspec.models import load_default_target

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash table is to a beginner.",
    "List three tips for staying focused while studying.",
    "Translate 'good morning, how are you?' into Spanish and French.",
]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per prompt and method (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "plain_loop.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_default_target(dtype, verbose=False)
    # the weights in 2 MiB pages, where generate's rule moves them once a process's calls have paid
    # for it (parallelspec/hugepages.py): every method below reads them there
    from parallelspec import hugepages
    hugepages.move(model)
    # eager: the default (compile=None) could compile a shape mid-run (parallelspec/compiled.py)
    methods = {
        "hf_generate": lambda ids: model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False),
        "parallelspec_plain": lambda ids: ps.generate(model, ids, max_new_tokens=args.max_new_tokens,
                                                      return_stats=True, compile=False),
        "parallelspec_ngram_chain": lambda ids: ps.generate(model, ids, ps.NgramDrafter(num_tokens=4),
                                                            max_new_tokens=args.max_new_tokens, return_stats=True,
                                                            compile=False),
        "parallelspec_ngram_dynamic": lambda ids: ps.generate(model, ids, ps.NgramDrafter(num_tokens=4),
                                                              max_new_tokens=args.max_new_tokens, tree="dynamic",
                                                              tree_nodes=8, return_stats=True, compile=False),
    }
    warm = tokenizer("Hello", return_tensors="pt").input_ids
    for fn in methods.values():  # first calls pay one-time costs (registration, allocator)
        fn(warm)
    rows = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt").input_ids
        row = {"prompt": prompt, "prompt_tokens": ids.shape[1]}
        best, outputs = {}, {}
        for _ in range(args.repeats):  # methods alternate within each repeat
            for name, fn in methods.items():
                outputs[name], seconds = _timed(lambda: fn(ids))
                best[name] = min(best.get(name, seconds), seconds)
        reference = outputs["hf_generate"]
        for name in methods:
            sequences, stats = outputs[name] if isinstance(outputs[name], tuple) else (outputs[name], None)
            new = sequences.shape[1] - ids.shape[1]
            row[name] = {"new_tokens": new, "seconds": best[name], "tokens_per_s": new / best[name],
                         "matches_hf": bool(torch.equal(sequences, reference))}
            if stats is not None:
                row[name]["mean_accepted"] = stats.mean_accepted
                row[name]["steps"] = stats.steps
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else
                              {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()})
                          for k, v in row.items()}), flush=True)
    summary = {name: {"median_tokens_per_s": statistics.median(r[name]["tokens_per_s"] for r in rows),
                      "all_match_hf": all(r[name]["matches_hf"] for r in rows)} for name in methods}
    for name in methods:
        if "mean_accepted" in rows[0][name]:
            summary[name]["median_mean_accepted"] = statistics.median(r[name]["mean_accepted"] for r in rows)
    hf = summary["hf_generate"]["median_tokens_per_s"]
    for name in methods:
        summary[name]["speedup_vs_hf"] = summary[name]["median_tokens_per_s"] / hf
    result = {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "batch": 1,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "ps_kernels_backends": ps_kernels.backends(),
              # ops without a public version yet run from ps_kernels.reference
              "ops_from_reference": [op for op in ("tree_attention", "tree_accept", "kv_rollback")
                                     if not hasattr(ps_kernels, op)],
              "summary": summary, "prompts": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
