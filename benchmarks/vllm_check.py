"""The same drafter files in the real engine and in our loop (benchmarks/vllm_check.sh runs this).

Three roles, two virtualenvs (vLLM's CPU build pins its own transformers, so it lives apart):

  prepare  (the project's venv) drafters for SmolLM2-135M-Instruct and our loop's runs of them:
           self-distilled data through ``training.extract.generate_and_extract`` (called
           directly, not through ``parallelspec extract``; with ``--layout peagle`` it keeps the
           hidden states entering the ``--aux-layers``), a short ``train`` run in ``--layout``,
           ``export_vllm``; with ``--pard-layers N`` also a PARD drafter (the target's first N
           layers, its final norm and head as a LlamaForCausalLM with a ``pard_token``, trained
           ``--pard-seconds`` on the same sequences, saved with save_pretrained).
           ``--data sharegpt``: ShareGPT prompts (a drafter that generalises, weakly after minutes);
           ``--data bench``: the bench prompts' own continuations, memorised, so that every
           depth, the mask slots' too, is accepted often (a check of the engine, not of training).
           Then the bench prompts (``bench.prompt_sets``), transformers' greedy outputs, and our
           loop's chain over the same files vLLM reads, the same k, one case each:
             parallel    eagle3 layout: import_vllm (ParallelDrafter), vLLM eagle3 + parallel_drafting
             peagle      peagle layout: load_drafter on the files (P-EAGLE), vLLM eagle3 + parallel_drafting
             eagle3_aux  peagle layout: load_drafter(format="eagle3") on the same files (EAGLE-3 with
                         aux features, k sequential passes), vLLM eagle3 without parallel drafting
             pard        load_drafter(format="pard"), vLLM draft_model + parallel_drafting
  serve    (vLLM's venv) vLLM on the target's safetensors, greedy, fp32, once per case and once
           without a drafter as the control; outputs and vLLM's own spec-decode counters
           (``LLM.get_metrics``). ``--cases`` serves only those (the others' results are kept).
  compare  either venv: equality per prompt and the acceptance figures side by side, per case;
           ``--record PATH`` also writes them with the machine and the vLLM version.

Everything goes to --work (default /tmp/vllm_check); nothing is written in the checkout except
the --record file.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _aux_layers(text: str | None, model) -> list[int]:
    from parallelspec.drafters.checkpoint import default_aux_layers

    if not text:
        return []
    if text == "eagle3":
        return list(default_aux_layers(model.config.num_hidden_layers))
    return [int(x) for x in text.split(",") if x.strip()]


def build_pard(model, num_layers: int, pard_token: int):
    """A PARD drafter for `model`: its embeddings, first `num_layers` decoder layers, final norm
    and (tied) head as a LlamaForCausalLM whose config names `pard_token`."""
    import copy

    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:num_layers]
    cfg.pard_token = pard_token
    lm = LlamaForCausalLM(cfg)
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    lm.load_state_dict(keep, strict=True)
    return lm.float()


def pard_batch(ids: list[int], start: int, k: int, pard_token: int):
    """PARD's training input for one sequence (AMD's PARD trains this way): the real tokens, then
    for every cut c (last real token c, from the prompt's last token on) k - 1 pard tokens at
    positions c + 1 .. c + k - 1 that see the reals <= c and their own group's earlier slots.
    Returns (input ids [1, T], positions [1, T], additive mask [1, 1, T, T], rows, labels): the
    logits at rows predict labels (row c -> ids[c + 1]; slot m of cut c -> ids[c + 1 + m])."""
    import torch

    n = len(ids)
    cuts = list(range(max(start - 1, 0), n - 1))
    M = k - 1
    T = n + M * len(cuts)
    allow = torch.zeros(T, T, dtype=torch.bool)
    allow[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    pos = list(range(n))
    rows, labels = [], []
    for g, c in enumerate(cuts):
        rows.append(c)
        labels.append(ids[c + 1])
        base = n + g * M
        for m in range(1, M + 1):
            r = base + m - 1
            allow[r, :c + 1] = True
            allow[r, base:r + 1] = True
            pos.append(c + m)
            if c + 1 + m < n:
                rows.append(r)
                labels.append(ids[c + 1 + m])
    x = torch.tensor(ids + [pard_token] * (M * len(cuts)))[None]
    mask = torch.zeros(1, 1, T, T).masked_fill(~allow, float("-inf"))
    return x, torch.tensor(pos)[None], mask, torch.tensor(rows), torch.tensor(labels)


def train_pard(lm, seqs, k: int, pard_token: int, seconds: float, lr: float = 3e-4, log=print) -> dict:
    """A few epochs of PARD's objective (hard labels: the target's greedy continuations) over
    `seqs` [(ids, start)] for at most `seconds`. Returns a summary."""
    import torch
    import torch.nn.functional as F

    batches = [pard_batch(ids, start, k, pard_token) for ids, start in seqs]
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    lm.train()
    t0, epoch, history = time.time(), 0, []
    while time.time() - t0 < seconds:
        tot, hit, cnt = 0.0, 0, 0
        for x, pos, mask, rows, labels in batches:
            h = lm.model(input_ids=x, position_ids=pos, attention_mask=mask).last_hidden_state[0, rows]
            logits = lm.lm_head(h).float()
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(labels)
            hit += int((logits.argmax(-1) == labels).sum())
            cnt += len(labels)
            if time.time() - t0 >= seconds:
                break
        epoch += 1
        history.append({"epoch": epoch, "loss": round(tot / cnt, 4), "top1": round(hit / cnt, 4),
                        "s": round(time.time() - t0)})
        log(f"pard epoch {epoch}: loss {tot / cnt:.3f}, top-1 {hit / cnt:.3f} ({time.time() - t0:.0f} s)")
    lm.eval()
    return {"epochs": epoch, "wall_s": round(time.time() - t0), "lr": lr, "history": history}


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
    aux_layers = _aux_layers(args.aux_layers or ("eagle3" if args.layout == "peagle" else None), model)
    if args.layout == "peagle" and not aux_layers:
        raise SystemExit("--aux-layers: the peagle layout reads aux features; expected 'eagle3' or layer indices")
    data = work / ("data-aux" if aux_layers else "data")
    # a trained drafter (e.g. the shipped one): no training (data only for PARD)
    run = Path(args.drafter) if args.drafter else work / ("run" if args.layout == "eagle3" else f"run-{args.layout}")
    need_data = not args.drafter or args.pard_layers
    if need_data and not (data / "train-ext-00000.pt").exists():
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
                                         autocast_dtype=None if args.data == "bench" else torch.bfloat16,
                                         aux_layers=aux_layers)
            torch.save(shard, data / f"{split}-ext-00000.pt")
            print(f"{split}: {len(texts)} prompts, {sum(len(s) for s in shard['ids']) - sum(shard['start'])} "
                  f"generated tokens ({time.time() - t0:.0f} s)", flush=True)
        if args.data == "bench":
            (data / "heldout-ext-00000.pt").symlink_to("train-ext-00000.pt")
    if not args.drafter and not (run / "drafter" / "config.json").exists():
        memorise = args.data == "bench"
        cfg = TrainConfig(kind="parallel", layout=args.layout, depth=args.k, draft_vocab=args.draft_vocab,
                          head="trained", steps=args.steps, batch_size=len(prompts) if memorise else 8,
                          anchor_frac=1.0 if memorise else 0.25, lr=3e-3 if memorise else 2e-3, warmup=20,
                          eval_every=100, eval_sequences=16, checkpoint_every=100, time_budget=args.train_seconds)
        train(cfg, model, [data / "train-ext-00000.pt"], [data / "heldout-ext-00000.pt"], run,
              device=torch.device("cpu"), log=lambda m: print(m, flush=True))
    cases = {}
    if not args.no_eagle:
        exported = export_vllm(run, work / ("vllm-drafter" if args.layout == "eagle3" else f"vllm-{args.layout}"), model)
        layout = json.loads((exported / "config.json").read_text())["parallelspec"]["layout"]
        spec = {"method": "eagle3", "model": str(exported), "num_speculative_tokens": args.k}
        if layout == "eagle3":
            cases["parallel"] = (spec | {"parallel_drafting": True}, lambda: import_vllm(exported, model, top_m=1),
                                 "import_vllm(files) (ParallelDrafter)")
        else:
            cases["peagle"] = (spec | {"parallel_drafting": True}, lambda: ps.load_drafter(str(exported), model),
                               "load_drafter(files) (P-EAGLE, one pass)")
            cases["eagle3_aux"] = (spec, lambda: ps.load_drafter(str(exported), model, format="eagle3"),
                                   "load_drafter(files, format='eagle3') (EAGLE-3, k sequential passes)")
    pard_info = None
    if args.pard_layers:
        pard_dir = work / f"pard-{args.pard_layers}l"
        if not (pard_dir / "config.json").exists():
            lm = build_pard(model, args.pard_layers, args.pard_token)
            pard_info = {"layers": args.pard_layers, "pard_token": args.pard_token, "trained": None}
            if args.pard_seconds > 0:
                shard = torch.load(data / "train-ext-00000.pt")
                seqs = [(s.tolist(), int(st)) for s, st in zip(shard["ids"], shard["start"])]
                pard_info["trained"] = train_pard(lm, seqs, args.k, args.pard_token, args.pard_seconds,
                                                  log=lambda m: print(m, flush=True))
                pard_info["trained"]["data"] = args.data
            lm.save_pretrained(pard_dir)
            tok.save_pretrained(pard_dir)
            (pard_dir / "pard_check.json").write_text(json.dumps(pard_info, indent=1) + "\n")
        pard_info = json.loads((pard_dir / "pard_check.json").read_text())
        cases["pard"] = ({"method": "draft_model", "model": str(pard_dir), "num_speculative_tokens": args.k,
                          "parallel_drafting": True},
                         lambda: ps.load_drafter(str(pard_dir), model, format="pard", depth=args.k),
                         "load_drafter(dir, format='pard')")
    hf = []
    for cat, ids in prompts:
        hf.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)[0, ids.shape[1]:].tolist())
    out_cases = {}
    for name, (spec, make, how) in cases.items():
        drafter = make()
        rows = []
        for (cat, ids), ref in zip(prompts, hf):
            out, stats = ps.generate(model, ids, drafter, max_new_tokens=args.max_new_tokens, tree="chain",
                                     tree_depth=args.k, return_stats=True)
            ours = out[0, ids.shape[1]:].tolist()
            rows.append({"ours": ours, "ours_equal_hf": ours == ref, "ours_accept_histogram": stats.accept_histogram,
                         "ours_mean_accepted": stats.mean_accepted})
            print(f"{name} {cat}: {len(ids[0])} prompt tokens; ours == transformers: {ours == ref}; our accepted "
                  f"per step {stats.mean_accepted:.3f}", flush=True)
        out_cases[name] = {"speculative_config": spec, "ours": how, "drafter_class": type(drafter).__name__,
                           "rows": rows}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    (work / "prepare.json").write_text(json.dumps({
        "target": str(target_dir), "k": args.k, "max_new_tokens": args.max_new_tokens, "layout": args.layout,
        "aux_layers": aux_layers, "data": f"the drafter at {args.drafter}" if args.drafter else args.data,
        "train": summary and {"steps": summary["steps"], "wall_s": summary["wall_s"],
                              "tokens": summary["train_generated_tokens"],
                              "heldout": summary["history"][-1] if summary["history"] else None},
        "pard": pard_info,
        "prompts": [{"category": cat, "prompt": ids[0].tolist(), "hf": ref} for (cat, ids), ref in zip(prompts, hf)],
        "cases": out_cases}, indent=1) + "\n")


def serve(args) -> None:
    import gc

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = Path(args.work)
    prep = json.loads((work / "prepare.json").read_text())
    prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in prep["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=prep["max_new_tokens"], ignore_eos=False)
    path = work / "vllm.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["vllm_version"] = vllm.__version__
    wanted = args.cases.split(",") if args.cases else [*prep["cases"], "plain"]
    for name in wanted:
        spec = None if name == "plain" else prep["cases"][name]["speculative_config"]
        t0 = time.time()
        try:
            llm = LLM(model=prep["target"], dtype="float32", max_model_len=2048, seed=0, enforce_eager=True,
                      disable_log_stats=False, speculative_config=spec)
        except Exception as exc:   # recorded, the other cases still run
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, "failed:", result[name]["error"], flush=True)
            continue
        load_s = time.time() - t0
        t0 = time.time()
        outs = llm.generate(prompts, params)
        gen_s = time.time() - t0
        metrics = {}
        for m in llm.get_metrics():
            if m.name.startswith("vllm:spec_decode"):
                metrics[m.name] = getattr(m, "value", None) if not hasattr(m, "values") else m.values
        result[name] = {"speculative_config": spec, "outputs": [list(o.outputs[0].token_ids) for o in outs],
                        "load_s": round(load_s, 1), "generate_s": round(gen_s, 2), "metrics": metrics}
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "outputs"}), flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        del llm
        gc.collect()
    path.write_text(json.dumps(result, indent=1) + "\n")


def _drafter_source(prep: dict) -> str:
    data = str(prep.get("data"))
    return data if data.startswith("the drafter at") else f"trained on {data} prompts"


def compare_case(name: str, prep: dict, got: dict) -> dict:
    """One case: outputs against transformers', vLLM's acceptance against our chain's."""
    case, k = prep["cases"][name], prep["k"]
    plain = got.get("plain", {}).get("outputs")
    res = got.get(name)
    if res is None or "error" in res:
        why = "not served" if res is None else res["error"]
        print(f"{name}: vLLM {why}")
        return {"case": name, "ours": case["ours"], "vllm_error": why,
                "ours_equal_hf": all(r["ours_equal_hf"] for r in case["rows"])}
    equal = []
    for i, (p, r) in enumerate(zip(prep["prompts"], case["rows"])):
        spec = res["outputs"][i]
        row = {"ours_equal_hf": r["ours_equal_hf"], "vllm_equal_hf": spec == p["hf"]}
        if plain is not None:
            row["vllm_plain_equal_hf"] = plain[i] == p["hf"]
        equal.append(row)
        print(f"  {name} [{i}] {p['category']}: " + ", ".join(f"{k2} {v}" for k2, v in row.items()))
    m = res["metrics"]
    drafts, accepted = m.get("vllm:spec_decode_num_drafts"), m.get("vllm:spec_decode_num_accepted_tokens")
    per_pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    vllm_mean = 1 + accepted / drafts if drafts else float("nan")
    hist = [0] * (k + 2)
    for r in case["rows"]:
        for a, c in enumerate(r["ours_accept_histogram"]):
            hist[a] += c
    steps = sum(hist)
    ours_mean = sum(a * c for a, c in enumerate(hist)) / steps if steps else float("nan")
    ours_per_pos = [sum(c for a, c in enumerate(hist) if a - 1 >= j + 1) for j in range(k)]
    ratio = vllm_mean / ours_mean
    print(f"{name}: accepted tokens per step (bonus included): vLLM {vllm_mean:.3f} ({accepted} drafts accepted of "
          f"{drafts} steps; per position {per_pos}); our loop ({case['ours']}, chain) {ours_mean:.3f} "
          f"({steps} steps; per position {ours_per_pos}); ratio {ratio:.3f}")
    return {"case": name, "speculative_config": res["speculative_config"], "ours": case["ours"],
            "ours_drafter_class": case["drafter_class"],
            "outputs_equal_hf": all(e["ours_equal_hf"] and e["vllm_equal_hf"] for e in equal),
            "per_prompt": equal, "vllm_mean_accepted": vllm_mean, "ours_mean_accepted": ours_mean, "ratio": ratio,
            "vllm_drafts": drafts, "vllm_accepted": accepted, "vllm_per_pos": per_pos, "ours_steps": steps,
            "ours_per_pos": ours_per_pos, "vllm_load_s": res["load_s"], "vllm_generate_s": res["generate_s"]}


def compare(args) -> int:
    work = Path(args.work)
    prep = json.loads((work / "prepare.json").read_text())
    got = json.loads((work / "vllm.json").read_text())
    print(f"vLLM {got['vllm_version']}, drafter: {_drafter_source(prep)}, k={prep['k']}, {len(prep['prompts'])} "
          f"prompts, {prep['max_new_tokens']} new tokens, greedy, fp32")
    results = {name: compare_case(name, prep, got) for name in prep["cases"]}
    ok = all(r.get("outputs_equal_hf", False) for r in results.values())
    out = {"outputs_equal_hf": ok, "cases": results}
    (work / "compare.json").write_text(json.dumps(out, indent=1) + "\n")
    if args.record:
        import platform

        from parallelspec.tools.benchutil import cpu_model, simd_flags
        record = {"what": "vLLM's CPU build and our loop's chain on the same drafter files (benchmarks/vllm_check.sh)",
                  "date": time.strftime("%Y-%m-%d"), "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                                                 "simd": simd_flags(), "platform": platform.platform()},
                  "vllm_version": got["vllm_version"], "target": "SmolLM2-135M-Instruct (fp32)", "k": prep["k"],
                  "max_new_tokens": prep["max_new_tokens"], "prompts": len(prep["prompts"]),
                  "categories": [p["category"] for p in prep["prompts"]], "layout": prep.get("layout"),
                  "aux_layers": prep.get("aux_layers"), "data": prep["data"], "train": prep["train"],
                  "pard": prep.get("pard"), "note": args.note} | out
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {args.record}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=("prepare", "serve", "compare"))
    ap.add_argument("--work", default=os.environ.get("WORK", "/tmp/vllm_check"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--layout", choices=("eagle3", "peagle"), default="eagle3",
                    help="the trained drafter's layout: eagle3 (no aux features) or peagle (EAGLE-3's aux features; "
                         "checked as P-EAGLE and as sequential EAGLE-3)")
    ap.add_argument("--aux-layers", default=None,
                    help="peagle: the target layers whose input hidden states the drafter reads ('eagle3' = 2, L//2, "
                         "L-3, the default, or comma-separated indices)")
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
                    help="prepare: check this trained drafter (a saved drafter or run directory in --layout, e.g. "
                         "python/parallelspec/assets/smollm2-135m-instruct-parallel-eagle3) instead of training one")
    ap.add_argument("--no-eagle", action="store_true", help="prepare: no EAGLE-layout drafter (e.g. PARD only)")
    ap.add_argument("--pard-layers", type=int, default=0,
                    help="prepare: also a PARD drafter made of the target's first N layers (0: none)")
    ap.add_argument("--pard-token", type=int, default=16,
                    help="the PARD drafter's pard_token (default 16, SmolLM2's <empty_output>)")
    ap.add_argument("--pard-seconds", type=float, default=180, help="PARD training time (0: untrained)")
    ap.add_argument("--cases", default=None, help="serve: comma-separated cases (and 'plain'); default all")
    ap.add_argument("--record", default=None, help="compare: also write the results with the machine to this file")
    ap.add_argument("--note", default=None, help="compare --record: a note kept in the file")
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
