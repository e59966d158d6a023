"""Shared benchmark harness (benchmarks/*.py and `parallelspec bench`): timing (medians),
machine info, JSON/CSV writers, markdown tables.

Every benchmark compares its candidates side by side in ONE run on the same inputs and
reports medians and ratios (these machines are noisy)."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

def default_results_dir() -> Path:
    """benchmarks/results of the source checkout when running from one, else ./benchmarks/results."""
    repo = Path(__file__).resolve().parents[2] / "benchmarks"
    return (repo if repo.is_dir() else Path.cwd() / "benchmarks") / "results"


RESULTS = default_results_dir()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_flags() -> list[str]:
    """The CPU's vector instruction-set flags (/proc/cpuinfo: avx*, fma, f16c, amx*), [] elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(flag for flag in set(line.split(":", 1)[1].split())
                                  if flag.startswith(("avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    return []


def cpu_capability_info() -> dict:
    """The native CPU kernels' instruction-set levels now: active, compiled, supported (or the
    error PS_KERNELS_CPU_CAPABILITY gives)."""
    import ps_kernels
    try:
        cap = ps_kernels.cpu_capability()
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[0]}
    return {"active": cap.active, "compiled": list(cap.compiled), "supported": list(cap.supported)}


def cpu_capabilities(spec: str | None) -> list[str | None]:
    """--cpu-capability: None -> [None] (the level chosen automatically); "all" -> every level
    this machine runs, lowest first; "avx2,avx512" -> those (an error names a level this machine
    cannot run)."""
    if spec is None:
        return [None]
    import ps_kernels
    runnable = list(ps_kernels.runnable_cpu_levels())
    if spec == "all":
        return runnable
    levels = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [lv for lv in levels if lv not in runnable]
    if bad or not levels:
        raise ValueError(f"--cpu-capability: expected 'all' or levels among {runnable} (compiled and supported "
                         f"here), got {spec!r}")
    return levels


def split_level(method: str) -> tuple[str, str | None]:
    """A benchmark method's name and CPU level: "hybrid_auto@avx2" -> ("hybrid_auto", "avx2"),
    "hf_generate" -> ("hf_generate", None) (--cpu-capability runs our methods as NAME@level)."""
    name, _, level = method.partition("@")
    return name, level or None


def at_cpu_capability(level: str | None):
    """A context running the native CPU kernels at `level` (None: as chosen automatically)."""
    import contextlib
    if level is None:
        return contextlib.nullcontext()
    import ps_kernels
    return ps_kernels.force_cpu_capability(level)


def machine_info(device: torch.device) -> dict:
    import ps_kernels
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability_info(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backends": ps_kernels.backends(),
        "threads": torch.get_num_threads(),
        # torch's own kernels' instruction set, and the variables that lower it or ours (a run that
        # emulates a narrower CPU on a wide one says so)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_environment": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
    }


#: environment variables that limit the instruction set of torch's kernels (ATen, oneDNN, MKL) or ours
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "PS_KERNELS_CPU_CAPABILITY")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
            min_seconds: float = 0.2, max_reps: int = 2000) -> dict:
    """Median/min/p90 seconds of fn() over at least `reps` runs and `min_seconds` of runtime."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return _summary(times)


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_s": statistics.median(times), "min_s": times[0],
            "p90_s": times[int(0.9 * (len(times) - 1))], "reps": len(times)}


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                        reps: int = 15, min_seconds: float = 0.3, max_reps: int = 2000) -> dict[str, dict]:
    """measure() for several functions side by side: each round calls every function once, so
    slow phases of a noisy machine (other processes, clock changes) hit them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - start < min_seconds and rounds < max_reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: _summary(ts) for name, ts in times.items()}


def write_results(name: str, rows: list[dict], meta: dict, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return jpath, cpath


def progress(i: int, n: int, label: str) -> None:
    print(f"[{i}/{n}] {label}", file=sys.stderr, flush=True)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header). Floats get 3 significant digits."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (with a note) when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def quick() -> bool:
    return os.environ.get("PS_BENCH_QUICK") == "1"
