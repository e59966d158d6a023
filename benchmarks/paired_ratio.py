"""Two methods of `parallelspec bench` compared prompt by prompt, pooled over several runs.

    python benchmarks/paired_ratio.py RUN.json [RUN.json ...] --a parallel-eagle3_auto --b parallel_auto
                                      [--out benchmarks/results/variants/...json]

Each bench run times every method on the same prompt one after the other, so the ratio
a/b of one prompt's tokens per second cancels most of what the machine's load does to both;
the medians of the bench summary do not pair them. Per category: the geometric mean and the
median of the per-prompt ratios over every run given, their spread, and the mean tokens
accepted per step of each method (the part of a difference that the drafter explains)."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def paired(runs: list[dict], a: str, b: str) -> list[dict]:
    """Per category, the ratios tokens_per_s(a) / tokens_per_s(b) of the prompts both ran."""
    by_cat: dict[str, list[tuple[float, float, float]]] = {}
    for i, run in enumerate(runs):
        rows = {(r["category"], r["prompt"], r["method"]): r for r in run["rows"]}
        for (cat, prompt, method), ra in rows.items():
            rb = rows.get((cat, prompt, b))
            if method != a or rb is None:
                continue
            if ra.get("equal_to_hf") is False or rb.get("equal_to_hf") is False:
                raise ValueError(f"run {i}: {cat} prompt {prompt}: an output differs from transformers'; "
                                 f"its speed is not comparable")
            by_cat.setdefault(cat, []).append((ra["tokens_per_s"] / rb["tokens_per_s"],
                                               ra.get("mean_accepted") or 0.0, rb.get("mean_accepted") or 0.0))
    if not by_cat:
        have = sorted({r["method"] for run in runs for r in run["rows"]})
        raise ValueError(f"--a/--b: no prompt has both {a!r} and {b!r}; the runs have {have}")
    out = []
    for cat, vals in by_cat.items():
        ratios = [v[0] for v in vals]
        out.append({"category": cat, "pairs": len(vals),
                    "geomean_ratio": math.exp(statistics.fmean(math.log(r) for r in ratios)),
                    "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                    "accepted_a": statistics.fmean(v[1] for v in vals),
                    "accepted_b": statistics.fmean(v[2] for v in vals)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by parallelspec bench (--out DIR: DIR/e2e_*.json)")
    ap.add_argument("--a", required=True, help="method in the numerator")
    ap.add_argument("--b", required=True, help="method in the denominator")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    runs = []
    for p in args.runs:
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"runs: {p}: expected a bench JSON file, got {e}")
        if "rows" not in runs[-1]:
            ap.error(f"runs: {p}: expected a bench JSON file (with 'rows'), got keys {sorted(runs[-1])}")
    try:
        result = paired(runs, args.a, args.b)
    except ValueError as e:
        ap.error(str(e))
    print(f"{args.a} / {args.b}, tokens per second prompt by prompt over {len(runs)} run(s)")
    print(f"{'category':10s} {'pairs':>5s} {'geomean':>8s} {'median':>7s} {'min':>6s} {'max':>6s}  accepted a / b")
    for r in result:
        print(f"{r['category']:10s} {r['pairs']:5d} {r['geomean_ratio']:8.3f} {r['median_ratio']:7.3f} "
              f"{r['min_ratio']:6.3f} {r['max_ratio']:6.3f}  {r['accepted_a']:.2f} / {r['accepted_b']:.2f}")
    if args.out:
        meta = [run.get("meta", {}) for run in runs]
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "runs": list(args.runs),
                                              "commands": [m.get("command") for m in meta],
                                              "machines": sorted({f"{m.get('cpu_model')} "
                                                                  f"({(m.get('cpu_capability') or {}).get('active')})"
                                                                  for m in meta}),
                                              "by_category": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
