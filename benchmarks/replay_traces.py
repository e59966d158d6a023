"""Replay recorded decoding traces (benchmarks/record_traces.py) through the decoding loop with a
random-weight target and drafter of the same architecture and shapes: the GPU's end-to-end
figure without the model's weights (results labelled "replay").

    python benchmarks/replay_traces.py [--device cuda] [--traces benchmarks/traces/*.json]
        [--target smollm2|llama8b|tiny] [--dtype float32|bfloat16] [--split] [--verify-curve]

Each recorded step's tree (tokens, parents) is handed to the loop by a tree builder and its
recorded accepted path replaces tree_accept's (which still runs, for its time): the loop does
exactly the work of the real run (drafting on the replayed tokens, the target's pass over the
same N nodes at the same cache lengths, acceptance, KV compaction, the host sync), only the
weights are random. Reported per trace file: replayed tokens/s, and the plain loop (no drafter)
and transformers' generate of the same random model over the same prompts and token counts, so
the speedups are those of the recorded acceptance on this machine. ``--split`` synchronises at
the phase boundaries and reports each step's time split (draft / build+host / verify / accept /
commit); ``--verify-curve`` times one target forward over N = 1..64 tokens after a 512..4096 prefix
(the cost curve that sizes trees). ``--target llama8b`` is a Llama-3-8B-shaped random target
(bf16; a GPU's), ``tiny`` a 2-layer one (the CPU test).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRACES = HERE / "traces"

SHAPES = {
    # SmolLM2-135M-Instruct (the recorded target)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=8192),
    # Llama-3-8B
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, max_position_embeddings=8192),
    # the CPU test's
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, max_position_embeddings=8192),
}
#: the shipped parallel drafter's shape (python/parallelspec/assets/*-parallel/config.json)
DRAFT = dict(depth=4, head="target", num_layers=1, slot1="mask", draft_vocab_size=16384)


def random_target(shape: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # initialise in the target dtype, on the device: no fp32 copy of 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_drafter(model, ngram_tokens: int):
    """The shipped default's layout (prompt lookup + the parallel drafter, HybridDrafter with the
    shipped options) with a random-weight network of the shipped shape."""
    import parallelspec as ps
    from parallelspec.defaults import HEAD_DTYPE, HYBRID_OPTIONS
    from parallelspec.drafters import build_network

    vd = min(DRAFT["draft_vocab_size"], model.config.vocab_size)
    net = build_network(model, parallel=True, depth=DRAFT["depth"], head=DRAFT["head"],
                        num_layers=DRAFT["num_layers"], slot1=DRAFT["slot1"],
                        draft_to_target=torch.arange(vd, device=model.device))
    head_dtype = getattr(torch, HEAD_DTYPE) if model.device.type == "cpu" else None
    return ps.HybridDrafter([ps.NgramDrafter(num_tokens=ngram_tokens), ps.ParallelDrafter(net, head_dtype=head_dtype)],
                            **HYBRID_OPTIONS)


class _Phases:
    """Wall time per phase of the loop (with --split: synchronising the device at each boundary)."""

    def __init__(self, device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def replay_builder_class():
    from parallelspec.drafters.base import to_device
    from parallelspec.trees import Tree, TreeBuilder
    from ps_kernels import tree_mask_from_parents

    class ReplayBuilder(TreeBuilder):
        """Hands the loop the recorded trees, one a step, and remembers each step's recorded
        path for the accept override."""

        def __init__(self, steps, largest: int):
            self.steps, self.largest, self.i, self.path = steps, largest, 0, None

        def max_size(self, depth):
            return self.largest

        def build(self, root, candidates):
            tokens, parents, path, nxt = self.steps[min(self.i, len(self.steps) - 1)]
            self.i += 1
            n, dev = len(tokens), root.device
            depth = [0] * n
            for j in range(1, n):
                depth[j] = depth[parents[j]] + 1
            rows = to_device([tokens, parents, depth, path + [-1] * (n - len(path))], torch.int64, dev)
            counts = to_device([len(path), max(nxt, 0)], torch.int64, dev)
            self.path = (rows[3][None], counts[:1], counts[1:])   # accept_index, accept_lens, next_token
            par = rows[1]
            return Tree(torch.cat([root[:, None], rows[0][None, 1:]], dim=1), par, rows[2],
                        tree_mask_from_parents(par, validate=False) if n > 1 else None)

    return ReplayBuilder


@contextlib.contextmanager
def replaying(builder, drafter, phases: _Phases, trees: list | None = None):
    """Route the loop's accept through the recorded path (tree_accept still runs) and time the
    phases (draft: the drafter's launch and step; build: the tree handed over; host_sync: the
    step's one read). `trees` collects the size of every tree verified."""
    from parallelspec import engine
    from parallelspec.cache import KVCache

    saved = engine.accept, engine.verify, KVCache.commit, engine.host_copy
    for obj, names, phase in ((drafter, ("launch", "step"), "draft"), (builder, ("build",), "build")):
        for name in names:
            def timed(*a, _f=getattr(obj, name), _phase=phase, **k):
                with phases(_phase):
                    return _f(*a, **k)
            setattr(obj, name, timed)

    def accept(tree, logits, sampling):
        with phases("accept"):
            saved[0](tree, logits, sampling)
            return builder.path

    def verify(target, cache, tree):
        if trees is not None:
            trees.append(tree.size)
        with phases("verify"):
            return saved[1](target, cache, tree)

    def commit(self, accept_index, accept_lens):
        with phases("commit"):
            return saved[2](self, accept_index, accept_lens)

    def host_copy(tensors):
        with phases("host_sync"):
            return saved[3](tensors)
    engine.accept, engine.verify, KVCache.commit, engine.host_copy = accept, verify, commit, host_copy
    try:
        yield
    finally:
        engine.accept, engine.verify, KVCache.commit, engine.host_copy = saved
        for obj, names in ((drafter, ("launch", "step")), (builder, ("build",))):
            for name in names:
                delattr(obj, name)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay_file(path: Path, model, device, args) -> dict:
    import parallelspec as ps

    trace = json.loads(path.read_text())
    runs = trace["runs"][:args.runs] if args.runs else trace["runs"]
    largest = max(len(s[0]) for r in runs for s in r["steps"])
    ReplayBuilder = replay_builder_class()
    drafter = random_drafter(model, args.ngram_tokens)
    phases = _Phases(device, args.split)
    totals = {"replay": 0.0, "plain_loop": 0.0, "hf_generate": 0.0}
    tokens = steps = accepted = 0
    for run in runs:
        ids = torch.tensor([run["prompt_ids"]], device=device)
        new = len(run["new_tokens"])
        for name in (["replay", "plain_loop", "hf_generate"] if not args.replay_only else ["replay"]):
            for rep in range(1 + args.warmup):
                builder = ReplayBuilder(run["steps"], largest)
                _sync(device)
                t0 = time.perf_counter()
                if name == "replay":
                    with replaying(builder, drafter, phases if rep == args.warmup else _Phases(device, False)):
                        out = ps.generate(model, ids, drafter, tree=builder, max_new_tokens=new, do_sample=False)
                elif name == "plain_loop":
                    out = ps.generate(model, ids, None, max_new_tokens=new, do_sample=False)
                else:
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False, pad_token_id=0)
                _sync(device)
                if rep == args.warmup:
                    totals[name] += time.perf_counter() - t0
            if name == "replay":
                if out.shape[1] - ids.shape[1] != new:
                    raise RuntimeError(f"{path.name}: replay made {out.shape[1] - ids.shape[1]} tokens, expected {new}")
                tokens += new
                steps += len(run["steps"])
                accepted += sum(len(s[2]) for s in run["steps"])
    row = {"label": "replay", "trace": path.name, "policy": trace["meta"]["policy"], "runs": len(runs),
           "new_tokens": tokens, "steps": steps, "mean_accepted": accepted / max(steps, 1),
           "replay_tokens_per_s": tokens / totals["replay"]}
    if not args.replay_only:
        row |= {"plain_loop_tokens_per_s": tokens / totals["plain_loop"],
                "hf_generate_tokens_per_s": tokens / totals["hf_generate"],
                "speedup_vs_plain_loop": totals["plain_loop"] / totals["replay"],
                "speedup_vs_hf_generate": totals["hf_generate"] / totals["replay"]}
    if args.split:
        row["step_split_ms"] = {k: 1e3 * v / max(steps, 1) for k, v in phases.times.items()}
    return row


def verify_curve(model, device, sizes=(1, 2, 4, 8, 16, 24, 32, 48, 64), prefixes=(512, 1024, 2048, 4096),
                 repeats: int = 5) -> list[dict]:
    """Time of one target forward (LM head included) over N new tokens after a P-token prefix."""
    from parallelspec.hf.target import TargetModel

    target = TargetModel(model)
    rows = []
    with torch.inference_mode(), target.attention():
        for P in prefixes:
            kv = target.new_cache(1, P + max(sizes) + 1)
            ids = torch.randint(0, target.vocab_size, (1, P + max(sizes)), device=device)
            for start in range(0, P, 1024):   # prefill in chunks
                end = min(P, start + 1024)
                kv.lens.fill_(start)
                target.forward(ids[:, start:end], torch.arange(start, end, device=device)[None], kv, None)
            kv.lens.fill_(P)
            for n in sizes:
                x, pos = ids[:, P:P + n], torch.arange(P, P + n, device=device)[None]
                times = []
                for _ in range(repeats + 1):
                    _sync(device)
                    t0 = time.perf_counter()
                    target.logits(target.forward(x, pos, kv, None))
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                rows.append({"label": "replay_verify_curve", "prefix": P, "n": n, "ms": 1e3 * min(times[1:])})
                print(f"  verify P={P} N={n}: {rows[-1]['ms']:.2f} ms", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", nargs="*", type=Path, default=None, help="trace files (default: benchmarks/traces/*.json)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--target", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 for llama8b, else float32)")
    ap.add_argument("--runs", type=int, default=0, help="replay only the first RUNS prompts of each file (0: all)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed one, per prompt and method")
    ap.add_argument("--ngram-tokens", type=int, default=None, help="prompt lookup's continuation (default: the shipped)")
    ap.add_argument("--split", action="store_true", help="time each phase (synchronising at the boundaries)")
    ap.add_argument("--replay-only", action="store_true", help="skip the plain loop and transformers' generate")
    ap.add_argument("--verify-curve", action="store_true", help="also time the target's verify-cost curve")
    ap.add_argument("--no-replay", action="store_true", help="only the verify-cost curve")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file (default: benchmarks/results/replay_<device>_<target>.json)")
    args = ap.parse_args(argv)
    from parallelspec.defaults import NGRAM_TOKENS

    args.ngram_tokens = args.ngram_tokens or NGRAM_TOKENS
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.target == "llama8b" else "float32"))
    model = random_target(args.target, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    meta = {"label": "replay: recorded trees and paths, random weights", "device": name, "target_shape": args.target,
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}
    out = args.out or HERE / "results" / f"replay_{device.type}_{args.target}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def write():   # after every file: a run stopped by a timeout keeps what it measured
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    files = args.traces if args.traces is not None else sorted(TRACES.glob("*.json"))
    for path in ([] if args.no_replay else files):
        row = replay_file(path, model, device, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write()
    if args.verify_curve or args.no_replay:
        rows += verify_curve(model, device)
    write()
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
