"""Figures for the training card: the prompt-lookup baseline on the same held-out text, and
the drafters' step latency on this machine.

    python -m parallelspec.tools.training.report --data SHARDS --drafter DIR [--drafter DIR...] [--curve summary.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .train import ShardData


def ngram_proposal(context: list[int], depth: int, max_n: int = 3) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the longest
    suffix n-gram (n = max_n..1) of the context; [] when none matches."""
    L = len(context)
    for n in range(min(max_n, L - 1), 0, -1):
        suffix = context[L - n:]
        for start in range(L - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                return context[start + n:start + n + depth]
    return []


def ngram_baseline(data: ShardData, depth: int, max_n: int = 3, sequences: int | None = None) -> dict:
    """Per-depth top-1 agreement and tokens per greedy chain step of prompt lookup, at the same
    anchors and labels as train.evaluate (context = the tokens up to the root)."""
    agree = torch.zeros(depth)
    count = torch.zeros(depth)
    chain, chains = 0.0, 0
    for s in data.seqs[:sequences]:
        ids = s["ids"].tolist()
        N = len(ids)
        target = s["topk_ids"][:, 0].tolist()
        for a in range(max(s["start"] - 2, 0), N - 1):
            # anchor a: the last real input pairs (f_a, x_{a+1}); depth d's label is position a + d
            prop = ngram_proposal(ids[:a + 2], depth, max_n)
            hits = []
            for d in range(1, depth + 1):
                pos = a + d
                if pos > N - 2:
                    break
                hit = len(prop) >= d and prop[d - 1] == target[pos]
                agree[d - 1] += hit
                count[d - 1] += 1
                hits.append(hit)
            if len(hits) == depth:
                lead = 0
                while lead < depth and hits[lead]:
                    lead += 1
                chain += 1 + lead
                chains += 1
    return {"heldout_top1": [round(float(x), 4) for x in agree / count.clamp(min=1)],
            "chain_accept": round(chain / max(chains, 1), 4), "positions": int(count[0])}


@torch.no_grad()
def step_latency(drafter, context: int = 256, batch: int = 1, repeats: int = 20) -> float:
    """Median seconds of one decoding-time step (1 new real token) on a `context`-row cache."""
    cfg = drafter.net.cfg
    drafter.reset(batch, context + 8, torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (batch, context))
    drafter.step(tokens, torch.randn(batch, context, cfg.hidden_size), torch.full((batch,), context))
    one = torch.ones(batch, dtype=torch.long)
    times = []
    for _ in range(repeats):
        drafter.cache_lens -= 1        # the same cache row every time: latency at fixed length
        t0 = time.perf_counter()
        drafter.step(tokens[:, :1], torch.randn(batch, 1, cfg.hidden_size), one)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def curve_table(history: list[dict]) -> str:
    """Markdown rows: training tokens seen -> held-out per-depth top-1 and chain tokens/step."""
    rows = ["| step | tokens seen | depth-1..k top-1 | depth-1..k top-4 | tokens / chain step |",
            "|---:|---:|---|---|---:|"]
    for e in history:
        rows.append(f"| {e['step']} | {e['tokens']:,} | {' / '.join(f'{x:.3f}' for x in e['heldout_top1'])} | "
                    f"{' / '.join(f'{x:.3f}' for x in e.get('heldout_top4', []))} | {e['chain_accept']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    from ...drafters import EagleDrafter, ParallelDrafter
    from ...models import load_target

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", help="shard directory: prints the prompt-lookup baseline on its held-out shards")
    ap.add_argument("--drafter", action="append", default=[])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--curve", action="append", default=[], help="a training summary.json: print its curve")
    args = ap.parse_args(argv)
    for path in args.curve:
        print(curve_table(json.loads(Path(path).read_text())["history"]))
    if args.data:
        held = ShardData(sorted(Path(args.data).glob("heldout-ext-*.pt")), max_len=512)
        print(json.dumps({"ngram": ngram_baseline(held, args.depth, sequences=args.sequences)}))
    if args.drafter:
        target, _ = load_target(None)
        for path in args.drafter:
            kind = json.loads((Path(path) / "config.json").read_text())["kind"]
            cls = ParallelDrafter if kind == "parallel" else EagleDrafter
            d = cls.from_pretrained(path, target)
            print(json.dumps({"drafter": path, "step_ms": round(1e3 * step_latency(d), 2)}))


if __name__ == "__main__":
    main()
