"""Where a step's weights lie in memory, at the kernel level: one Llama-3.2-1B-shaped decode step's
linears (16 layers of q, k, v, o, gate, up, down, in call order; bf16, one x row) through
``ps_kernels.skinny_linear``, with the same weights

  separate     each its own torch allocation (4 KiB pages; what from_pretrained gives),
  one_4k       one buffer in call order, 4 KiB pages (each call's next weight follows it),
  one_2m       one buffer in call order in 2 MiB pages (``parallelspec.hugepages.move``, what
               generate does on the CPU),
  *_fused      the same buffer, a layer's q/k/v and gate/up each read by one call (their rows are
               adjacent there: one [3072, 2048] and one [16384, 2048] weight), 4 calls a layer not 7,

timed in rounds that visit the layouts in a shuffled order, medians over rounds; GB/s = the step's
weight bytes / its time.

    python benchmarks/bench_weight_layout.py [--threads 1] [--rounds 25] [--name NAME]

Writes benchmarks/results/hugepages/<name>.json with the CPU model and instruction-set level.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compiled_step import machine  # noqa: E402
from bench_hugepages import OUT, start  # noqa: E402
HIDDEN, KV, INTER, LAYERS = 2048, 512, 8192, 16
#: one layer's linears in call order: (N, K)
LAYER = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def fused(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer [q; k; v], o, [gate; up], down as views of the adjacent rows (one buffer, call order)."""
    out = []
    for i in range(0, len(weights), len(LAYER)):
        q, k, v, o, gate, up, down = weights[i:i + len(LAYER)]
        for first, parts in ((q, (q, k, v)), (o, (o,)), (gate, (gate, up)), (down, (down,))):
            rows = sum(w.shape[0] for w in parts)
            assert all(b.data_ptr() == a.data_ptr() + a.numel() * 2 for a, b in zip(parts, parts[1:])), "not adjacent"
            out.append(torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), first.storage_offset(),
                                                              (rows, first.shape[1])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    hugepages = start(args.threads)
    import ps_kernels

    g = torch.Generator().manual_seed(0)
    shapes = LAYER * LAYERS
    separate = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16) for n, k in shapes]
    flat = torch.cat([w.reshape(-1) for w in separate])
    one_4k = list(flat.split([w.numel() for w in separate]))
    one_4k = [w.view(n, k) for w, (n, k) in zip(one_4k, shapes)]
    holder = torch.nn.Module()
    for i, w in enumerate(separate):
        holder.register_parameter(f"w{i}", torch.nn.Parameter(w.clone(), requires_grad=False))
    hugepages.move(holder)
    one_2m = list(holder.parameters())
    layouts = {"separate": separate, "one_4k": one_4k, "one_2m": one_2m,
               "one_4k_fused": fused(one_4k), "one_2m_fused": fused(one_2m)}
    xs = {k: torch.randn(1, k, generator=g).to(torch.bfloat16) for k in (HIDDEN, INTER)}
    nbytes = sum(w.numel() * 2 for w in separate)

    def step(weights):
        for w in weights:
            ps_kernels.skinny_linear(xs[w.shape[1]], w, backend="cpu", validate=False)

    times = {k: [] for k in layouts}
    for _ in range(3):
        for ws in layouts.values():
            step(ws)
    for r in range(args.rounds):
        order = list(layouts)
        random.Random(r).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            step(layouts[name])
            times[name].append(time.perf_counter() - t0)
    summary = {k: {"median_ms": statistics.median(v) * 1e3, "gb_per_s": nbytes / statistics.median(v) / 1e9}
               for k, v in times.items()}
    for k, v in summary.items():
        v["x_separate"] = summary["separate"]["median_ms"] / v["median_ms"]
        print(f"{k:9s} {v['median_ms']:7.2f} ms  {v['gb_per_s']:5.1f} GB/s  x{v['x_separate']:.3f}", flush=True)
    meta = {**machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": args.rounds,
            "step_bytes": nbytes, "huge_page_bytes": hugepages.huge_bytes(one_2m[0]),
            "transparent_hugepage": hugepages.THP_SETTING.read_text().strip(),
            "command": "python benchmarks/bench_weight_layout.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or 'weight_layout_' + meta['cpu_level'] + f'_{args.threads}thread'}.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "seconds": times}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
