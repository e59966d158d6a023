"""Plain decoding and prompt lookup through parallelspec's loop against transformers' generate, on
random models shaped like the small models people run on CPUs, with each run's share of the
memory-read bound.

  families  llama-3.2-1b  LlamaConfig as Llama-3.2-1B (16 layers, 2048 / 8192, 32 / 8 heads of 64,
                          vocab 128256, tied, llama3 RoPE): 1.24B parameters
            gemma-3-1b    Gemma3TextConfig as Gemma-3-1B (26 layers, 1152 / 6912, 4 / 1 heads of 256,
                          vocab 262144, tied, sliding window 512 on 5 of 6 layers, QK-norm): 1.0B
            qwen3-1.7b    Qwen3Config as Qwen3-1.7B (28 layers, 2048 / 6144, 16 / 8 heads of 128,
                          vocab 151936, tied, QK-norm): 1.7B
            phi-4-mini    Phi3Config with Phi-4-mini's layer (3072 / 8192, 24 / 8 heads of 128, fused
                          qkv and gate_up, partial rotary 0.75, vocab 200064, tied) and 8 of its 32
                          layers, so about 1B-sized: 1.4B
  methods   hf_generate (model.generate, greedy, sdpa), ps_plain (parallelspec.generate, no
            drafter), ps_ngram (prompt lookup, NgramDrafter, chain tree: the auto tree would first
            measure the model's verify cost, minutes on a shared 2-core machine); each run's tokens are
            compared with transformers' (recorded: in bf16 an argmax tie may flip on a random model).
  bound     the bytes one decoding step reads (every weight once; the embedding table once when it is
            the tied LM head, else one row) over the read rate measured in the same run
            (``buf.sum()`` over a --probe-mb fp32 buffer, all threads, best of 3, before every timed
            call); a run's share = its tokens/s over (read rate / bytes).
  order     --repeats rounds of the three methods, the order reversed every other round; medians.

    python benchmarks/bench_families.py --family llama-3.2-1b --dtypes bf16,fp32 [--new-tokens 32]
        [--repeats 3] [--threads 2] [--out benchmarks/results/families_cpu.json]

One family per process (a 1B random model in fp32 takes 5-8 GB): each run updates its entries
of the results file, which records the CPU model, flags and the native kernels' level.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import parallelspec as ps
import ps_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear_bound import read_rate  # noqa: E402  the same read-rate probe as the linears' bound

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "families_cpu.json"


def machine() -> dict:
    """The CPU model, its SIMD flags and the native kernels' levels (figures do not carry across CPUs)."""
    from parallelspec.tools.benchutil import cpu_model, simd_flags

    info = {"cpu_model": cpu_model(), "simd_flags": simd_flags()}
    cap = ps_kernels.cpu_capability()
    import transformers
    return info | {"cpu_level": cap.active, "cpu_levels_supported": list(cap.supported), "torch": torch.__version__,
                   "transformers": transformers.__version__, "native_build": ps_kernels.native_build_id()}


def _llama():
    import transformers as tf
    return tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                          max_position_embeddings=131072, rms_norm_eps=1e-5,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})


def _gemma3():
    import transformers as tf
    return tf.Gemma3TextConfig(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                               query_pre_attn_scalar=256, max_position_embeddings=32768, tie_word_embeddings=True)


def _qwen3():
    import transformers as tf
    return tf.Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                          max_position_embeddings=40960)


def _phi4_mini():
    import transformers as tf
    return tf.Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=200064, partial_rotary_factor=0.75,
                         tie_word_embeddings=True, max_position_embeddings=131072, sliding_window=262144)


FAMILIES = {"llama-3.2-1b": _llama, "gemma-3-1b": _gemma3, "qwen3-1.7b": _qwen3, "phi-4-mini": _phi4_mini}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(family: str, dtype: torch.dtype):
    """The random model, built directly in `dtype` (no fp32 copy), seeded, in eval mode."""
    import transformers as tf

    config = FAMILIES[family]()
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def step_bytes(model) -> int:
    """Bytes one decoding step reads: every parameter once, but only a row of an untied embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def prompt(vocab: int, length: int = 48) -> torch.Tensor:
    """A 16-token random phrase said three times: something for prompt lookup to find."""
    g = torch.Generator().manual_seed(1)
    phrase = torch.randint(10, vocab, (16,), generator=g)
    return phrase.repeat(length // 16)[None]


def run_one(family: str, dtype_name: str, args) -> dict:
    dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    model = build(family, dtype)
    built = time.perf_counter() - t0
    # the weights in 2 MiB pages, where generate's rule moves them once a process's calls have paid
    # for it (parallelspec/hugepages.py): every method below reads them there
    from parallelspec import hugepages
    hugepages.move(model)
    ids = prompt(model.config.vocab_size)
    n = args.new_tokens
    methods = {
        "hf_generate": lambda: (model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0), None),
        "ps_plain": lambda: ps.generate(model, ids, None, max_new_tokens=n, return_stats=True, compile=False),
        "ps_ngram": lambda: ps.generate(model, ids, ps.NgramDrafter(), max_new_tokens=n, tree="chain", compile=False,
                                        return_stats=True),
    }
    probe = torch.randn(args.probe_mb << 18)
    for name, fn in methods.items():      # first calls: thread pools, registration
        fn()
    times = {name: [] for name in methods}
    shares = {name: [] for name in methods}
    rates, outputs, stats = [], {}, {}
    nbytes = step_bytes(model)
    order = list(methods)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            rate = read_rate(probe)
            rates.append(rate)
            start = time.perf_counter()
            outputs[name], stats[name] = methods[name]()
            seconds = time.perf_counter() - start
            new = outputs[name].shape[1] - ids.shape[1]
            times[name].append(seconds / new)
            shares[name].append((new / seconds) / (rate / nbytes))
    reference = outputs["hf_generate"]
    row = {"family": family, "dtype": dtype_name, "params": sum(p.numel() for p in model.parameters()),
           "step_bytes": nbytes, "prompt_tokens": ids.shape[1], "new_tokens": n, "build_s": round(built, 1),
           "read_rate_gbs_median": statistics.median(rates) / 1e9, "methods": {}}
    for name in methods:
        tok_s = 1 / statistics.median(times[name])
        entry = {"tokens_per_s_median": tok_s, "tokens_per_s_runs": [1 / t for t in times[name]],
                 "share_of_read_bound_median": statistics.median(shares[name]),
                 "matches_hf": bool(torch.equal(outputs[name], reference))}
        if stats[name] is not None:
            entry["mean_accepted"] = stats[name].mean_accepted
        row["methods"][name] = entry
    hf = row["methods"]["hf_generate"]["tokens_per_s_median"]
    for name in methods:
        row["methods"][name]["speedup_vs_hf"] = row["methods"][name]["tokens_per_s_median"] / hf
    del model
    gc.collect()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, choices=list(FAMILIES))
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe-mb", type=int, default=512)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: expected some of {list(DTYPES)}, got {d!r}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    meta = machine() | {"threads": args.threads}
    for d in dtypes:
        row = run_one(args.family, d, args)
        row["meta"] = meta | {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "load_average_1min_after": os.getloadavg()[0],   # other processes on the cores
                              "command": "python benchmarks/bench_families.py " + " ".join(argv or sys.argv[1:])}
        results["runs"][f"{args.family}/{d}"] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        summary = {k: (round(v["tokens_per_s_median"], 2), f"{v['share_of_read_bound_median']:.0%}",
                       f"x{v['speedup_vs_hf']:.2f}", v["matches_hf"]) for k, v in row["methods"].items()}
        print(f"{args.family} {d} ({row['params'] / 1e9:.2f}B, read {row['read_rate_gbs_median']:.1f} GB/s): "
              f"{summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
