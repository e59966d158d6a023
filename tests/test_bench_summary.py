"""The end-to-end benchmark's summary (parallelspec.tools.bench) and aims (benchmarks/bench_e2e.py): medians per method and
category, ratios against the right baseline, end to end and for the decode phase alone."""
import sys
from pathlib import Path

import pytest

from parallelspec.tools.bench import _summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_e2e import aims as _aims  # noqa: E402


def _row(cat, prompt, method, tps, decode=None, acc=None):
    return {"category": cat, "prompt": prompt, "method": method, "tokens_per_s": tps, "decode_tokens_per_s": decode,
            "mean_accepted": acc, "equal_to_hf": True}


def test_summary_medians_and_aims():
    rows = []
    for p, (hf, pl, ng, ngd, par, pard, hy, hyd) in enumerate([(10, 9, 20, 40, 22, 30, 24, 48),
                                                                (12, 11, 21, 42, 25, 33, 27, 50),
                                                                (11, 10, 19, 41, 23, 31, 25, 49)]):
        rows += [_row("long", p, "hf_generate", hf), _row("long", p, "hf_prompt_lookup", pl),
                 _row("long", p, "ngram_auto", ng, ngd, 3.0), _row("long", p, "parallel_auto", par, pard, 1.7),
                 _row("long", p, "hybrid_auto", hy, hyd, 4.0)]
    summary = _summary(rows, ["hf_generate", "hf_prompt_lookup", "ngram_auto", "parallel_auto", "hybrid_auto"], ["long"])
    got = {s["method"]: s for s in summary}
    assert got["hybrid_auto"]["tokens_per_s"] == 25 and got["hybrid_auto"]["decode_tokens_per_s"] == 49
    assert got["hf_generate"]["decode_tokens_per_s"] is None
    assert got["parallel_auto"]["speedup_vs_hf"] == pytest.approx(23 / 11)   # median of per-prompt ratios
    aims = {a["aim"]: a for a in _aims(summary)}
    single = aims["hybrid >= 1.15x best single drafter of ours"]
    assert (single["b"], single["measured"]) == ("parallel_auto", pytest.approx(25 / 23))   # fastest end to end
    decode = aims["(decode phase) hybrid >= 1.15x best single of ours"]
    assert (decode["b"], decode["measured"]) == ("ngram_auto", pytest.approx(49 / 41))     # fastest decode
    assert decode["met"] and not single["met"]
    assert aims["hybrid >= 1.3x HF prompt lookup"]["measured"] == pytest.approx(25 / 10)


def test_aims_per_cpu_level():
    """With --cpu-capability our methods are NAME@level and transformers' run once: each level gets
    its own aims, every one measured against the same HF rows and its own level's methods only."""
    rows = []
    for p, (hf, plain2, hyb2, plain5, hyb5) in enumerate([(10, 21, 31, 22, 36), (12, 23, 35, 26, 40), (11, 22, 33, 24, 38)]):
        rows += [_row("chat", p, "hf_generate", hf), _row("chat", p, "plain_loop@avx2", plain2, 25, 1.0),
                 _row("chat", p, "hybrid_auto@avx2", hyb2, 40, 2.0), _row("chat", p, "plain_loop@avx512", plain5, 27, 1.0),
                 _row("chat", p, "hybrid_auto@avx512", hyb5, 45, 2.0)]
    methods = ["hf_generate", "plain_loop@avx2", "hybrid_auto@avx2", "plain_loop@avx512", "hybrid_auto@avx512"]
    aims = {(a["level"], a["aim"]): a for a in _aims(_summary(rows, methods, ["chat"]))}
    assert {level for level, _ in aims} == {"avx2", "avx512"}
    plain = aims[("avx2", "plain loop >= 2x HF generate")]
    assert (plain["a"], plain["b"], plain["measured"]) == ("plain_loop@avx2", "hf_generate", pytest.approx(22 / 11))
    assert plain["met"]
    hybrid = aims[("avx512", "hybrid >= 3x HF generate")]
    assert (hybrid["a"], hybrid["measured"]) == ("hybrid_auto@avx512", pytest.approx(38 / 11))
    assert aims[("avx2", "hybrid >= 3x HF generate")]["measured"] == pytest.approx(33 / 11)


def test_paired_ratio_pools_runs_prompt_by_prompt():
    """benchmarks/paired_ratio.py pairs the two methods on the same prompt of the same run (a
    per-run slowdown of both cancels) and pools the pairs of every run; a differing output refuses."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paired_ratio as mod
    # run 2 is a loaded machine: both methods at half speed, the per-prompt ratios unchanged
    run1 = {"rows": [_row("code", 0, "a", 40, acc=2.0), _row("code", 0, "b", 50, acc=2.2),
                     _row("code", 1, "a", 60, acc=1.8), _row("code", 1, "b", 48, acc=1.6),
                     _row("chat", 0, "a", 30, acc=1.5)]}           # no b on chat: no pair
    run2 = {"rows": [_row("code", 0, "a", 20, acc=2.0), _row("code", 0, "b", 25, acc=2.2)]}
    (res,) = mod.paired([run1, run2], "a", "b")
    assert res["category"] == "code" and res["pairs"] == 3
    assert res["geomean_ratio"] == pytest.approx((0.8 * 1.25 * 0.8) ** (1 / 3))
    assert res["median_ratio"] == pytest.approx(0.8) and res["max_ratio"] == pytest.approx(1.25)
    assert res["accepted_a"] == pytest.approx((2.0 + 1.8 + 2.0) / 3)
    run2["rows"][0]["equal_to_hf"] = False
    with pytest.raises(ValueError, match="differs from transformers'"):
        mod.paired([run1, run2], "a", "b")
    with pytest.raises(ValueError, match="no prompt has both"):
        mod.paired([run1], "a", "c")


def _update_readme():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import update_readme
    return update_readme


def test_readme_headline_table(monkeypatch):
    """The project README's one table (update_readme.py): each headline method once, ours at the
    highest CPU level the bench ran, transformers' from its single run; methods not run are left out."""
    ur = _update_readme()

    def s(method, cat, speedup, tps, acc=None):
        return {"method": method, "category": cat, "speedup_vs_hf": speedup, "tokens_per_s": tps,
                "mean_accepted": acc, "equal_to_hf": "4/4"}
    summary = [s("hf_generate", c, 1.0, 10.0) for c in ("chat", "long")]
    for level, k in (("avx2", 1.0), ("avx512", 1.5)):
        summary += [s(f"plain_loop@{level}", "chat", 1.8 * k, 18.0 * k, 1.0), s(f"plain_loop@{level}", "long", 1.6 * k, 16.0 * k, 1.0),
                    s(f"hybrid_auto@{level}", "chat", 3.0 * k, 30.0 * k, 2.0), s(f"hybrid_auto@{level}", "long", 4.0 * k, 40.0 * k, 4.0)]
    meta = {"device": "Some CPU (2 threads)", "torch": "2.13.0+cpu", "dtype": "float32", "date": "2030-01-02T03:04:05",
            "cpu_capabilities_run": ["avx2", "avx512"], "cpu_capability": {"supported": ["default", "avx2", "avx512"]},
            "command": "parallelspec bench X"}
    monkeypatch.setattr(ur, "_load", lambda name: {"summary": summary, "meta": meta} if name == "e2e_cpu" else None)
    page = "intro\n<!-- table:e2e_headline_cpu -->\nold\n<!-- /table:e2e_headline_cpu -->\nend\n"
    text = ur._fill(page)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "|  | chat | long | accepted tokens / step | = transformers' output |"
    assert rows[1:] == [
        "| transformers' generate | 1.00x (10.0 tok/s) | 1.00x (10.0 tok/s) | - | 8/8 |",
        "| plain loop (no drafter: the kernels) | 2.70x (27.0 tok/s) | 2.40x (24.0 tok/s) | 1.00 | 8/8 |",
        "| **hybrid (the default)** | 4.50x (45.0 tok/s) | 6.00x (60.0 tok/s) | 3.00 | 8/8 |"]
    assert "_Some CPU (2 threads), CPU levels run: avx512 (this CPU supports default, avx2, avx512)" in text
    assert "2030-01-02; `parallelspec bench X`_" in text
    assert text.startswith("intro\n") and text.endswith("<!-- /table:e2e_headline_cpu -->\nend\n") and "old" not in text


def test_table_footer_without_a_level():
    """A benchmark of kernels compiled once records its level as None: the footer names none."""
    ur = _update_readme()
    meta = {"device": "Some CPU (2 threads)", "torch": "2.13.0+cpu", "dtype": "float32", "date": "2030-01-02T03",
            "cpu_capabilities_run": [None], "cpu_capability": {"active": "avx2", "supported": ["default", "avx2"]}}
    assert ur._source(meta, "cmd") == "\n\n_Some CPU (2 threads), torch 2.13.0+cpu, float32, 2030-01-02; `cmd`_"
