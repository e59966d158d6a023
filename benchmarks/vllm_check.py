"""The exported eagle3-layout drafter in the real engine (benchmarks/vllm_check.sh runs this).

Three roles, two virtualenvs (vLLM's CPU build pins its own transformers, so it lives apart):

  prepare  (the project's venv) a quick eagle3-layout drafter for SmolLM2-135M-Instruct:
           self-distilled data through ``training.extract.generate_and_extract`` (called
           directly, not through ``parallelspec extract``), a short ``train`` run, ``export_vllm``.
           ``--data sharegpt``: ShareGPT prompts (a drafter that generalises, weakly after minutes);
           ``--data bench``: the bench prompts' own continuations, memorised, so that every
           depth, the mask slots' too, is accepted often (a check of the engine, not of training);
           the bench prompts (``bench.prompt_sets``), transformers' greedy outputs, and our
           loop's chain with the same drafter read back from the exported files (``import_vllm``)
           and the same k: outputs and accepted tokens per step.
  serve    (vLLM's venv) vLLM on the target's safetensors, greedy, with the exported drafter and
           parallel drafting, and once without a drafter as the control; outputs and vLLM's own
           spec-decode counters (``LLM.get_metrics``).
  compare  either venv: equality per prompt and the two acceptance figures side by side.

Everything goes to --work (default /tmp/vllm_check); nothing is written in the checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def prepare(args) -> None:
    import torch

    import parallelspec as ps
    from parallelspec.tools.bench import prompt_sets
    from parallelspec.tools.export import export_vllm, import_vllm
    from parallelspec.models import cache_dir, load_default_target
    from parallelspec.tools.training.data import load_prompts
    from parallelspec.tools.training.extract import generate_and_extract
    from parallelspec.tools.training.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_default_target(torch.float32)
    target_dir = cache_dir() / "SmolLM2-135M-Instruct"      # the safetensors copy vLLM serves
    prompts = [(cat, ids) for cat, items in prompt_sets(tok, args.prompts).items() for ids in items]
    data = work / "data"
    # a trained eagle3-layout drafter (e.g. the shipped one): no data, no training
    run = Path(args.drafter) if args.drafter else work / "run"
    if not args.drafter and not (data / "train-ext-00000.pt").exists():
        data.mkdir(exist_ok=True)
        t0 = time.time()
        if args.data == "bench":
            splits = (("train", [ids[0].tolist() for _, ids in prompts], args.max_new_tokens + 8),)
        else:
            splits = tuple((split, [ids for _, ids, _ in load_prompts(tok, split, limit=n, max_prompt_tokens=200)],
                            args.gen_tokens) for split, n in (("heldout", args.heldout_prompts),
                                                             ("train", args.train_prompts)))
        for split, texts, new in splits:
            # the bench prompts' continuations in fp32: transformers' greedy outputs exactly
            shard = generate_and_extract(model, texts, new, tok.eos_token_id, top_k=32, batch_size=32,
                                         autocast_dtype=None if args.data == "bench" else torch.bfloat16)
            torch.save(shard, data / f"{split}-ext-00000.pt")
            print(f"{split}: {len(texts)} prompts, {sum(len(s) for s in shard['ids']) - sum(shard['start'])} "
                  f"generated tokens ({time.time() - t0:.0f} s)", flush=True)
        if args.data == "bench":
            (data / "heldout-ext-00000.pt").symlink_to("train-ext-00000.pt")
    if not args.drafter and not (run / "drafter" / "config.json").exists():
        memorise = args.data == "bench"
        cfg = TrainConfig(kind="parallel", layout="eagle3", depth=args.k, draft_vocab=args.draft_vocab,
                          head="trained", steps=args.steps, batch_size=len(prompts) if memorise else 8,
                          anchor_frac=1.0 if memorise else 0.25, lr=3e-3 if memorise else 2e-3, warmup=20,
                          eval_every=100, eval_sequences=16, checkpoint_every=100, time_budget=args.train_seconds)
        train(cfg, model, [data / "train-ext-00000.pt"], [data / "heldout-ext-00000.pt"], run,
              device=torch.device("cpu"), log=lambda m: print(m, flush=True))
    exported = export_vllm(run, work / "vllm-drafter", model)
    drafter = import_vllm(exported, model, top_m=1)
    rows = []
    for cat, ids in prompts:
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False)[0, ids.shape[1]:].tolist()
        out, stats = ps.generate(model, ids, drafter, max_new_tokens=args.max_new_tokens, tree="chain",
                                 tree_depth=args.k, return_stats=True)
        ours = out[0, ids.shape[1]:].tolist()
        rows.append({"category": cat, "prompt": ids[0].tolist(), "hf": ref, "ours": ours, "ours_equal_hf": ours == ref,
                     "ours_accept_histogram": stats.accept_histogram, "ours_mean_accepted": stats.mean_accepted})
        print(f"{cat}: {len(ids[0])} prompt tokens; ours == transformers: {ours == ref}; our accepted per step "
              f"{stats.mean_accepted:.3f}", flush=True)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    (work / "prepare.json").write_text(json.dumps({
        "target": str(target_dir), "drafter": str(exported), "k": args.k, "max_new_tokens": args.max_new_tokens,
        "data": f"the drafter at {args.drafter}" if args.drafter else args.data,
        "train": summary and {"steps": summary["steps"], "wall_s": summary["wall_s"],
                              "tokens": summary["train_generated_tokens"],
                              "heldout": summary["history"][-1] if summary["history"] else None},
        "rows": rows}, indent=1) + "\n")


def serve(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = Path(args.work)
    prep = json.loads((work / "prepare.json").read_text())
    prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in prep["rows"]]
    params = SamplingParams(temperature=0.0, max_tokens=prep["max_new_tokens"], ignore_eos=False)
    result = {}
    for name, spec in (("vllm_spec", {"method": "eagle3", "model": prep["drafter"],
                                      "num_speculative_tokens": prep["k"], "parallel_drafting": True}),
                       ("vllm_plain", None)):
        t0 = time.time()
        llm = LLM(model=prep["target"], dtype="float32", max_model_len=2048, seed=0, enforce_eager=True,
                  disable_log_stats=False, speculative_config=spec)
        load_s = time.time() - t0
        t0 = time.time()
        outs = llm.generate(prompts, params)
        gen_s = time.time() - t0
        metrics = {}
        for m in llm.get_metrics():
            if m.name.startswith("vllm:spec_decode"):
                metrics[m.name] = getattr(m, "value", None) if not hasattr(m, "values") else m.values
        result[name] = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "load_s": round(load_s, 1),
                        "generate_s": round(gen_s, 2), "metrics": metrics}
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "outputs"}), flush=True)
        del llm
        import gc
        gc.collect()
    import vllm
    result["vllm_version"] = vllm.__version__
    (work / "vllm.json").write_text(json.dumps(result, indent=1) + "\n")


def _drafter_source(prep: dict) -> str:
    data = str(prep.get("data"))
    return data if data.startswith("the drafter at") else f"trained on {data} prompts"


def compare(args) -> int:
    work = Path(args.work)
    prep = json.loads((work / "prepare.json").read_text())
    got = json.loads((work / "vllm.json").read_text())
    ok = True
    print(f"vLLM {got['vllm_version']}, drafter: {_drafter_source(prep)}, k={prep['k']}, {len(prep['rows'])} prompts, "
          f"{prep['max_new_tokens']} new tokens, greedy, fp32")
    for i, r in enumerate(prep["rows"]):
        spec, plain = got["vllm_spec"]["outputs"][i], got["vllm_plain"]["outputs"][i]
        print(f"  [{i}] {r['category']}: ours == hf {r['ours_equal_hf']}, vllm+drafter == hf {spec == r['hf']}, "
              f"vllm plain == hf {plain == r['hf']}, vllm+drafter == vllm plain {spec == plain}")
        ok &= r["ours_equal_hf"] and spec == r["hf"]
    m = got["vllm_spec"]["metrics"]
    drafts, accepted = m.get("vllm:spec_decode_num_drafts"), m.get("vllm:spec_decode_num_accepted_tokens")
    per_pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    vllm_mean = 1 + accepted / drafts if drafts else float("nan")
    hist = [0] * (prep["k"] + 2)
    for r in prep["rows"]:
        for a, c in enumerate(r["ours_accept_histogram"]):
            hist[a] += c
    steps = sum(hist)
    ours_mean = sum(a * c for a, c in enumerate(hist)) / steps if steps else float("nan")
    ours_per_pos = [sum(c for a, c in enumerate(hist) if a - 1 >= j + 1) for j in range(prep["k"])]
    print(f"accepted tokens per step (bonus included): vLLM {vllm_mean:.3f} ({accepted} drafts accepted of "
          f"{drafts} steps; per position {per_pos}); our loop (chain, same drafter and k) {ours_mean:.3f} "
          f"({steps} steps; per position {ours_per_pos}); ratio {vllm_mean / ours_mean:.3f}")
    (work / "compare.json").write_text(json.dumps({"outputs_equal_hf": ok, "vllm_mean_accepted": vllm_mean,
                                                   "ours_mean_accepted": ours_mean, "vllm_drafts": drafts,
                                                   "vllm_accepted": accepted, "vllm_per_pos": per_pos,
                                                   "ours_steps": steps, "ours_per_pos": ours_per_pos}, indent=1) + "\n")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=("prepare", "serve", "compare"))
    ap.add_argument("--work", default=os.environ.get("WORK", "/tmp/vllm_check"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--data", choices=("sharegpt", "bench"), default="sharegpt",
                    help="the drafter's training prompts: ShareGPT's, or the bench prompts themselves (memorised)")
    ap.add_argument("--prompts", type=int, default=2, help="bench prompts per category (chat, code, long)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--train-prompts", type=int, default=192)
    ap.add_argument("--heldout-prompts", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--train-seconds", type=float, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drafter", default=None,
                    help="prepare: check this eagle3-layout drafter (a saved drafter or run directory, e.g. "
                         "python/parallelspec/assets/smollm2-135m-instruct-parallel-eagle3) instead of training one")
    args = ap.parse_args()
    if args.role == "prepare":
        prepare(args)
    elif args.role == "serve":
        serve(args)
    else:
        return compare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
