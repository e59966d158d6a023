"""The default compile policy (generate's compile=None: a shape is compiled once its eager steps
have paid for it, parallelspec/compiled.py ``Ledger``) over a session of many calls, against
compile=False and compile=True, each in its own process, on the default target (SmolLM2-135M-
Instruct), greedy, batch 1.

    python benchmarks/bench_compile_default.py [--dtype bf16] [--method plain_loop] [--calls 60]
        [--max-new-tokens 128] [--threads 2]

Sessions, one process each, run one after another: eager (compile=False); compile=True on a fresh
inductor cache, and again in a later process on that cache; the default on a fresh cache (a machine that never compiled: the ledger's
estimates are the defaults); the default again in a second and a third process on that cache
(the earlier processes' measured costs, and inductor's cached code). Each session makes --calls calls, the
prompts of ``parallelspec bench``'s sets in turn, and records each call's wall seconds (its
compile, if any, included) and the shapes compiled so far. The summary gives each session's
total seconds and tok/s, and its total against the better of eager and compile=True in hindsight
on a cache in the same state (fresh, or warm from an earlier process; the rule's promise: at most
2x, plus the estimate's error). Writes
benchmarks/results/compiled_step/default_policy_<cpu level>_<dtype>.json (+ .png) with the CPU
model and instruction-set level.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compiled_step import DTYPES, OUT, machine, setup  # noqa: E402

SESSIONS = [("eager", "false", "fresh"), ("compile=True", "true", "fresh"),
            ("compile=True, later process", "true", "previous"),
            ("default, first process", "none", "fresh"), ("default, second process", "none", "previous"),
            ("default, third process", "none", "previous")]
#: the better of eager and compile=True in hindsight, on a fresh cache and on a warm one
BEST = {"fresh": ("eager", "compile=True"), "previous": ("eager", "compile=True, later process")}
COMPILE = {"false": False, "true": True, "none": None}


def session(args) -> dict:
    """One process's calls (--run): per call, wall seconds, new tokens, shapes compiled so far."""
    from parallelspec import compiled

    torch.set_num_threads(args.threads)
    _, prompts, methods = setup(argparse.Namespace(**vars(args), methods=args.method))
    prompts, method = [ids for _, _, ids in prompts], methods[args.method]
    method(prompts[0][:, :16], max_new_tokens=4, do_sample=False, compile=False)   # allocator warm-up
    calls = []
    for i in range(args.calls):
        ids = prompts[i % len(prompts)]
        started = time.perf_counter()
        out, _ = method(ids, max_new_tokens=args.max_new_tokens, do_sample=False, compile=COMPILE[args.run])
        seconds = time.perf_counter() - started
        shapes = sum(len(ledger.earned_shapes) for ledger in compiled._state.ledgers.values())
        calls.append({"seconds": seconds, "new_tokens": out.shape[1] - ids.shape[1], "compiled_shapes": shapes})
        print(f"  call {i + 1:3d}: {seconds:6.2f} s, {shapes} shapes compiled", file=sys.stderr, flush=True)
    return {"calls": calls, "failure": compiled._state.failure}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--method", default="plain_loop")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=2, help="per category (chat, code, long)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-nodes", type=int, default=32, help="as parallelspec bench's default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", choices=list(COMPILE), help="(internal) one session in this process, print JSON")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.run:
        print(json.dumps(session(args)))
        return 0
    sessions, cache = {}, None
    for label, run, where in SESSIONS:
        if where == "fresh":
            cache = tempfile.mkdtemp(prefix="ps_inductor_")
        print(f"{label} (inductor cache {cache})", file=sys.stderr, flush=True)
        argv_run = list(argv if argv is not None else sys.argv[1:]) + ["--run", run]
        done = subprocess.run([sys.executable, __file__, *argv_run], check=True, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        result = json.loads(done.stdout.strip().splitlines()[-1])
        seconds = sum(c["seconds"] for c in result["calls"])
        tokens = sum(c["new_tokens"] for c in result["calls"])
        sessions[label] = result | {"total_seconds": seconds, "tokens_per_s": tokens / seconds,
                                    "first_compiled_call": next((i + 1 for i, c in enumerate(result["calls"])
                                                                 if c["compiled_shapes"]), None)}
        print(f"{label}: {seconds:.1f} s, {tokens / seconds:.1f} tok/s", file=sys.stderr, flush=True)
    for label, _, where in SESSIONS:
        best = min(sessions[k]["total_seconds"] for k in BEST[where])
        sessions[label]["against_best_in_hindsight"] = sessions[label]["total_seconds"] / best
    meta = machine() | {"threads": args.threads, "dtype": args.dtype, "method": args.method, "calls": args.calls,
                        "max_new_tokens": args.max_new_tokens, "date": time.strftime("%Y-%m-%d"),
                        "command": "python benchmarks/bench_compile_default.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"default_policy_{meta['cpu_level']}_{args.dtype}.json"
    path.write_text(json.dumps({"machine": meta, "sessions": sessions}, indent=1))
    for label, s in sessions.items():
        print(f"{label:24s} {s['total_seconds']:7.1f} s  {s['tokens_per_s']:6.1f} tok/s  "
              f"{s['against_best_in_hindsight']:.2f}x the better in hindsight  first compiled call: "
              f"{s['first_compiled_call']}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {path} (no plot: matplotlib missing)")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in sessions.items():
        total, xs, ys = 0.0, [0], [0.0]
        for i, c in enumerate(s["calls"]):
            total += c["seconds"]
            xs.append(i + 1)
            ys.append(total)
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("calls")
    ax.set_ylabel("cumulative wall seconds")
    ax.set_title(f"{args.method}, SmolLM2 {args.dtype}, {args.max_new_tokens} tokens a call ({meta['cpu_level']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
