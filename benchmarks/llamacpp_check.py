"""llama.cpp as a peer on the CPU (benchmarks/llamacpp_check.sh runs this).

Same model, weights, precision, prompts and machine: the embedded SmolLM2-135M-Instruct target,
converted to GGUF f32 and bf16 by llama.cpp's own convert_hf_to_gguf.py from the safetensors copy
the package caches, run greedy with 2 threads through llama-cpp-python (built from source with
native flags), next to our plain loop and default hybrid on the bench prompts.

Roles, two virtualenvs (llama-cpp-python and its converter live apart from the project's venv):

  prepare  (project venv) the target's safetensors directory (``models.cache_dir()``), the bench
           prompts' token ids (``bench.prompt_sets``, --prompts per category) and transformers'
           greedy fp32 outputs and tok/s, to WORK/prompts.json; with --big also a random
           Llama-3.2-1B-shaped model in bf16 (safetensors, SmolLM2's tokenizer) in WORK/llama1b-random.
  convert  (llama venv) convert_hf_to_gguf.py --outtype f32 / bf16 -> WORK/gguf/*.gguf
  llama    (llama venv) one round over the prompts per GGUF: no speculation, and prompt lookup
           (LlamaPromptLookupDecoding) -> WORK/rounds/llama-<n>.json
  ours     (project venv) one round: plain loop and default hybrid (``bench.build_methods``'
           plain_loop / hybrid_auto), and --compiled methods again with generate(compile=True)
           (warmed up over every prompt first: the compile, or its load from the cache, is not
           timed; its seconds are recorded), in fp32 and bf16 -> WORK/rounds/ours-<n>.json
  big      (project venv) the 1B-shaped model only, the engines interleaved in one process: per
           repeat (the order rotated) llama.cpp's llama-bench (the same build tree and flags; decode
           of --new-tokens after the prompt's length as depth), our plain loop and transformers'
           generate, each on the same prompt; ratios per repeat (the same minutes of a shared
           machine), then medians -> OUT/<--name>.json
  report   (either) every round merged: medians per engine / dtype, ratios, the machine, the build
           -> OUT/llamacpp_<cpu level>.json

Rounds alternate llama and ours processes (llamacpp_check.sh), so machine noise (shared cores)
hits both alike; per round the median over prompts, then the median over rounds.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Llama-3.2-1B's shape (random weights: only the decode speed is measured on it)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
GGUF_TYPES = ("f32", "bf16")
DTYPE_OF = {"f32": "float32", "bf16": "bfloat16"}


def cpu_info() -> dict:
    info = {"cpu_model": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))
                break
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    return info


def _pkg(name: str):
    """parallelspec's tool modules (bench, models) wherever this checkout keeps them."""
    for mod in (f"parallelspec.tools.{name}", f"parallelspec.{name}"):
        try:
            return importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if not exc.name or not mod.startswith(exc.name):
                raise
    raise ModuleNotFoundError(f"parallelspec: no module {name} under tools/ or the package root")


# --- prepare (project venv) ------------------------------------------------------------------

def prepare(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models, bench = _pkg("models"), _pkg("bench")
    existing = work / "prompts.json"
    if existing.exists():   # the prompts and transformers' reference are kept; --big only adds the model
        data = json.loads(existing.read_text())
        if args.big and "big_dir" not in data["meta"]:
            target_dir = models.cache_dir() / models.DEFAULT_TARGET
            data["meta"]["big_dir"] = str(make_big(work / "llama1b-random", target_dir))
            existing.write_text(json.dumps(data))
        print(f"kept {existing} ({len(data['prompts'])} prompts; delete it to redo them)")
        return
    model, tok = models.load_default_target(torch.float32)
    target_dir = models.cache_dir() / models.DEFAULT_TARGET
    prompts = []
    for cat, items in bench.prompt_sets(tok, args.prompts).items():
        for i, ids in enumerate(items):
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
            wall = time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            prompts.append({"category": cat, "index": i, "ids": ids[0].tolist(), "hf_output": new,
                            "hf_tokens_per_s": len(new) / wall})
            print(f"{cat} {i}: {ids.shape[1]} prompt tokens, transformers {len(new) / wall:.1f} tok/s", flush=True)
    import ps_kernels
    meta = {"target_dir": str(target_dir), "max_new_tokens": args.max_new_tokens, "prompts_per_category": args.prompts,
            "threads": args.threads, "torch": torch.__version__, "cpu_level": ps_kernels.cpu_capability().active}
    if args.big:
        meta["big_dir"] = str(make_big(work / "llama1b-random", target_dir))
    (work / "prompts.json").write_text(json.dumps({"meta": meta, "prompts": prompts}))
    print(f"wrote {work / 'prompts.json'}: {len(prompts)} prompts")


def make_big(out: Path, tokenizer_dir: Path) -> Path:
    """A Llama-3.2-1B-shaped model with random weights (std 0.02, seed 0), bf16 safetensors."""
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_1B, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    print(f"random 1B-shaped model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params in {out}")
    return out


# --- convert (llama venv) ----------------------------------------------------------------------

def convert(args) -> None:
    work = Path(args.work)
    meta = json.loads((work / "prompts.json").read_text())["meta"]
    converter = Path(args.converter)
    (work / "gguf").mkdir(exist_ok=True)
    jobs = [(Path(meta["target_dir"]), f"smollm2-135m-{t}", t) for t in GGUF_TYPES]
    if "big_dir" in meta:
        jobs.append((Path(meta["big_dir"]), "llama1b-random-bf16", "bf16"))
    for src, name, outtype in jobs:
        dst = work / "gguf" / f"{name}.gguf"
        if dst.exists():
            continue
        cmd = [sys.executable, str(converter), str(src), "--outtype", outtype, "--outfile", str(dst)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


# --- llama (llama venv) --------------------------------------------------------------------------

def _perf(llm):
    import llama_cpp
    p = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return {"prompt_ms": p.t_p_eval_ms, "prompt_tokens": p.n_p_eval, "eval_ms": p.t_eval_ms, "eval_tokens": p.n_eval}


def _llama_generate(llm, ids: list[int], new: int):
    """Greedy: `new` tokens after `ids` (no EOS stop: every method makes the same count), wall s, perf."""
    import llama_cpp
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    out = []
    t0 = time.perf_counter()
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) >= new:
            break
    return out, time.perf_counter() - t0, _perf(llm)


def llama(args) -> None:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    work = Path(args.work)
    data = json.loads((work / "prompts.json").read_text())
    prompts, new = data["prompts"], data["meta"]["max_new_tokens"]
    rows = []
    common = dict(n_threads=args.threads, n_threads_batch=args.threads, n_ctx=args.n_ctx, n_batch=512, verbose=False)
    variants = [("none", {})]
    if args.lookup:
        # draft_model needs logits_all=True: Llama.__init__ forces _logits_all for a draft model but
        # sizes its scores buffer from the logits_all argument (n_batch rows when False), so eval()
        # writes logits past it once n_past > n_batch (a logits shape error).
        variants.append(("prompt_lookup", {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=10),
                                           "logits_all": True}))
    for gtype in ([] if args.big_only else GGUF_TYPES):
        path = work / "gguf" / f"smollm2-135m-{gtype}.gguf"
        for spec, extra in variants:
            llm = Llama(str(path), **common, **extra)
            _llama_generate(llm, prompts[0]["ids"][:16], 4)   # warm-up
            for p in prompts:
                try:
                    out, wall, perf = _llama_generate(llm, p["ids"], new)
                except Exception as exc:  # noqa: BLE001  (recorded: what works and what does not)
                    rows.append({"engine": "llama.cpp", "gguf": gtype, "speculation": spec, "category": p["category"],
                                 "prompt": p["index"], "error": f"{type(exc).__name__}: {exc}"})
                    print(f"llama.cpp {gtype} {spec}: {type(exc).__name__}: {exc}", flush=True)
                    break
                ref = p["hf_output"]
                agree = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
                rows.append({"engine": "llama.cpp", "gguf": gtype, "dtype": DTYPE_OF[gtype], "speculation": spec,
                             "category": p["category"], "prompt": p["index"], "new_tokens": len(out), "seconds": wall,
                             "tokens_per_s": len(out) / wall,
                             "decode_tokens_per_s": perf["eval_tokens"] / perf["eval_ms"] * 1e3 if perf["eval_ms"] else None,
                             "perf": perf, "agree_with_hf_fp32": agree})
                print(f"llama.cpp {gtype:4s} {spec:13s} {p['category']:5s} {p['index']} {len(out) / wall:6.1f} tok/s "
                      f"(agrees with HF fp32 for {agree} tokens)", flush=True)
            del llm
    if "big_dir" in data["meta"] and (args.big or args.big_only):
        path = work / "gguf" / "llama1b-random-bf16.gguf"
        llm = Llama(str(path), **common)
        _llama_generate(llm, prompts[0]["ids"][:16], 4)
        for rep in range(args.big_repeats):
            out, wall, perf = _llama_generate(llm, prompts[0]["ids"], new)
            rows.append({"engine": "llama.cpp", "gguf": "bf16", "dtype": "bfloat16", "model": "llama1b-random",
                         "speculation": "none", "repeat": rep, "new_tokens": len(out), "seconds": wall,
                         "tokens_per_s": len(out) / wall, "perf": perf,
                         "decode_tokens_per_s": perf["eval_tokens"] / perf["eval_ms"] * 1e3})
            print(f"llama.cpp 1B-shaped bf16: decode {rows[-1]['decode_tokens_per_s']:.2f} tok/s", flush=True)
        del llm
    build = {"llama_cpp_python": llama_cpp.__version__,
             "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
             "cmake_args": os.environ.get("CMAKE_ARGS", "")}
    _write_round(work, "llama", args.round, {"build": build, "rows": rows, "threads": args.threads})


def _write_round(work: Path, who: str, n: int, payload: dict) -> None:
    (work / "rounds").mkdir(exist_ok=True)
    path = work / "rounds" / f"{who}-{n}.json"
    path.write_text(json.dumps(payload | {"cpu": cpu_info(), "time": time.time()}, indent=1))
    print(f"wrote {path}")


# --- ours (project venv) -------------------------------------------------------------------------

def ours(args) -> None:
    import torch

    import ps_kernels
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = json.loads((work / "prompts.json").read_text())
    prompts, new = data["prompts"], data["meta"]["max_new_tokens"]
    models, bench = _pkg("models"), _pkg("bench")
    names = args.methods.split(",")
    rows = []
    compile_seconds = {}
    for dtype in ([] if args.big_only else (torch.float32, torch.bfloat16)):
        model, tok = models.load_default_target(dtype)
        methods = bench.build_methods(model, names, args.max_nodes)
        for name in [n for n in args.compiled.split(",") if n]:   # the same method, its verify step compiled
            methods[f"{name}+compiled"] = functools.partial(methods[name], compile=True)
        warm = torch.tensor([prompts[0]["ids"][:16]])
        for name, fn in methods.items():
            fn(warm, max_new_tokens=4, do_sample=False)
            if name.endswith("+compiled"):  # every shape the prompts reach compiled (or loaded) before timing
                t0 = time.perf_counter()
                for p in prompts:
                    ids = torch.tensor([p["ids"]])
                    fn(ids, torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None)
                compile_seconds[f"{name} {str(dtype).removeprefix('torch.')}"] = time.perf_counter() - t0
                print(f"ours {name}: warm-up over the prompts (compiling or loading) {time.perf_counter() - t0:.0f} s",
                      flush=True)
        for p in prompts:
            ids = torch.tensor([p["ids"]])
            for name, fn in methods.items():
                t0 = time.perf_counter()
                # no EOS stop, as on llama.cpp's side: every method makes the same number of tokens. The
                # mask is given, as for the reference: without one and with eos_token_id=None,
                # transformers' convention (which generate follows) masks the prompt's pad-id tokens
                # (SmolLM2's <|im_end|> is its pad id), and the outputs differ from the reference's
                out, stats = fn(ids, torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None)
                wall = time.perf_counter() - t0
                gen = out[0, ids.shape[1]:].tolist()
                ref = p["hf_output"]
                agree = next((i for i, (a, b) in enumerate(zip(gen, ref)) if a != b), min(len(gen), len(ref)))
                decode = stats.total_time - stats.prefill_time
                rows.append({"engine": "ours", "method": name, "dtype": str(dtype).removeprefix("torch."),
                             "category": p["category"], "prompt": p["index"], "new_tokens": len(gen), "seconds": wall,
                             "tokens_per_s": len(gen) / wall, "mean_accepted": stats.mean_accepted,
                             "decode_tokens_per_s": (len(gen) - 1) / decode if decode > 0 else None,
                             "agree_with_hf_fp32": agree})
                print(f"ours {rows[-1]['dtype']:8s} {name:11s} {p['category']:5s} {p['index']} "
                      f"{len(gen) / wall:6.1f} tok/s (agrees with HF fp32 for {agree} tokens)", flush=True)
        del model, methods
    if "big_dir" in data["meta"] and (args.big or args.big_only):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(data["meta"]["big_dir"], dtype=torch.bfloat16)
        model.generation_config.eos_token_id = None
        plain = bench.build_methods(model, ["plain_loop"], args.max_nodes)["plain_loop"]
        ids = torch.tensor([prompts[0]["ids"]])
        plain(ids[:, :16], max_new_tokens=4, do_sample=False)
        mask = torch.ones_like(ids)
        hf_new = args.big_hf_new_tokens or new
        for rep in range(args.big_repeats):
            t0 = time.perf_counter()
            out, stats = plain(ids, max_new_tokens=new, do_sample=False, eos_token_id=None)
            wall = time.perf_counter() - t0
            n = out.shape[1] - ids.shape[1]
            decode = stats.total_time - stats.prefill_time
            rows.append({"engine": "ours", "method": "plain_loop", "dtype": "bfloat16", "model": "llama1b-random",
                         "repeat": rep, "new_tokens": n, "seconds": wall, "tokens_per_s": n / wall,
                         "decode_tokens_per_s": (n - 1) / decode})
            print(f"ours 1B-shaped bf16 plain loop: decode {rows[-1]['decode_tokens_per_s']:.2f} tok/s", flush=True)
            if args.big_hf:
                # transformers' greedy generate; its decode rate = (n - 1) / (wall - a 1-token generate's wall)
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=mask, max_new_tokens=hf_new, min_new_tokens=hf_new,
                                     do_sample=False)
                wall = time.perf_counter() - t0
                n = out.shape[1] - ids.shape[1]
                rows.append({"engine": "transformers", "method": "generate", "dtype": "bfloat16",
                             "model": "llama1b-random", "repeat": rep, "new_tokens": n, "seconds": wall,
                             "tokens_per_s": n / wall, "first_token_seconds": first,
                             "decode_tokens_per_s": (n - 1) / (wall - first) if wall > first else None})
                print(f"transformers 1B-shaped bf16 generate: decode {rows[-1]['decode_tokens_per_s']:.2f} tok/s",
                      flush=True)
        del model
    cap = ps_kernels.cpu_capability()
    _write_round(work, "ours", args.round, {"rows": rows, "cpu_level": cap.active, "torch": torch.__version__,
                                            "native_build": ps_kernels.native_build_id(), "threads": args.threads,
                                            "compiled_warm_up_seconds": compile_seconds})


# --- big (project venv): the 1B-shaped model, engines interleaved --------------------------------

CMAKE_KEYS = ("CMAKE_BUILD_TYPE", "CMAKE_C_FLAGS", "GGML_NATIVE", "GGML_OPENMP", "GGML_OPENMP_ENABLED", "GGML_LLAMAFILE",
              "GGML_CPU_REPACK", "GGML_CPU_ALL_VARIANTS", "GGML_BACKEND_DL", "GGML_AVAILABLE_BACKENDS")


def _cmake_flags(build: Path) -> dict:
    """The CPU-relevant entries of llama.cpp's CMakeCache (the build's flags: native, OpenMP, the
    instruction sets, llamafile's sgemm, weight repacking, the build type)."""
    flags = {}
    try:
        for line in (build / "CMakeCache.txt").read_text().splitlines():
            name, _, value = line.partition("=")
            key = name.split(":")[0]
            if key in CMAKE_KEYS or key.startswith(("GGML_AVX", "GGML_AMX", "GGML_FMA", "GGML_F16C", "GGML_BMI")):
                flags[key] = value
    except OSError:
        pass
    return flags


def _llama_system_info(python: str) -> str | None:
    """llama.cpp's compiled-in CPU features, through llama-cpp-python of the same build tree."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode(errors='replace').strip())"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def big(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import ps_kernels
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = json.loads((work / "prompts.json").read_text())
    if "big_dir" not in data["meta"]:
        raise SystemExit(f"big: no 1B-shaped model in {work / 'prompts.json'} (run prepare --big first)")
    gguf = work / "gguf" / "llama1b-random-bf16.gguf"
    llama_bench = Path(args.llama_bench)
    for path, what in ((gguf, "the GGUF (run convert)"), (llama_bench, "llama-bench (llamacpp_check.sh venv)")):
        if not path.exists():
            raise SystemExit(f"big: expected {what} at {path}, found nothing")
    bench = _pkg("bench")
    new = args.new_tokens
    ids = torch.tensor([data["prompts"][0]["ids"]])
    mask = torch.ones_like(ids)
    model = AutoModelForCausalLM.from_pretrained(data["meta"]["big_dir"], dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    plain = bench.build_methods(model, ["plain_loop"], 32)["plain_loop"]
    plain(ids[:, :16], max_new_tokens=4, do_sample=False)   # warm-up (the bf16 packing, the first calls)
    model.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=2, do_sample=False)

    def run_llama():
        cmd = [str(llama_bench), "-m", str(gguf), "-p", "0", "-n", str(new), "-d", str(ids.shape[1]),
               "-t", str(args.threads), "-r", "1", "-o", "json"]
        res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[0]
        run_llama.info = {k: res.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                                  "model_size", "type_k", "type_v", "flash_attn", "n_threads",
                                                  "poll", "use_mmap")}
        return {"decode_tokens_per_s": res["avg_ts"], "new_tokens": res["n_gen"], "depth": res.get("n_depth")}

    def run_ours(**kw):
        out, stats = plain(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, **kw)
        n = out.shape[1] - ids.shape[1]
        return {"decode_tokens_per_s": (n - 1) / (stats.total_time - stats.prefill_time), "new_tokens": n}

    compile_seconds = None
    if args.compiled:   # the verify step compiled (or loaded from the cache) before the timed rounds
        t0 = time.perf_counter()
        run_ours(compile=True)
        compile_seconds = time.perf_counter() - t0
        print(f"ours plain_loop+compiled: first call (compiling or loading) {compile_seconds:.0f} s", flush=True)

    def run_hf():
        # decode rate = (n - 1) / (the call's wall - a 1-token call's wall: the prompt's forward)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        wall = time.perf_counter() - t0
        n = out.shape[1] - ids.shape[1]
        return {"decode_tokens_per_s": (n - 1) / (wall - first), "new_tokens": n}

    engines = [("llama.cpp", run_llama), ("ours plain_loop", run_ours)]
    if args.compiled:
        engines.append(("ours plain_loop+compiled", functools.partial(run_ours, compile=True)))
    if args.hf:
        engines.append(("transformers generate", run_hf))
    rows = []
    for r in range(args.repeats):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for name, fn in order:
            load = os.getloadavg()[0]
            row = {"engine": name, "repeat": r, **fn(), "load_avg_1min_before": round(load, 2)}
            rows.append(row)
            print(f"{r} {name:22s} decode {row['decode_tokens_per_s']:6.2f} tok/s (load average {load:.1f})", flush=True)
    by = {name: [x for x in rows if x["engine"] == name] for name, _ in engines}
    summary = {name: {"decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in rs),
                      "per_repeat": [round(x["decode_tokens_per_s"], 2) for x in rs]} for name, rs in by.items()}
    ratios = {}
    for name in by:
        if name == "llama.cpp":
            continue
        rr = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in zip(by[name], by["llama.cpp"])]
        ratios[f"{name} / llama.cpp"] = {"median": statistics.median(rr), "per_repeat": [round(x, 3) for x in rr]}
    cap = ps_kernels.cpu_capability()
    meta = {"cpu": cpu_info(), "threads": args.threads, "torch": torch.__version__, "our_cpu_level": cap.active,
            "native_build": ps_kernels.native_build_id(),
            "model": "random Llama-3.2-1B-shaped (std 0.02, seed 0), bf16 safetensors; GGUF bf16 by llama.cpp's "
                     "convert_hf_to_gguf.py from llama-cpp-python's sdist (vendor/llama.cpp)",
            "shape": LLAMA_1B, "gguf_type": "bf16 (norms f32)", "gguf_bytes": gguf.stat().st_size,
            "prompt_tokens": ids.shape[1], "new_tokens": new, "repeats": args.repeats,
            "llama_cpp": {"tool": "llama-bench", **getattr(run_llama, "info", {}),
                          "system_info": _llama_system_info(args.llama_python),
                          "cmake": _cmake_flags(llama_bench.parent.parent),
                          "cmake_note": "GGML_NATIVE=ON compiles with -march=native: the per-instruction-set "
                                        "GGML_* options are then unused (system_info lists what was built in)",
                          "cmake_args": os.environ.get("CMAKE_ARGS", "")},
            "load_avg_1min": [x["load_avg_1min_before"] for x in rows],
            "compiled_first_call_seconds": compile_seconds,
            "method": "one process: per repeat llama-bench (a subprocess, the GGUF mmapped from the page cache; "
                      "decode of new_tokens after prompt_tokens of depth), our plain loop, eager and with --compiled "
                      "also compiled (decode: the generate call less its prefill) and transformers' generate (the call less a 1-token call), the "
                      "order rotated each repeat; ratios per repeat, then the median; greedy, no EOS stop",
            "command": os.environ.get("LLAMACPP_CHECK_COMMAND", "bash benchmarks/llamacpp_check.sh big"),
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "ratios": ratios, "rows": rows}, indent=1))
    for name, s in summary.items():
        print(f"{name:22s} decode {s['decode_tokens_per_s']:6.2f} tok/s (median; {s['per_repeat']})")
    for name, r in ratios.items():
        print(f"{name:34s} {r['median']:.3f} {r['per_repeat']}")
    print(f"wrote {path}")


# --- report (either venv) ------------------------------------------------------------------------

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def report(args) -> None:
    work = Path(args.work)
    rounds = {}
    for path in sorted((work / "rounds").glob("*.json")):
        who, n = path.stem.rsplit("-", 1)
        rounds.setdefault(int(n), {})[who] = json.loads(path.read_text())
    data = json.loads((work / "prompts.json").read_text())
    # transformers' reference stops at EOS; the engines run to max_new_tokens without it: an output
    # equals the reference when it agrees over the reference's length
    ref_len = {(p["category"], p["index"]): len(p["hf_output"]) for p in data["prompts"]}

    def equal_to_reference(r) -> bool:
        want = min(r["new_tokens"], ref_len.get((r.get("category"), r.get("prompt")), r["new_tokens"]))
        return r.get("agree_with_hf_fp32", 0) >= want

    def key(r):
        if r["engine"] == "llama.cpp":
            return (r.get("model", "smollm2-135m"), "llama.cpp", r["dtype"], r["speculation"])
        return (r.get("model", "smollm2-135m"), r["engine"], r["dtype"], r["method"])

    per_round: dict[tuple, list] = {}
    failures = {}
    for n, parts in sorted(rounds.items()):
        groups: dict[tuple, list] = {}
        for part in parts.values():
            for r in part["rows"]:
                if "error" in r:
                    failures[f"llama.cpp {r['gguf']} {r['speculation']}"] = r["error"]
                    continue
                groups.setdefault(key(r), []).append(r)
        for k, rs in groups.items():
            per_round.setdefault(k, []).append({
                "round": n, "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
                "decode_tokens_per_s": _median([r.get("decode_tokens_per_s") for r in rs]),
                "mean_accepted": _median([r.get("mean_accepted") for r in rs]),
                "agree_all_128": sum(equal_to_reference(r) for r in rs),
                "prompts": len(rs)})
    summary = []
    for (model, engine, dtype, method), rs in sorted(per_round.items()):
        summary.append({"model": model, "engine": engine, "dtype": dtype, "method": method, "rounds": len(rs),
                        "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
                        "tokens_per_s_rounds": [round(r["tokens_per_s"], 2) for r in rs],
                        "decode_tokens_per_s": _median([r["decode_tokens_per_s"] for r in rs]),
                        "mean_accepted": _median([r["mean_accepted"] for r in rs]),
                        "outputs_equal_to_hf_fp32": f"{rs[0]['agree_all_128']}/{rs[0]['prompts']}"})
    # ratios to llama.cpp without speculation, per round (the same round's processes), then the median
    ratios = []
    for (model, engine, dtype, method), rs in sorted(per_round.items()):
        base = {r["round"]: r for r in per_round.get((model, "llama.cpp", dtype, "none"), [])}
        if engine == "llama.cpp" and method == "none" or not base:
            continue
        for field in ("tokens_per_s", "decode_tokens_per_s"):
            rr = [r[field] / base[r["round"]][field] for r in rs
                  if r["round"] in base and r[field] and base[r["round"]][field]]
            if rr:
                ratios.append({"model": model, "dtype": dtype, "a": f"{engine} {method}", "b": "llama.cpp none",
                               "field": field, "ratio": statistics.median(rr), "per_round": [round(x, 3) for x in rr]})
    hf = [p["hf_tokens_per_s"] for p in data["prompts"]]
    big_only = all(r.get("model") for p in rounds.values() for part in p.values() for r in part["rows"])
    any_llama = next((p["llama"] for p in rounds.values() if "llama" in p), {})
    any_ours = next((p["ours"] for p in rounds.values() if "ours" in p), {})
    meta = {"cpu": any_ours.get("cpu") or any_llama.get("cpu"), "our_cpu_level": any_ours.get("cpu_level"),
            "torch": any_ours.get("torch"), "native_build": any_ours.get("native_build"),
            "llama_cpp": any_llama.get("build"), "gguf_types": ["bf16"] if big_only else list(GGUF_TYPES),
            "gguf_converter": "convert_hf_to_gguf.py from llama-cpp-python's sdist (vendor/llama.cpp)",
            "prompts": {c: sum(p["category"] == c for p in data["prompts"]) for c in dict.fromkeys(p["category"] for p in data["prompts"])},
            "max_new_tokens": data["meta"]["max_new_tokens"],
            "threads": {"transformers_reference": data["meta"]["threads"], "llama.cpp": any_llama.get("threads"),
                        "ours": any_ours.get("threads")},
            "compiled_warm_up_seconds": {n: p["ours"].get("compiled_warm_up_seconds") for n, p in rounds.items()
                                         if "ours" in p},
            "transformers_generate_fp32_tokens_per_s": None if big_only else statistics.median(hf),
            "method": "rounds alternate a llama.cpp process and ours (shared cores); per round the median "
                      "over prompts, then the median over rounds; tokens_per_s includes the prompt's "
                      "forward, decode_tokens_per_s does not; no EOS stop (every method makes "
                      "max_new_tokens tokens)",
            "command": os.environ.get("LLAMACPP_CHECK_COMMAND", "bash benchmarks/llamacpp_check.sh")}
    out = {"meta": meta, "summary": summary, "ratios": ratios, "failures": failures}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    level = meta["our_cpu_level"] or "unknown"
    path = out_dir / (f"{args.name}.json" if args.name else f"llamacpp_{level}{'_' + args.tag if args.tag else ''}.json")
    path.write_text(json.dumps(out, indent=1))
    if meta["transformers_generate_fp32_tokens_per_s"] is not None:
        print(f"transformers generate fp32: {meta['transformers_generate_fp32_tokens_per_s']:.1f} tok/s (median over prompts)")
    for s in summary:
        print(f"{s['model']:14s} {s['engine']:9s} {s['dtype']:8s} {s['method']:13s} {s['tokens_per_s']:7.1f} tok/s "
              f"(decode {s['decode_tokens_per_s'] or 0:6.1f}; rounds {s['tokens_per_s_rounds']}; "
              f"= HF fp32 {s['outputs_equal_to_hf_fp32']})")
    for r in ratios:
        print(f"{r['model']:14s} {r['dtype']:8s} {r['a']:24s} / {r['b']}: {r['field']} {r['ratio']:.3f} {r['per_round']}")
    for k, v in failures.items():
        print(f"FAILED {k}: {v}")
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    roles = {}
    for name, fn in (("prepare", prepare), ("convert", convert), ("llama", llama), ("ours", ours), ("big", big),
                     ("report", report)):
        roles[name] = sub.add_parser(name)
        roles[name].set_defaults(fn=fn)
        roles[name].add_argument("--work", default=os.environ.get("WORK", "/tmp/llamacpp_check"))
    roles["prepare"].add_argument("--prompts", type=int, default=4, help="prompts per category (3 categories)")
    roles["prepare"].add_argument("--max-new-tokens", type=int, default=128)
    roles["prepare"].add_argument("--big", action="store_true", help="also a random Llama-3.2-1B-shaped bf16 model")
    roles["convert"].add_argument("--converter", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    for name in ("prepare", "llama", "ours"):
        roles[name].add_argument("--threads", type=int, default=2)
    for name in ("llama", "ours"):
        roles[name].add_argument("--round", type=int, default=0)
        roles[name].add_argument("--big", action="store_true", help="also the 1B-shaped model's decode speed")
        roles[name].add_argument("--big-repeats", type=int, default=2)
        roles[name].add_argument("--big-only", action="store_true", help="only the 1B-shaped model (no SmolLM2)")
    roles["llama"].add_argument("--n-ctx", type=int, default=2048)
    roles["llama"].add_argument("--no-lookup", dest="lookup", action="store_false",
                                help="skip llama.cpp's prompt-lookup speculation")
    roles["ours"].add_argument("--methods", default="plain_loop,hybrid_auto")
    roles["ours"].add_argument("--compiled", default="plain_loop",
                               help="methods also run with generate(compile=True) ('' for none)")
    roles["ours"].add_argument("--max-nodes", type=int, default=32, help="as parallelspec bench's default")
    roles["ours"].add_argument("--no-big-hf", dest="big_hf", action="store_false",
                               help="skip transformers' generate on the 1B-shaped model")
    roles["ours"].add_argument("--big-hf-new-tokens", type=int, default=0,
                               help="new tokens for transformers on the 1B-shaped model (default: as the others)")
    roles["big"].add_argument("--threads", type=int, default=2)
    roles["big"].add_argument("--repeats", type=int, default=6, help="rounds of the engines (order rotated)")
    roles["big"].add_argument("--new-tokens", type=int, default=64)
    roles["big"].add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
    roles["big"].add_argument("--compiled", action="store_true", help="also the plain loop with generate(compile=True)")
    roles["big"].add_argument("--llama-bench", default=os.path.join(os.environ.get("WORK", "/tmp/llamacpp_check"),
                                                                    "build", "bin", "llama-bench"))
    roles["big"].add_argument("--llama-python", default=os.path.join(os.environ.get("WORK", "/tmp/llamacpp_check"),
                                                                     "venv", "bin", "python"))
    roles["big"].add_argument("--name", default="llama1b_shape_bf16", help="the results file's name (no .json)")
    roles["big"].add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "llamacpp"))
    roles["report"].add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "llamacpp"))
    roles["report"].add_argument("--tag", default="")
    roles["report"].add_argument("--name", default="", help="the results file's name (without .json)")
    args = ap.parse_args()
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
