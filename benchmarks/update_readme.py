"""Regenerate the benchmark tables in README.md from benchmarks/results/*.json.

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` markers; a table whose
JSON is missing is left as it is.

    python benchmarks/update_readme.py
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (re-exports parallelspec.benchutil)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _load(name: str):
    p = harness.RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _source(meta: dict, script: str) -> str:
    return f"\n\n_{meta['device']}, torch {meta['torch']}, {meta.get('dtype', '')}, {meta['date'][:10]}; `{script}`_"


def table_kv_rollback(device: str):
    data = _load(f"kv_rollback_{device}")
    if not data:
        return None
    nb = data["meta"]["native_backend"]
    cols = [("batch", "batch"), ("accepted", "accepted rows"), ("native_us", f"{nb} kernel (us)"),
            ("torch_loop_us", "PyTorch per-layer loop (us)"), ("speedup_vs_torch_loop", "speedup"),
            ("native_GBps", f"{nb} GB/s"), ("memcpy_GBps", "memcpy of same bytes GB/s")]
    return harness.markdown_table(data["rows"], cols) + _source(data["meta"], f"python benchmarks/bench_kv_rollback.py --device {device}")


def table_kernels(suffix: str):
    """suffix: <device> or <device>_<dtype> (as bench_kernels.py names its results)."""
    device, _, dtype = suffix.partition("_")
    data = _load(f"kernels_{suffix}")
    if not data:
        return None
    rows = data["rows"]
    out = []
    for op, keys in (("tree_attention", ("shape_name", "prefix", "n")), ("draft_attention", ("shape_name", "prefix", "r", "m")),
                     ("tree_accept", ("mode", "batch", "n", "vocab")), ("skinny_linear", ("shape_name", "rows"))):
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        times = list(dict.fromkeys(k for r in rs for k in r if k.endswith("_us")))
        speed = list(dict.fromkeys(k for r in rs for k in r if k.endswith(("_speedup", "_vs_decode"))
                                   and k != "gemm_bound_speedup"))
        rate = list(dict.fromkeys(k for r in rs for k in r if k.endswith("_gflops")))
        cols = [(k, k) for k in keys] + [(k, k.replace("_us", " (us)")) for k in times] + \
               [(k, k.replace("_speedup", " speedup").replace("_vs_decode", " vs plain decode")) for k in speed] + \
               [(k, k.replace("_gflops", " GFLOP/s")) for k in rate] + \
               [(k, k.replace("_GBps", " GB/s")) for k in dict.fromkeys(k for r in rs for k in r if k.endswith("_GBps"))] + \
               ([("gemm_bound_speedup", "GEMM-rate bound on speedup")] if any("gemm_bound_speedup" in r for r in rs)
                else [])
        out.append(f"**{op}**\n\n" + harness.markdown_table(rs, cols))
    gemm = data["meta"].get("gemm_gflops")
    if gemm:
        out.append(f"Dense GEMM on this machine, same run and dtype: {gemm:.0f} GFLOP/s.")
    flags = f" --dtype {dtype}" if dtype else ""
    return "\n\n".join(out) + _source(data["meta"], f"python benchmarks/bench_kernels.py --device {device}{flags}")


def generic(name: str):
    """Tables written by other benchmarks as {"meta":..., "readme_table": "..."}."""
    data = _load(name)
    if not data or "readme_table" not in data:
        return None
    return data["readme_table"] + _source(data["meta"], data["meta"].get("command", ""))


def main():
    text = README.read_text()
    for name in re.findall(r"<!-- table:([\w.-]+) -->", text):
        if name.startswith("kv_rollback_"):
            body = table_kv_rollback(name.split("_")[-1])
        elif name.startswith("kernels_"):
            body = table_kernels(name[len("kernels_"):])
        else:
            body = generic(name)
        if body is None:
            print(f"no results for table {name}; left as is", file=sys.stderr)
            continue
        text = re.sub(rf"(<!-- table:{re.escape(name)} -->).*?(<!-- /table:{re.escape(name)} -->)",
                      lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text, flags=re.S)
    README.write_text(text)


if __name__ == "__main__":
    main()
