"""Few-row linears against the memory bound: ``ps_kernels.skinny_linear`` and torch's F.linear on
Llama-3.2-1B's weight shapes, as a share of the read rate measured in the same process.

A decode or verify step of a 1B model on a CPU multiplies each weight once by 1..8 rows, and
the weights (2.5 GB in bf16) stream from memory: the floor of a step is their bytes over the
machine's read rate. This script measures how close the linears come to that floor.

  shapes  hidden 2048, 32 query / 8 KV heads of 64, intermediate 8192, vocab 128256:
          qo 2048 x 2048, kv 512 x 2048, gate_up 8192 x 2048, down 2048 x 8192, lm_head 128256 x 2048
          (N x K); each in a pool of copies of at least --pool-mb, called in turn, so every call
          reads its weight from memory (L3 here is tens of MiB), as in a model step.
  bound   ``buf.sum()`` over a --probe-mb fp32 buffer (a plain read, all threads), measured in the
          same round as the kernels; each call's weight bytes / time over it is its share.
  order   rounds of every (shape, rows, level, method) in alternating order (reversed every other
          round), so machine noise (the cores are shared) hits them alike; medians over rounds.

    python benchmarks/bench_linear_bound.py [--rows 1,2,4,8] [--dtypes bfloat16,float32]
        [--levels auto|all|avx2,avx512] [--threads 2] [--rounds 7] [--torch] [--out DIR]

Writes DIR/linear_bound_<cpu level>.{json,csv} (default DIR benchmarks/results/linear_bound): rows
per (dtype, shape, rows, level, method) with ms, GB/s and share of the read rate, and a "step_1b"
row per (dtype, rows, level, method) that weighs the shapes as one 1B step does (16 layers of
q, k, v, o, gate, up, down, then the LM head). The CPU model, flags and levels are in its meta.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ps_kernels

#: Llama-3.2-1B's linear weights (N, K) and how many of each one decode step reads
SHAPES = {
    "qo": ((2048, 2048), 2 * 16),
    "kv": ((512, 2048), 2 * 16),
    "gate_up": ((8192, 2048), 2 * 16),
    "down": ((2048, 8192), 16),
    "lm_head": ((128256, 2048), 1),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "linear_bound"


def machine() -> dict:
    from parallelspec.tools.benchutil import cpu_model, simd_flags

    info = {"cpu_model": cpu_model(), "cores": torch.get_num_threads(), "simd_flags": simd_flags()}
    cap = ps_kernels.cpu_capability()
    info.update(cpu_level=cap.active, cpu_levels_compiled=list(cap.compiled), cpu_levels_supported=list(cap.supported),
                torch=torch.__version__, native_build=ps_kernels.native_build_id(), python=platform.python_version())
    return info


def read_rate(buf: torch.Tensor) -> float:
    """Bytes per second of one ``buf.sum()`` (the best of 3: the probe is short)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / best


def pool(shape, dtype, pool_bytes: int, g: torch.Generator) -> list[torch.Tensor]:
    n, k = shape
    one = n * k * torch.empty((), dtype=dtype).element_size()
    count = max(1, -(-pool_bytes // one))
    return [(torch.randn(n, k, generator=g) / k ** 0.5).to(dtype) for _ in range(count)]


def time_pool(method, x, weights) -> float:
    """Seconds per call, one pass over the pool (each weight read once)."""
    level, fn = method
    with ps_kernels.force_cpu_capability(level) if level else contextlib.nullcontext():
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        return (time.perf_counter() - t0) / len(weights)


def skinny(x, w):
    return ps_kernels.skinny_linear(x, w, backend="cpu", validate=False)


def methods(levels: list[str], with_torch: bool) -> dict:
    """name -> (CPU level to force or None, fn(x, w))"""
    out = {f"skinny@{level}": (None if level == "auto" else level, skinny) for level in levels}
    if with_torch:
        out["torch_linear"] = (None, F.linear)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--levels", default="auto",
                    help="'auto' (the level chosen at run time), 'all' (every level this machine runs) or a list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pool-mb", type=int, default=384, help="weights per shape, so that calls read from memory")
    ap.add_argument("--probe-mb", type=int, default=512, help="the read-rate probe's fp32 buffer")
    ap.add_argument("--torch", action="store_true", help="also torch's F.linear on the same weights")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: expected some of {list(SHAPES)}, got {s!r}")
    if args.levels == "all":
        levels = list(ps_kernels.runnable_cpu_levels())
    elif args.levels == "auto":
        levels = ["auto"]
    else:
        levels = args.levels.split(",")
    fns = methods(levels, args.torch)
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(args.probe_mb << 18, generator=g)   # fp32: MiB * 2^20 / 4
    meta = machine() | {"threads": args.threads, "rounds": args.rounds, "pool_mb": args.pool_mb,
                        "probe": f"fp32 sum over {args.probe_mb} MiB, best of 3 per round",
                        "command": "python benchmarks/bench_linear_bound.py " + " ".join(argv or sys.argv[1:])}
    print(f"{meta['cpu_model']}, level {meta['cpu_level']}, {args.threads} threads", file=sys.stderr)
    records = []
    for dtype in dtypes:
        for shape_name in shapes:
            shape, _ = SHAPES[shape_name]
            weights = pool(shape, dtype, args.pool_mb << 20, g)
            nbytes = weights[0].numel() * weights[0].element_size()
            xs = {m: torch.randn(m, shape[1], generator=g).to(dtype) for m in rows}   # activations in the weight dtype, as in a model
            cases = [(m, name) for m in rows for name in fns]
            for m, name in cases:   # warm-up (thread pool, pages of the pool)
                time_pool(fns[name], xs[m], weights[:1])
            times = {c: [] for c in cases}
            rates = []
            for r in range(args.rounds):
                rates.append(read_rate(probe))
                for m, name in (cases if r % 2 == 0 else cases[::-1]):
                    x = xs[m]
                    times[(m, name)].append(time_pool(fns[name], x, weights))
                rates.append(read_rate(probe))
            bound = statistics.median(rates)
            for (m, name), ts in times.items():
                t = statistics.median(ts)
                rec = {"dtype": str(dtype).removeprefix("torch."), "shape": shape_name, "N": shape[0], "K": shape[1],
                       "rows": m, "method": name, "ms": t * 1e3, "gb_s": nbytes / t / 1e9,
                       "read_gb_s": bound / 1e9, "share_of_read": nbytes / t / bound,
                       "ms_spread": [min(ts) * 1e3, max(ts) * 1e3], "pool": len(weights)}
                records.append(rec)
                print(f"{rec['dtype']:9s} {shape_name:8s} M={m:<2d} {name:20s} {rec['ms']:8.3f} ms "
                      f"{rec['gb_s']:6.1f} GB/s  {100 * rec['share_of_read']:5.1f}% of {bound / 1e9:.1f}",
                      file=sys.stderr, flush=True)
            del weights
    # one 1B decode/verify step's linears: the shapes weighed by how many of each a step reads
    step = []
    for dtype in {r["dtype"] for r in records}:
        for m in rows:
            for name in fns:
                rs = [r for r in records if r["dtype"] == dtype and r["rows"] == m and r["method"] == name]
                if {r["shape"] for r in rs} != set(SHAPES):
                    continue
                ms = sum(r["ms"] * SHAPES[r["shape"]][1] for r in rs)
                size = 2 if dtype in ("bfloat16", "float16") else 4
                nbytes = sum(SHAPES[r["shape"]][0][0] * SHAPES[r["shape"]][0][1] * SHAPES[r["shape"]][1] for r in rs) * size
                bound_ms = sum(r["ms"] * r["share_of_read"] * SHAPES[r["shape"]][1] for r in rs)
                step.append({"dtype": dtype, "shape": "step_1b", "rows": m, "method": name, "ms": ms,
                             "gb_s": nbytes / ms / 1e6, "bound_ms": bound_ms, "share_of_read": bound_ms / ms})
    for s in sorted(step, key=lambda s: (s["dtype"], s["rows"], s["method"])):
        print(f"{s['dtype']:9s} 1B step  M={s['rows']:<2d} {s['method']:20s} {s['ms']:8.2f} ms "
              f"(bound {s['bound_ms']:.2f} ms, {100 * s['share_of_read']:.1f}%)", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"linear_bound_{meta['cpu_level']}{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": records, "step_1b": step}, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        cols = ["dtype", "shape", "rows", "method", "ms", "gb_s", "read_gb_s", "share_of_read"]
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(records + step)
    print(f"wrote {out / stem}.json/.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
