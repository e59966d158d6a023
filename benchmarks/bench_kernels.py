"""Kernel microbenchmarks: each op, each backend available here, against the natural PyTorch
baseline in the same run.

  tree_attention  vs SDPA with a dense boolean mask (prefix + tree), GQA via enable_gqa, and
                  at N = 1 vs SDPA's plain decode (no mask)
  tree_attention_window
                  tree_attention with a sliding window (window=; windows shorter and longer than
                  the prefix) vs SDPA with the dense boolean mask of the same window (prefix rows
                  and ancestors within `window` positions); not in the default --ops
  tree_attention_features
                  tree_attention with a logit soft-cap and/or attention sinks vs the eager PyTorch
                  attention transformers runs for them (matmul, tanh, mask, softmax with the sink
                  column, matmul), and our kernel without them (the features' cost); not in the
                  default --ops
  draft_attention vs SDPA with the dense ParallelSpec mask (real causal + mask slots)
  tree_accept     vs the Python walk (the reference)
  skinny_linear   vs torch's F.linear, few rows (1..32) on SmolLM2 / Llama-8B layer shapes
                  (one weight, re-read every call: the SmolLM2 layer matrices stay in L3, the
                  LM head and the 4096 x 4096 one stream from memory as in a real model step)
                  and on all of SmolLM2's weights in turn (its verify pass: 540 MB fp32)
  kv_rollback     see bench_kv_rollback.py

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--dtype float32] [--quick]
                                       [--cpu-capability all|avx2,avx512|...] [--ops ...] [--name ...]

--cpu-capability runs the native CPU kernels compiled per capability level (skinny_linear and the
attention core) once per level named, side by side in the same run (columns cpu-<level>; each
call includes the ~3 us level switch); without it, the level chosen automatically (column cpu).
The JSON's meta records the CPU model and the capability levels.

Each attention row also reports GFLOP/s and `gemm_bound_speedup`: the machine's dense GEMM rate
(measured in the same run, same dtype) over the baseline's rate, i.e. the most any kernel that
does the same FLOPs at GEMM speed could gain over it.

Writes benchmarks/results/<name>[_<dtype>].{json,csv,png} (no suffix for float32; --name, default
kernels_<device>: a run of some ops only should name its own file). The windowed benchmark at
every level, fp32 and bf16:

    python benchmarks/bench_kernels.py --ops tree_attention_window --name kernels_window_cpu --cpu-capability all \
        --quick --clock thread [--dtype bfloat16]

--clock thread times each call by the calling thread's CPU time on one thread (on a CPU shared
with other work, wall times also count the time the process waited for a core)."""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (re-exports parallelspec.tools.benchutil)

import ps_kernels  # noqa: E402
from ps_kernels import _backend  # noqa: E402
from ps_kernels import reference as ref  # noqa: E402

_BASELINES = ("sdpa_dense_mask", "sdpa_decode", "python_loop", "torch_linear", "memory_read", "torch_eager")
# ops whose native CPU kernel is compiled per capability level (csrc/cpu/level_kernels.cpp)
LEVEL_OPS = ("tree_attention", "tree_attention_window", "tree_attention_features", "draft_attention", "skinny_linear")
ATTENTION_OPS = ("tree_attention", "tree_attention_window", "tree_attention_features", "draft_attention")
HEAD_SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def random_parents(n: int, g: torch.Generator) -> torch.Tensor:
    parents = torch.full((n,), -1, dtype=torch.int64)
    for i in range(1, n):
        parents[i] = int(torch.randint(max(0, i - 8), i, (1,), generator=g))  # bushy, depth ~ log
    return parents


def attention_inputs(g, device, dtype, shape_name, batch, n, prefix):
    """q [B,Hq,n,D], new k/v [B,Hkv,n,D], a cache with room for them, lens = prefix."""
    Hq, Hkv, D = HEAD_SHAPES[shape_name]
    S = prefix + n + 8

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    lens = torch.full((batch,), prefix, dtype=torch.int64, device=device)
    return (rand(batch, Hq, n, D), rand(batch, Hkv, n, D), rand(batch, Hkv, n, D), rand(batch, Hkv, S, D),
            rand(batch, Hkv, S, D), lens)


def backend_table(op: str, device: torch.device) -> dict[str, str | None]:
    """Each backend benchmarked on this device for `op` -> None (runs) or why it is skipped
    (e.g. skinny_linear has no Triton kernel: on CUDA its baseline torch_linear is cuBLAS)."""
    names = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    return {b: _backend.why_unavailable(op, b, device) for b in names}


SKIPPED: dict[str, dict[str, str]] = {}   # op -> {backend: reason}, reported once per op


def backends_for(op: str, device: torch.device) -> list[str]:
    table = backend_table(op, device)
    for b, why in table.items():
        if why is not None and b not in SKIPPED.setdefault(op, {}):
            SKIPPED[op][b] = why
            print(f"  {op}: skipping backend {b}: {why}", file=sys.stderr)
    return [b for b, why in table.items() if why is None]


def bench_tree_attention(device, dtype, shape_name, prefix, n, batch=1):
    g = torch.Generator().manual_seed(prefix * 1000 + n)
    q, kn, vn, kc, vc, lens = attention_inputs(g, device, dtype, shape_name, batch, n, prefix)
    parents = random_parents(n, g)
    packed = ps_kernels.tree_mask_from_parents(parents).to(device)
    tree_bool = ref.unpack_tree_mask(packed, n, 1, device)[0]
    dense = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), tree_bool], 1)

    def sdpa_dense():
        kc[:, :, prefix:prefix + n] = kn
        vc[:, :, prefix:prefix + n] = vn
        return F.scaled_dot_product_attention(q, kc[:, :, :prefix + n], vc[:, :, :prefix + n],
                                              attn_mask=dense, enable_gqa=True)

    def sdpa_plain():  # the decode baseline: no mask at all
        kc[:, :, prefix:prefix + n] = kn
        vc[:, :, prefix:prefix + n] = vn
        return F.scaled_dot_product_attention(q, kc[:, :, :prefix + n], vc[:, :, :prefix + n], enable_gqa=True)

    fns = {"sdpa_dense_mask": sdpa_dense}
    if n == 1:
        fns["sdpa_decode"] = sdpa_plain
    mask = packed if n > 1 else None  # one node is a chain: no mask, as the decoding loop calls it
    for b in backends_for("tree_attention", device):
        fns[b] = (lambda b=b: ps_kernels.tree_attention(q, kn, vn, kc, vc, lens, mask, backend=b, validate=False))
    return fns


def bench_tree_attention_window(device, dtype, shape_name, prefix, n, window, batch=1):
    """A bushy tree of n nodes after a prefix; node i at position prefix + depth(i) sees the prefix
    rows and ancestors less than `window` positions behind it (the op's contract)."""
    g = torch.Generator().manual_seed(prefix * 1000 + n + window)
    q, kn, vn, kc, vc, lens = attention_inputs(g, device, dtype, shape_name, batch, n, prefix)
    packed = ps_kernels.tree_mask_from_parents(random_parents(n, g)).to(device)
    tree_bool = ref.unpack_tree_mask(packed, n, 1, device)[0]
    depth = tree_bool.sum(-1) - 1
    pos_q = prefix + depth
    pos_k = torch.cat([torch.arange(prefix, device=device), prefix + depth])
    dense = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), tree_bool], 1)
    dense &= (pos_q[:, None] - pos_k[None, :]) < window

    def sdpa_dense():
        kc[:, :, prefix:prefix + n] = kn
        vc[:, :, prefix:prefix + n] = vn
        return F.scaled_dot_product_attention(q, kc[:, :, :prefix + n], vc[:, :, :prefix + n],
                                              attn_mask=dense, enable_gqa=True)

    fns = {"sdpa_dense_mask": sdpa_dense}
    for b in backends_for("tree_attention", device):
        fns[b] = (lambda b=b: ps_kernels.tree_attention(q, kn, vn, kc, vc, lens, packed, window=window, backend=b,
                                                        validate=False))
    return fns


def bench_tree_attention_features(device, dtype, shape_name, prefix, n, softcap, sinks, batch=1):
    """Soft-cap (Gemma 2) and/or sinks (gpt-oss) on a bushy tree after a prefix. torch_eager is
    transformers' eager attention for these models: scores in the dtype, soft-cap, additive mask,
    softmax in fp32 (with the sink column), P.V in the dtype."""
    g = torch.Generator().manual_seed(prefix * 1000 + n + 7)
    q, kn, vn, kc, vc, lens = attention_inputs(g, device, dtype, shape_name, batch, n, prefix)
    Hq, Hkv, D = HEAD_SHAPES[shape_name]
    packed = ps_kernels.tree_mask_from_parents(random_parents(n, g)).to(device)
    tree_bool = ref.unpack_tree_mask(packed, n, 1, device)[0]
    allowed = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), tree_bool], 1)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    sink_logits = (torch.randn(Hq, generator=g) * 2).to(device) if sinks else None
    scale = 1.0 / math.sqrt(D)

    def torch_eager():
        kc[:, :, prefix:prefix + n] = kn
        vc[:, :, prefix:prefix + n] = vn
        keys = kc[:, :, :prefix + n].repeat_interleave(Hq // Hkv, 1)
        vals = vc[:, :, :prefix + n].repeat_interleave(Hq // Hkv, 1)
        s = (q @ keys.transpose(-1, -2)) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        s = s + additive
        if sink_logits is not None:
            col = sink_logits.view(1, Hq, 1, 1).expand(batch, Hq, n, 1).to(s.dtype)
            p = torch.softmax(torch.cat([s, col], -1).float(), -1)[..., :-1]
        else:
            p = torch.softmax(s.float(), -1)
        return p.to(dtype) @ vals

    fns = {"torch_eager": torch_eager}
    for b in backends_for("tree_attention", device):
        fns[b] = (lambda b=b: ps_kernels.tree_attention(q, kn, vn, kc, vc, lens, packed, softcap=softcap or None,
                                                        sinks=sink_logits, backend=b, validate=False))
        fns[f"{b}_plain"] = (lambda b=b: ps_kernels.tree_attention(q, kn, vn, kc, vc, lens, packed, backend=b,
                                                                   validate=False))
    return fns


def bench_draft_attention(device, dtype, shape_name, prefix, r, m, batch=1):
    T = r + m
    g = torch.Generator().manual_seed(prefix + 7 * r)
    q, kn, vn, kc, vc, lens = attention_inputs(g, device, dtype, shape_name, batch, T, prefix)
    new_lens = torch.full((batch,), r, dtype=torch.int64, device=device)
    dense = torch.zeros(T, prefix + T, dtype=torch.bool, device=device)
    dense[:, :prefix] = True
    dense[:r, prefix:prefix + r] = torch.ones(r, r, dtype=torch.bool, device=device).tril()
    dense[r:, prefix:prefix + r] = True
    dense[r:, prefix + r:] = torch.ones(m, m, dtype=torch.bool, device=device).tril()

    def sdpa_dense():
        kc[:, :, prefix:prefix + r] = kn[:, :, :r]
        vc[:, :, prefix:prefix + r] = vn[:, :, :r]
        keys = torch.cat([kc[:, :, :prefix + r], kn[:, :, r:]], 2)
        vals = torch.cat([vc[:, :, :prefix + r], vn[:, :, r:]], 2)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=dense, enable_gqa=True)

    fns = {"sdpa_dense_mask": sdpa_dense}
    for b in backends_for("draft_attention", device):
        fns[b] = (lambda b=b: ps_kernels.draft_attention(q, kn, vn, kc, vc, lens, new_lens, m, backend=b, validate=False))
    return fns


def bench_tree_accept(device, batch, n, vocab, mode):
    g = torch.Generator().manual_seed(n * 31 + batch)
    parents = random_parents(n, g).to(device)
    logits = torch.randn(batch, n, vocab, generator=g).to(device)
    tokens = torch.randint(0, vocab, (batch, n), generator=g).to(device)
    # make paths likely: each node's token is its parent's argmax with probability 1/2
    am = logits.argmax(-1)
    keep = torch.rand(batch, n, generator=g).to(device) < 0.5
    tokens[:, 1:] = torch.where(keep[:, 1:], am.gather(1, parents[1:].clamp(min=0).expand(batch, -1)), tokens[:, 1:])
    target = logits if mode == "greedy" else torch.softmax(logits, -1)
    uniforms = torch.rand(batch, n, generator=g).to(device) if mode == "sample" else None
    fns = {"python_loop": lambda: ref.tree_accept(tokens, parents, target, mode, None, uniforms)}
    for b in backends_for("tree_accept", device):
        fns[b] = (lambda b=b: ps_kernels.tree_accept(tokens, parents, target, mode=mode, uniforms=uniforms,
                                                     backend=b, validate=False))
    return fns


def attention_flops(op: str, params: dict) -> float:
    """Multiply-adds x 2 of QK^T and PV over every (query row, key row) pair a dense-mask
    kernel computes: the work SDPA does and the work our kernels do (they skip only masked
    tree nodes, a few percent)."""
    Hq, _, D = HEAD_SHAPES[params["shape_name"]]
    rows = params["n"] if op.startswith("tree_attention") else params["r"] + params["m"]
    return 4.0 * Hq * rows * (params["prefix"] + rows) * D


def gemm_gflops(device, dtype, size: int = 2048) -> float:
    """The machine's dense matmul rate in this dtype (torch's GEMM, square `size`): the
    practical ceiling for attention kernels, which are matmuls with a softmax between."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = harness.measure(lambda: a @ b, device, reps=5, min_seconds=0.2)["median_s"]
    return 2.0 * size ** 3 / t / 1e9


# (K, N) of each weight, applied in turn: single layers (their weights stay in cache between
# repeats) and SmolLM2's whole verify pass (30 layers + LM head, 540 MB fp32: every weight
# streams from memory, as in the decoding loop)
_SMOLLM2_LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
LINEAR_SHAPES = {"smollm2_mlp_up": [(576, 1536)], "smollm2_mlp_down": [(1536, 576)],
                 "smollm2_lm_head": [(576, 49152)], "llama8b_attn_o": [(4096, 4096)],
                 "smollm2_all_layers": _SMOLLM2_LAYER * 30 + [(576, 49152)]}


def bench_skinny_linear(device, dtype, shape_name, rows):
    g = torch.Generator().manual_seed(rows)
    xs = {K: torch.randn(rows, K, generator=g).to(device, dtype) for K in {K for K, _ in LINEAR_SHAPES[shape_name]}}
    ws = [(xs[K], (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)) for K, N in LINEAR_SHAPES[shape_name]]

    def torch_linear():
        for x, w in ws:
            F.linear(x, w)
    # a plain read of as many bytes as the weights: the memory rate few-row linears are bound by
    read = torch.randn(sum(w.numel() for _, w in ws) * dtype.itemsize // 4, generator=g).to(device)
    fns = {"torch_linear": torch_linear, "memory_read": read.sum}
    for b in backends_for("skinny_linear", device):
        def native(b=b):
            for x, w in ws:
                ps_kernels.skinny_linear(x, w, backend=b, validate=False)
        fns[b] = native
    return fns


def per_level(fns: dict, levels: list) -> dict:
    """fns with the native CPU backend's entry replaced by one per capability level (cpu-<level>),
    each call forcing its level; unchanged for the automatic level ([None])."""
    native = [k for k in fns if k == "cpu" or k.startswith("cpu_")]   # cpu, and variants such as cpu_plain
    if levels == [None] or not native:
        return fns
    set_level = torch.ops.ps_kernels_C._set_cpu_capability
    out = {k: v for k, v in fns.items() if k not in native}
    for level in levels:
        for key in native:
            def at_level(fn=fns[key], level=level):
                set_level(level)
                return fn()
            out[f"{key}-{level}"] = at_level
    return out


def measure_thread_time(fns: dict, *, warmup: int = 3, reps: int = 15, min_seconds: float = 0.3) -> dict:
    """measure_interleaved's rounds, each call timed by the calling thread's CPU time (--clock
    thread): on a shared machine the time the thread was descheduled does not count. Meant for
    one thread (torch.set_num_threads(1)): work on other threads would not be counted."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < reps or (time.perf_counter() - start < min_seconds and rounds < 2000):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t0)
        rounds += 1
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "reps": len(ts)} for name, ts in times.items()}


def cases(quick: bool):
    prefixes = [128, 1024, 4096] if quick else [128, 512, 1024, 2048, 4096]
    nodes = [1, 16, 64] if quick else [1, 4, 16, 64, 128]
    for shape in HEAD_SHAPES:
        for p in prefixes:
            for n in nodes:
                yield "tree_attention", dict(shape_name=shape, prefix=p, n=n)
    for shape in HEAD_SHAPES:
        for p in ([512, 2048] if quick else [512, 2048, 4096]):
            for window in (128, 4096):
                for n in (16, 64):
                    yield "tree_attention_window", dict(shape_name=shape, prefix=p, n=n, window=window)
    for shape in (["llama8b"] if quick else HEAD_SHAPES):
        for p in ([2048] if quick else [512, 2048]):
            for n in (16, 64):
                for softcap, sinks in ((50.0, False), (None, True), (30.0, True)):
                    yield "tree_attention_features", dict(shape_name=shape, prefix=p, n=n, softcap=softcap, sinks=sinks)
    for shape in HEAD_SHAPES:
        for p in ([128, 1024] if quick else [128, 1024, 4096]):
            for r in (1, 4):
                yield "draft_attention", dict(shape_name=shape, prefix=p, r=r, m=3)
    for mode in ("greedy", "sample"):
        for batch, n in ((1, 16), (8, 16), (8, 64)):
            yield "tree_accept", dict(batch=batch, n=n, vocab=49152, mode=mode)
    for shape in LINEAR_SHAPES:
        for rows in ([1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]):
            yield "skinny_linear", dict(shape_name=shape, rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ops", default="tree_attention,draft_attention,tree_accept,skinny_linear")
    ap.add_argument("--name", default=None, help="results file stem (default kernels_<device>)")
    ap.add_argument("--clock", default="wall", choices=["wall", "thread"],
                    help="wall: wall time (default); thread: the calling thread's CPU time with torch on one "
                         "thread (a shared CPU: descheduled time is not counted)")
    ap.add_argument("--cpu-capability", default=None,
                    help="native CPU kernels at these levels side by side: 'all' or e.g. 'avx2,avx512'")
    args = ap.parse_args(argv)
    levels = harness.cpu_capabilities(args.cpu_capability) if args.device == "cpu" else [None]
    if args.clock == "thread":
        if args.device != "cpu":
            ap.error("--clock thread: CPU only (a GPU's work is not the calling thread's)")
        torch.set_num_threads(1)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    wanted = set(args.ops.split(","))
    todo = [c for c in cases(args.quick or harness.quick()) if c[0] in wanted]
    rows = []
    name = (args.name or f"kernels_{device.type}") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    if device.type == "cuda":   # --device cuda:N: the current device too (raw launches use it)
        torch.cuda.set_device(device)
    gemm = gemm_gflops(device, dtype)
    print(f"GEMM ceiling ({args.dtype}): {gemm:.0f} GFLOP/s", file=sys.stderr)
    for i, (op, params) in enumerate(todo, 1):
        harness.progress(i, len(todo), f"{op} {params}")
        if op == "tree_attention":
            fns = bench_tree_attention(device, dtype, **params)
        elif op == "tree_attention_window":
            fns = bench_tree_attention_window(device, dtype, **params)
        elif op == "tree_attention_features":
            fns = bench_tree_attention_features(device, dtype, **params)
        elif op == "draft_attention":
            fns = bench_draft_attention(device, dtype, **params)
        elif op == "skinny_linear":
            fns = bench_skinny_linear(device, dtype, **params)
        else:
            fns = bench_tree_accept(device, **params)
        if op in LEVEL_OPS:
            fns = per_level(fns, levels)
        measured = measure_thread_time(fns) if args.clock == "thread" else harness.measure_interleaved(fns, device)
        times = {name: m["median_s"] for name, m in measured.items()}
        base = {"tree_accept": "python_loop", "skinny_linear": "torch_linear",
                "tree_attention_features": "torch_eager"}.get(op, "sdpa_dense_mask")
        row = {"op": op, **params, **{f"{k}_us": v * 1e6 for k, v in times.items()}}
        for k, v in times.items():
            if k in _BASELINES:
                continue
            row[f"{k}_speedup"] = times[base] / v
            if "sdpa_decode" in times:  # N = 1: against the plain decode too
                row[f"{k}_vs_decode"] = times["sdpa_decode"] / v
        if op in ATTENTION_OPS:
            flops = attention_flops(op, params)  # the dense count (what SDPA computes), windowed or not
            for k, v in times.items():
                if k != "sdpa_decode":
                    row[f"{k}_gflops"] = flops / v / 1e9
            # no kernel doing these FLOPs at the GEMM rate beats the baseline by more than this
            row["gemm_bound_speedup"] = gemm / row[f"{base}_gflops"]
        if op == "skinny_linear":  # weight bytes per call / time (what bounds few-row linears)
            weight_bytes = sum(K * N for K, N in LINEAR_SHAPES[params["shape_name"]]) * dtype.itemsize
            for k, v in times.items():
                row[f"{k}_GBps"] = weight_bytes / v / 1e9
        rows.append(row)
        print("  " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in times.items()), file=sys.stderr)
        meta = harness.machine_info(device) | {"dtype": args.dtype, "head_shapes": HEAD_SHAPES, "gemm_gflops": gemm,
                                               "skipped_backends": SKIPPED, "complete": i == len(todo),
                                               "cpu_capabilities_run": levels, "clock": args.clock}
        jpath, _ = harness.write_results(name, rows, meta)   # after every case: a killed run keeps what it measured
    if levels != [None]:
        torch.ops.ps_kernels_C._set_cpu_capability("")  # back to the automatic choice
    if not rows:
        return
    plot(rows, harness.RESULTS / f"{name}.png", meta)
    print(f"wrote {jpath}")


def plot(rows, path, meta):
    plt = harness.pyplot()
    if plt is None:
        return
    ta = [r for r in rows if r["op"] == "tree_attention"]
    shapes = sorted({r["shape_name"] for r in ta})
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for n in sorted({r["n"] for r in ta}):
            rs = sorted((r for r in ta if r["shape_name"] == shape and r["n"] == n), key=lambda r: r["prefix"])
            keys = [k for k in rs[0] if k.endswith("_speedup")]
            for k in keys:
                ax.plot([r["prefix"] for r in rs], [r[k] for r in rs], "o-", label=f"{k[:-8]} N={n}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefix length")
        ax.set_ylabel("speedup over SDPA + dense mask")
        ax.set_title(f"tree_attention {shape} {meta['dtype']}\n{meta['device']}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
