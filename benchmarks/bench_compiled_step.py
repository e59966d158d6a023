"""The compiled verify step (generate(compile=True), parallelspec/compiled.py) against the eager
one on the default target (SmolLM2-135M-Instruct), greedy, batch 1, paired in one process.

    python benchmarks/bench_compiled_step.py [--dtype fp32|bf16] [--methods plain_loop,hybrid_auto]
        [--prompts 2] [--max-new-tokens 128] [--repeats 2] [--threads 2] [--inductor-cache DIR]

1. first run: inductor's caches in a fresh folder (or --inductor-cache), every method's compiled
   runs once over all prompts (every tree-size bucket the prompts reach is compiled): the seconds
   each shape's first call took, summed per method;
2. timed: per repeat, per prompt, each method eager and compiled back to back (the order of the
   pair and of the methods reversed every other repeat, so machine noise hits both alike); tok/s
   = new tokens / the call's wall time (prefill included), and the compiled/eager ratio per pair;
   outputs of both compared token for token;
3. second process: the same script with ``--startup`` in a new process on the same cache folder:
   the first call of each shape again (now re-tracing and loading, not compiling), summed.

Prompts: ``parallelspec bench``'s sets (chat, code, long; --prompts per category). Writes
benchmarks/results/compiled_step/compiled_step_<cpu level>_<dtype>.json with the CPU model and
instruction-set level.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "compiled_step"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine() -> dict:
    import ps_kernels
    from parallelspec.tools.benchutil import cpu_model, simd_flags

    info = {"cpu_model": cpu_model(), "simd_flags": simd_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_level": ps_kernels.cpu_capability().active, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_build": ps_kernels.native_build_id()}
    return info


def setup(args):
    from parallelspec.models import load_default_target
    from parallelspec.tools.bench import build_methods, prompt_sets

    model, tok = load_default_target(DTYPES[args.dtype], verbose=False)
    model.generation_config.eos_token_id = None     # every call makes max_new_tokens tokens
    prompts = [(cat, i, ids) for cat, items in prompt_sets(tok, args.prompts).items() for i, ids in enumerate(items)]
    methods = build_methods(model, args.methods.split(","), args.max_nodes)
    bad = {n: m for n, m in methods.items() if isinstance(m, str)}
    if bad:
        raise SystemExit(f"methods unavailable: {bad}")
    return model, prompts, methods


def first_calls(methods, prompts, new: int) -> dict:
    """Every method compiled over every prompt once: seconds of each shape's first call, per method."""
    from parallelspec import compiled

    out = {}
    for name, fn in methods.items():
        before = dict(compiled._state.first_call_seconds)
        t0 = time.perf_counter()
        for _, _, ids in prompts:
            fn(ids, max_new_tokens=new, do_sample=False, compile=True)
        shapes = {k: v for k, v in compiled._state.first_call_seconds.items() if k not in before}
        out[name] = {"seconds_all_prompts": time.perf_counter() - t0, "shapes": len(shapes),
                     "first_call_seconds": sorted(round(v, 2) for v in shapes.values()),
                     "first_call_seconds_sum": sum(shapes.values())}
        if compiled._state.failure:
            raise SystemExit(f"compiling failed: {compiled._state.failure}")
        print(f"{name}: first calls of {len(shapes)} shapes took {out[name]['first_call_seconds_sum']:.1f} s "
              f"{out[name]['first_call_seconds']}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--methods", default="plain_loop,hybrid_auto")
    ap.add_argument("--prompts", type=int, default=2, help="per category (chat, code, long)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-nodes", type=int, default=32, help="as parallelspec bench's default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inductor-cache", default=None, help="inductor's cache folder (default: a fresh one)")
    ap.add_argument("--startup", action="store_true", help="(internal) only the first calls, print JSON")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.inductor_cache or tempfile.mkdtemp(prefix="ps_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    started = time.perf_counter()
    model, prompts, methods = setup(args)
    load_seconds = time.perf_counter() - started
    new = args.max_new_tokens
    if args.startup:
        print(json.dumps({"load_seconds": load_seconds, "first_calls": first_calls(methods, prompts, new)}))
        return 0
    for fn in methods.values():    # eager warm-up (allocator, verify-cost table already cached)
        fn(prompts[0][2][:, :16], max_new_tokens=4, do_sample=False, compile=False)
    first = first_calls(methods, prompts, new)
    rows = []
    names = list(methods)
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        pair = (False, True) if rep % 2 == 0 else (True, False)
        for cat, i, ids in prompts:
            for name in order:
                got = {}
                for comp in pair:
                    t0 = time.perf_counter()
                    out, stats = methods[name](ids, max_new_tokens=new, do_sample=False, compile=comp)
                    wall = time.perf_counter() - t0
                    n = out.shape[1] - ids.shape[1]
                    got[comp] = (out, n / wall, stats)
                same = torch.equal(got[False][0], got[True][0])
                rows.append({"method": name, "category": cat, "prompt": i, "repeat": rep, "prompt_tokens": ids.shape[1],
                             "eager_tokens_per_s": got[False][1], "compiled_tokens_per_s": got[True][1],
                             "ratio": got[True][1] / got[False][1], "outputs_equal": same,
                             "mean_accepted": got[True][2].mean_accepted if got[True][2] else None})
                print(f"{rep} {name:11s} {cat:5s} {i}: eager {got[False][1]:6.1f} compiled {got[True][1]:6.1f} tok/s "
                      f"x{rows[-1]['ratio']:.3f}{'' if same else '  OUTPUTS DIFFER'}", file=sys.stderr, flush=True)
    summary = {}
    for name in names:
        rs = [r for r in rows if r["method"] == name]
        summary[name] = {"eager_tokens_per_s": statistics.median(r["eager_tokens_per_s"] for r in rs),
                         "compiled_tokens_per_s": statistics.median(r["compiled_tokens_per_s"] for r in rs),
                         "ratio_median": statistics.median(r["ratio"] for r in rs),
                         "ratio_range": [min(r["ratio"] for r in rs), max(r["ratio"] for r in rs)],
                         "outputs_equal": f"{sum(r['outputs_equal'] for r in rs)}/{len(rs)}",
                         "first_run_compile_seconds": first[name]["first_call_seconds_sum"],
                         "shapes": first[name]["shapes"]}
    # a second process on the same (now warm) cache: what a later run pays at start-up
    cmd = [sys.executable, __file__, "--startup", "--dtype", args.dtype, "--methods", args.methods, "--prompts",
           str(args.prompts), "--max-new-tokens", str(new), "--threads", str(args.threads), "--inductor-cache", cache,
           "--max-nodes", str(args.max_nodes)]
    second = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    for name in names:
        summary[name]["second_process_startup_seconds"] = second["first_calls"][name]["first_call_seconds_sum"]
    meta = machine() | {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "batch": 1, "max_new_tokens": new,
                        "max_nodes": args.max_nodes, "prompts_per_category": args.prompts, "repeats": args.repeats,
                        "eos": "off (every call makes max_new_tokens tokens)",
                        "method": "per prompt, eager and compiled back to back (order alternating per repeat); "
                                  "tok/s = new tokens / the call's wall time, prefill included; medians over "
                                  "prompts and repeats; ratio = compiled / eager of the same pair",
                        "first_run": "inductor caches in a fresh folder; seconds of each shape's first call "
                                     "(compile), summed per method over all prompts",
                        "second_process": "a new process, same cache folder: the same first calls (trace + load)",
                        "command": "python benchmarks/bench_compiled_step.py " + " ".join(argv or sys.argv[1:])}
    result = {"meta": meta, "summary": summary, "first_run": first, "second_process": second, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compiled_step_{meta['cpu_level']}_{args.dtype}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
