"""Held-out agreement of drafters side by side, on one set of extracted held-out shards: per-depth
top-1 / top-4 agreement with the target's greedy token and tokens per greedy chain step (what
`parallelspec train` logs while training, `training.train.evaluate`).

    python benchmarks/drafter_heldout.py --data DIR [--drafters parallel,parallel-eagle3,RUN/drafter]
                                         [--sequences 48] [--out benchmarks/results/variants/...json]

DIR: a directory with heldout-ext-*.pt shards (`parallelspec extract --out DIR`). A drafter is a
shipped name or a saved drafter directory. Every drafter is scored on the same anchors, with its
own draft vocabulary (a target choice outside it is a miss). Writes JSON with the machine."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (re-exports parallelspec.tools.benchutil)

from parallelspec.defaults import SHIPPED  # noqa: E402
from parallelspec.drafters.network import load_network  # noqa: E402
from parallelspec.models import load_target  # noqa: E402
from parallelspec.tools.training.train import ShardData, TrainConfig, evaluate, target_to_draft  # noqa: E402


def score(spec: str, target, data: ShardData, sequences: int) -> dict:
    path = Path(SHIPPED.get(spec, spec))
    kind = json.loads((path / "config.json").read_text()).get("kind", "parallel")
    net, _ = load_network(path, kind)
    net.attach_target(target)
    cfg = TrainConfig(kind=kind, depth=net.cfg.depth, bf16=True, eval_sequences=sequences)
    ev = evaluate(net, cfg, data, target_to_draft(net.draft_to_target, net.cfg.vocab_size), torch.device("cpu"))
    return {"drafter": spec, "layout": net.cfg.layout, **ev}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="directory of heldout-ext-*.pt shards")
    ap.add_argument("--drafters", default="parallel,parallel-eagle3", help="comma-separated names or paths")
    ap.add_argument("--sequences", type=int, default=48, help="held-out sequences scored")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shards = sorted(Path(args.data).glob("heldout-ext-*.pt"))
    if not shards:
        ap.error(f"--data: expected heldout-ext-*.pt shards in {args.data}, found none")
    target, _ = load_target(None, with_tokenizer=False)
    data = ShardData(shards, TrainConfig().max_len)     # what training evaluates on
    rows = []
    for spec in [s.strip() for s in args.drafters.split(",") if s.strip()]:
        row = score(spec, target, data, args.sequences)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        out = {"meta": harness.machine_info(torch.device("cpu")), "data": str(args.data),
               "sequences": args.sequences, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
