"""Regenerate the benchmark tables of benchmarks/results/README.md (the headline tables and every
row) and the one headline table of the project README from benchmarks/results/*.json.

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` markers; a table whose
JSON is missing is left as it is. The project README holds only `e2e_headline_<device>`.

    python benchmarks/update_readme.py
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (re-exports parallelspec.tools.benchutil)

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md")


def _load(name: str):
    p = harness.RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _source(meta: dict, script: str) -> str:
    cap = meta.get("cpu_capability") or {}
    # (a benchmark of kernels compiled once, for the baseline, records its level as None)
    levels = [lv for lv in meta.get("cpu_capabilities_run") or [cap.get("active")] if lv]
    where = f"CPU levels run: {', '.join(levels)} (this CPU supports {', '.join(cap.get('supported', ()))}), " if levels else ""
    if meta.get("isa_environment"):
        where += "instruction sets limited by " + " ".join(f"{k}={v}" for k, v in meta["isa_environment"].items()) + ", "
    return (f"\n\n_{meta['device']}, {where}torch {meta['torch']}, {meta.get('dtype', '')}, {meta['date'][:10]}; "
            f"`{script}`_")


def _kernels_source(meta: dict, suffix: str) -> str:
    """The footer of a bench_kernels.py table (suffix: <device> or <device>_<dtype>), with the
    command that made it."""
    device, _, dtype = suffix.partition("_")
    levels = " --cpu-capability all" if len(meta.get("cpu_capabilities_run") or ()) > 1 else ""
    return _source(meta, f"python benchmarks/bench_kernels.py --device {device}{levels}" + (f" --dtype {dtype}" if dtype else ""))


#: the end-to-end methods of the headline tables (the "every row" tables have them all), with the
#: names the project README gives them
HEADLINE_METHODS = {"hf_generate": "transformers' generate", "hf_prompt_lookup": "transformers' prompt lookup",
                    "plain_loop": "plain loop (no drafter: the kernels)", "ngram_auto": "prompt lookup",
                    "parallel_auto": "parallel drafter", "hybrid_auto": "**hybrid (the default)**"}


def table_e2e_headline(device: str):
    """The project README's table: each headline method once, ours at the highest CPU level the
    bench ran, speedup vs transformers' generate per prompt category (tok/s in brackets)."""
    data = _load(f"e2e_{device}")
    if not data:
        return None
    cats = list(dict.fromkeys(s["category"] for s in data["summary"]))
    by = {(s["method"], s["category"]): s for s in data["summary"]}
    run = list(dict.fromkeys(s["method"] for s in data["summary"]))
    levels = [lv for lv in dict.fromkeys(harness.split_level(m)[1] for m in run) if lv]
    level = (data["meta"].get("cpu_capabilities_run") or levels or [None])[-1]
    head = ["", *cats, "accepted tokens / step", "= transformers' output"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, label in HEADLINE_METHODS.items():
        m = f"{name}@{level}" if f"{name}@{level}" in run else name
        if m not in run:
            continue
        rows = [by.get((m, c)) for c in cats]
        cells = [f"{s['speedup_vs_hf']:.2f}x ({s['tokens_per_s']:.1f} tok/s)" if s and s.get("speedup_vs_hf") else "-"
                 for s in rows]
        acc = [s["mean_accepted"] for s in rows if s and s.get("mean_accepted")]
        eq = [s["equal_to_hf"].split("/") for s in rows if s and s.get("equal_to_hf") not in (None, "n/a")]
        lines.append("| " + " | ".join([label, *cells, f"{sum(acc) / len(acc):.2f}" if acc else "-",
                                        f"{sum(int(a) for a, _ in eq)}/{sum(int(b) for _, b in eq)}" if eq else "-"]) + " |")
    meta = data["meta"] | ({"cpu_capabilities_run": [level]} if level else {})
    return "\n".join(lines) + _source(meta, meta.get("command", f"parallelspec bench --device {device}"))


def table_e2e_summary(device: str):
    """Headline end-to-end table: one row per method (and CPU level), speedup vs transformers'
    generate per prompt category, tok/s in brackets."""
    data = _load(f"e2e_{device}")
    if not data:
        return None
    cats = list(dict.fromkeys(s["category"] for s in data["summary"]))
    by = {(s["method"], s["category"]): s for s in data["summary"]}
    methods, seen_hf = [], set()
    for m in dict.fromkeys(s["method"] for s in data["summary"]):
        name = harness.split_level(m)[0]
        if name in HEADLINE_METHODS and not (name.startswith("hf_") and name in seen_hf):
            methods.append(m)   # transformers' methods once (an older bench ran them per level too)
            seen_hf.add(name)
    head = ["method", "CPU level", *[f"{c}: speedup vs HF (tok/s)" for c in cats], "accepted/step", "= HF output"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        name, level = harness.split_level(m)
        cells = []
        acc, eq = [], [0, 0]
        for c in cats:
            s = by.get((m, c))
            if not s:
                cells.append("-")
                continue
            cells.append(f"{s['speedup_vs_hf']:.2f}x ({s['tokens_per_s']:.1f})" if s.get("speedup_vs_hf") else "-")
            if s.get("mean_accepted"):
                acc.append(s["mean_accepted"])
            if s.get("equal_to_hf") not in (None, "n/a"):
                a, b = s["equal_to_hf"].split("/")
                eq = [eq[0] + int(a), eq[1] + int(b)]
        lines.append("| " + " | ".join([name, "-" if name.startswith("hf_") else level or "-", *cells, f"{sum(acc) / len(acc):.2f}" if acc else "-",
                                        f"{eq[0]}/{eq[1]}" if eq[1] else "-"]) + " |")
    text = "\n".join(lines)
    levels = [lv for lv in dict.fromkeys(harness.split_level(m)[1] for m in methods) if lv]
    meta = data["meta"] | ({"cpu_capabilities_run": levels} if levels else {})
    return text + _source(meta, meta.get("command", f"parallelspec bench --device {device}"))


def table_skinny_summary(suffix: str):
    """skinny_linear over all of SmolLM2's weights (what a decoding step streams), GB/s per level
    against torch's F.linear and a plain read of the same bytes in the same run."""
    data = _load(f"kernels_{suffix}")
    if not data:
        return None
    rows = [r for r in data["rows"] if r["op"] == "skinny_linear" and r["shape_name"] == "smollm2_all_layers"]
    if not rows:
        return None
    levels = [k[len("cpu-"):-len("_GBps")] for k in rows[0] if k.startswith("cpu-") and k.endswith("_GBps")]
    head = ["rows", "torch F.linear GB/s", *[f"{lv} GB/s (% of read)" for lv in levels], "memory read GB/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        read = r.get("memory_read_GBps")
        cells = [f"{r[f'cpu-{lv}_GBps']:.1f} ({100 * r[f'cpu-{lv}_GBps'] / read:.0f}%)" if read else f"{r[f'cpu-{lv}_GBps']:.1f}"
                 for lv in levels]
        lines.append("| " + " | ".join([str(r["rows"]), f"{r['torch_linear_GBps']:.1f}", *cells,
                                        f"{read:.1f}" if read else "-"]) + " |")
    return "\n".join(lines) + _kernels_source(data["meta"], suffix)


def table_attention_summary(suffix: str):
    """tree_attention (1 / 64 nodes) and draft_attention (1 real row + masks) at SmolLM2's and
    Llama-8B's heads on a 1024-row prefix: speedup over SDPA with a dense mask, per level."""
    data = _load(f"kernels_{suffix}")
    if not data:
        return None
    rows = [r for r in data["rows"] if r.get("prefix") == 1024 and (
        (r["op"] == "tree_attention" and r["n"] in (1, 64)) or (r["op"] == "draft_attention" and r["r"] == 1))]
    if not rows:
        return None
    levels = list(dict.fromkeys(k[len("cpu-"):-len("_speedup")] for r in rows for k in r
                                if k.startswith("cpu-") and k.endswith("_speedup")))
    head = ["op", "heads", "queries", "SDPA (us)", *[f"{lv} (us, speedup)" for lv in levels]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = f"{r['n']} tree nodes" if r["op"] == "tree_attention" else f"{r['r']} real + {r['m']} masks"
        cells = [f"{r[f'cpu-{lv}_us']:.0f} ({r[f'cpu-{lv}_speedup']:.2f}x)" if f"cpu-{lv}_us" in r else "-" for lv in levels]
        lines.append("| " + " | ".join([r["op"], r["shape_name"], q, f"{r['sdpa_dense_mask_us']:.0f}", *cells]) + " |")
    return "\n".join(lines) + _kernels_source(data["meta"], suffix)


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
    return "\n\n".join(out) + _kernels_source(data["meta"], suffix)


def generic(name: str):
    """Tables written by other benchmarks as {"meta":..., "readme_table": "..."}."""
    data = _load(name)
    if not data or "readme_table" not in data:
        return None
    return data["readme_table"] + _source(data["meta"], data["meta"].get("command", ""))


def main():
    for page in PAGES:
        if page.exists():
            page.write_text(_fill(page.read_text()))


def _fill(text: str) -> str:
    for name in re.findall(r"<!-- table:([\w.-]+) -->", text):
        if name.startswith("e2e_headline_"):
            body = table_e2e_headline(name[len("e2e_headline_"):])
        elif name.startswith("e2e_summary_"):
            body = table_e2e_summary(name[len("e2e_summary_"):])
        elif name.startswith("skinny_summary_"):
            body = table_skinny_summary(name[len("skinny_summary_"):])
        elif name.startswith("attention_summary_"):
            body = table_attention_summary(name[len("attention_summary_"):])
        elif name.startswith("kv_rollback_"):
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
    return text


if __name__ == "__main__":
    main()
