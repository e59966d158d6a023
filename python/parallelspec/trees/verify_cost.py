"""The target's verify cost on this machine: one forward over N new tokens, timed for the sizes
AutoTree chooses between, cached per model shape, dtype, device, threads and native build."""
from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import torch
import ps_kernels

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)

#: measurement blocks (of `repeats` rounds) before a curve that does not increase is given up on
_MAX_DISTURBED_BLOCKS = 3
#: seconds after which no further block is started for a disturbed curve (an oversubscribed machine
#: can make every block slow: the first block's curve, read through its envelope, is kept)
_DISTURBED_BUDGET_S = 60.0
#: a larger N may measure this much faster than a smaller one (timer noise) and still count as increasing
_MONOTONE_SLACK = 0.03


def _monotone(costs: dict[int, float]) -> bool:
    """Every size at least (1 - slack) x the time of every smaller size."""
    sizes = sorted(costs)
    return all(costs[b] >= (1 - _MONOTONE_SLACK) * costs[a] for i, a in enumerate(sizes) for b in sizes[i + 1:])


def envelope(costs: dict[int, float]) -> dict[int, float]:
    """The cost of n nodes is at most that of any larger size (a tree can be padded to it)."""
    return {n: min(c for m, c in costs.items() if m >= n) for n in costs}


_ANNOUNCED: set[str] = set()     # models whose measurement this process has announced on stderr


def measure_verify_cost(model, sizes: Sequence[int] = SIZES, prefix: int = 256, repeats: int = 7,
                        cache: bool = True) -> dict[int, float]:
    """Fastest of `repeats` timings of one target forward (LM head included) over N new tokens on a
    `prefix`-token cache, for each N in `sizes`. Cached per (model shape, dtype, device, threads, native
    library build)."""
    from ..hf.linear import native_serves
    from ..hf.target import TargetModel
    from ..models import cache_dir

    target = TargetModel(model)
    dev = target.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{torch.get_num_threads()}"
    # the linear kernel changes the curve (torch's GEMM vs the few-row kernel: parallelspec.hf.linear),
    # and so do the CPU levels our kernels (PS_KERNELS_CPU_CAPABILITY, forced levels) and torch's
    # (ATEN_CPU_CAPABILITY) run at
    cpu_level = ps_kernels.cpu_capability().active if dev.type == "cpu" else None
    level = f"-{cpu_level}-torch{torch.backends.cpu.get_cpu_capability()}" if cpu_level else ""
    linear = (f"skinny{level}-{ps_kernels.native_build_id()}" if native_serves(dev) else f"torch{level}")  # remeasured after a rebuild
    key = (f"{model.config.model_type}-L{target.num_layers}-d{target.hidden_size}-V{target.vocab_size}-"
           f"{str(target.dtype).replace('torch.', '')}-{name}-{linear}").replace(" ", "_").replace("/", "_")
    path = cache_dir() / "verify_cost" / f"{key}.json"
    if cache and path.exists():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    # a first use waits for this (~20 s for SmolLM2 on 2 CPU cores): say what it is, once per process and model
    announce = key not in _ANNOUNCED
    if announce:
        _ANNOUNCED.add(key)
        where = f"once per model and machine, saved to {path}" if cache else "not cached: cache=False"
        print(f"parallelspec: measuring the target's forward time for {min(sizes)}..{max(sizes)} tokens on this "
              f"{'GPU' if dev.type == 'cuda' else 'CPU'} to size the draft tree ({where})...",
              file=sys.stderr, flush=True)
    started = time.perf_counter()
    kv = target.new_cache(1, prefix + max(sizes) + 1)
    ids = torch.randint(0, target.vocab_size, (1, prefix + max(sizes)), device=dev)
    with torch.inference_mode(), target.attention():
        target.forward(ids[:, :prefix], torch.arange(prefix, device=dev)[None], kv, None)
        kv.lens.fill_(prefix)
        times = {n: [] for n in sizes}
        # the sizes take turns (one round = every size once; the first round warms up), so a
        # shared machine's slow and fast spells fall on all of them alike: the curve's shape,
        # which is what sizes the tree, does not depend on when each size was timed
        # a curve that does not increase with N (a forward over fewer tokens slower than one over
        # more) was measured on a busy machine: more rounds, up to a limit (a 2-core CPU shared with
        # another job measured 26.7 ms at 1 token and 24.2 at 2; the trees sized by that curve took
        # 12 nodes where a quiet curve takes 8). AutoTree also reads every curve through its
        # increasing envelope.
        for round_ in range(1 + _MAX_DISTURBED_BLOCKS * repeats):
            if round_ > repeats and (round_ - 1) % repeats == 0 and (
                    _monotone({n: min(t[1:]) for n, t in times.items()})
                    or time.perf_counter() - started > _DISTURBED_BUDGET_S):
                break
            for n in sizes:
                x = ids[:, prefix:prefix + n]
                pos = torch.arange(prefix, prefix + n, device=dev)[None]
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                target.logits(target.forward(x, pos, kv, None))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[n].append(time.perf_counter() - t0)
        # interference only ever adds time: the minimum is the cost
        costs = {n: min(t[1:]) for n, t in times.items()}
    if announce:
        print(f"parallelspec: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(costs))
    return costs
