"""kv_rollback: native kernel vs a per-layer PyTorch gather+scatter loop, against a plain copy
of the same bytes, on a SmolLM2-shaped cache (30 layers, 3 KV heads, head dim 64).

    python benchmarks/bench_kv_rollback.py [--device cpu|cuda] [--dtype float32] [--quick]
                                           [--cpu-capability all|avx2,avx512|...]

The CPU kernel is compiled once, for the baseline (a copy of rows: no instruction-set levels);
--cpu-capability still runs it with each level forced (columns native_<level>_us) so that a run
shows it, and the JSON's meta records the CPU model and the levels.

Writes benchmarks/results/kv_rollback_<device>.{json,csv,png}."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (re-exports parallelspec.tools.benchutil)

import ps_kernels  # noqa: E402


def torch_loop_rollback(kv, cache_lens, accept_index, accept_lens):
    """What a decoding loop without this op does: one gather + scatter per layer and K/V."""
    L, _, B, H, S, D = kv.shape
    A = accept_index.shape[1]
    pos = torch.arange(A, device=kv.device)
    valid = pos.unsqueeze(0) < accept_lens.unsqueeze(1)
    dst = cache_lens.unsqueeze(1) + pos
    src = torch.where(valid, cache_lens.unsqueeze(1) + accept_index, dst)  # padded slots copy onto themselves
    src = src.view(B, 1, A, 1).expand(B, H, A, D)
    dst = dst.view(B, 1, A, 1).expand(B, H, A, D)
    for layer in range(L):
        for kind in range(2):
            t = kv[layer, kind]
            t.scatter_(2, dst, torch.gather(t, 2, src))
    cache_lens += accept_lens


def make_case(B, n, tree, S, dtype, device, L=30, H=3, D=64):
    kv = torch.randn(L, 2, B, H, S, D, dtype=dtype, device=device)
    cache_lens = torch.full((B,), S // 2, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(n)
    idx = torch.stack([torch.randperm(tree, generator=g)[:n].sort().values for _ in range(B)]).to(device)
    lens = torch.full((B,), n, dtype=torch.int64, device=device)
    return kv, cache_lens, idx, lens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (CI smoke run)")
    ap.add_argument("--cpu-capability", default=None,
                    help="also time the native CPU kernel with these levels forced: 'all' or e.g. 'avx2,avx512'")
    args = ap.parse_args(argv)
    levels = harness.cpu_capabilities(args.cpu_capability) if args.device == "cpu" else [None]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    native = "cuda" if device.type == "cuda" else "cpu"
    batches = [1, 8]
    accepted = [1, 4, 16] if (args.quick or harness.quick()) else [1, 2, 4, 8, 12, 16]
    rows = []
    cases = [(B, n) for B in batches for n in accepted]
    for i, (B, n) in enumerate(cases, 1):
        harness.progress(i, len(cases), f"batch {B}, accepted {n}")
        kv, lens, idx, alens = make_case(B, n, tree=32, S=512, dtype=dtype, device=device)
        lens0 = lens.clone()

        def run_native():
            lens.copy_(lens0)
            ps_kernels.kv_rollback(kv, lens, idx, alens, backend=native, validate=False)

        def run_torch():
            lens.copy_(lens0)
            torch_loop_rollback(kv, lens, idx, alens)

        moved = kv.shape[0] * 2 * B * kv.shape[3] * n * kv.shape[5] * kv.element_size()
        src = torch.empty(moved, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t_native = harness.measure(run_native, device)
        t_torch = harness.measure(run_torch, device)
        t_copy = harness.measure(lambda: dst.copy_(src), device)
        per_level = {}
        for level in levels if levels != [None] else []:
            with harness.at_cpu_capability(level):
                per_level[f"native_{level}_us"] = harness.measure(run_native, device)["median_s"] * 1e6
        rows.append({
            "batch": B, "accepted": n, "bytes_moved": moved,
            "native_us": t_native["median_s"] * 1e6, "torch_loop_us": t_torch["median_s"] * 1e6,
            "memcpy_us": t_copy["median_s"] * 1e6,
            "speedup_vs_torch_loop": t_torch["median_s"] / t_native["median_s"],
            "native_GBps": moved / t_native["median_s"] / 1e9,
            "memcpy_GBps": moved / t_copy["median_s"] / 1e9, **per_level,
        })
        print(f"  native {rows[-1]['native_us']:.1f} us, torch loop {rows[-1]['torch_loop_us']:.1f} us "
              f"({rows[-1]['speedup_vs_torch_loop']:.1f}x), memcpy of the same bytes {rows[-1]['memcpy_us']:.1f} us",
              file=sys.stderr)
    meta = harness.machine_info(device) | {"dtype": args.dtype, "shape": "L=30, H_kv=3, D=64, S=512, tree=32",
                                           "native_backend": native, "cpu_capabilities_run": levels}
    name = f"kv_rollback_{device.type}"
    jpath, _ = harness.write_results(name, rows, meta)
    plot(rows, harness.RESULTS / f"{name}.png", meta)
    print(harness.markdown_table(rows, [("batch", "batch"), ("accepted", "accepted rows"),
                                        ("native_us", f"{native} (us)"), ("torch_loop_us", "PyTorch loop (us)"),
                                        ("speedup_vs_torch_loop", "speedup"), ("native_GBps", f"{native} GB/s"),
                                        ("memcpy_GBps", "memcpy GB/s")]))
    print(f"wrote {jpath}")


def plot(rows, path, meta):
    plt = harness.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for B in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == B]
        ax.plot([r["accepted"] for r in rs], [r["native_us"] for r in rs], "o-", label=f"{meta['native_backend']} B={B}")
        ax.plot([r["accepted"] for r in rs], [r["torch_loop_us"] for r in rs], "s--", label=f"PyTorch loop B={B}")
        ax.plot([r["accepted"] for r in rs], [r["memcpy_us"] for r in rs], ":", label=f"memcpy same bytes B={B}")
    ax.set_xlabel("accepted rows per sequence")
    ax.set_ylabel("median time (us)")
    ax.set_yscale("log")
    ax.set_title(f"kv_rollback, 30 layers, {meta['dtype']}\n{meta['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
