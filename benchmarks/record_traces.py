"""Record decoding traces on the CPU: for the bench prompts, each step's verification tree
(tokens, parents) and the path the target accepted, with the real SmolLM2-135M-Instruct target
and the shipped default drafter (greedy: the same trees and paths on any hardware).

    python benchmarks/record_traces.py [--prompts 4] [--max-new-tokens 64] [--policies auto,dynamic8,...]

Writes benchmarks/traces/smollm2_<drafter>_<policy>.json (compact JSON), one file per tree policy:

    {"meta": {...}, "runs": [{"category", "prompt", "prompt_ids", "steps": [[tokens, parents, path, next], ...]}]}

``path`` is the accepted node indices (root first), ``next`` the bonus token. benchmarks/replay_traces.py
replays them through the same loop with random-weight models of the same shapes (the GPU figure
that needs no model weights on the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from parallelspec.trees import TreeBuilder

TRACES = Path(__file__).resolve().parent / "traces"
POLICIES = ("auto", "dynamic8", "dynamic16", "dynamic32", "dynamic64")


class RecordingBuilder(TreeBuilder):
    """Wraps a tree builder: keeps every tree it builds and what the step accepted (batch 1).
    Forwards the rest of the loop's protocol to the wrapped builder."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[list] = []
        self._tree = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def host_request(self, candidates):
        return self.inner.host_request(candidates)

    def receive(self, host):
        self.inner.receive(host)

    def max_size(self, depth):
        return self.inner.max_size(depth)

    def reset(self):
        self.inner.reset()

    def build(self, root, candidates):
        tree = self.inner.build(root, candidates)
        parents = tree.parents if tree.parents.dim() == 1 else tree.parents[0]
        self._tree = (tree.tokens[0].tolist(), parents.tolist())
        return tree

    def observe(self, accept_lens, accept_index=None):
        self.inner.observe(accept_lens, accept_index)
        self.steps.append(self._tree)


def accepted_paths(trees, first: int, new: list[int]) -> list[list]:
    """[tokens, parents, path, next] per step: greedy acceptance is the longest path of the tree
    whose tokens continue the output (children tried in index order, as tree_accept does); the
    root of the first tree is the output's first token (from the prompt's pass)."""
    steps, pos = [], 1          # new[pos] is the token after the current root
    for tokens, parents in trees:
        path, node = [0], 0
        while pos < len(new):
            child = next((c for c in range(node + 1, len(tokens)) if parents[c] == node and tokens[c] == new[pos]), None)
            if child is None:
                break
            path.append(child)
            node, pos = child, pos + 1
        nxt = new[pos] if pos < len(new) else -1
        pos += 1
        steps.append([tokens, parents, path, nxt])
    return steps


def policy_builder(model, policy: str, max_nodes: int):
    from parallelspec.trees import AutoTree
    from parallelspec.trees import DynamicTree

    if policy == "auto":
        return AutoTree.for_model(model, max_nodes=max_nodes)
    if policy.startswith("dynamic"):
        return DynamicTree(int(policy[len("dynamic"):]))
    raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--drafter", default="default", help="parallelspec.defaults.load_drafter spec")
    ap.add_argument("--max-nodes", type=int, default=32, help="node budget of the auto tree")
    ap.add_argument("--out", type=Path, default=TRACES)
    args = ap.parse_args(argv)

    from parallelspec import generate
    from parallelspec.tools.bench import prompt_sets
    from parallelspec.defaults import DEFAULT_DRAFTER, load_drafter
    from parallelspec.models import load_default_target

    model, tok = load_default_target()
    sets = prompt_sets(tok, args.prompts)
    drafter_name = DEFAULT_DRAFTER if args.drafter == "default" else args.drafter
    args.out.mkdir(parents=True, exist_ok=True)
    for policy in args.policies.split(","):
        drafter = load_drafter(args.drafter, model)
        runs = []
        t0 = time.time()
        for cat, prompts in sets.items():
            for p_i, ids in enumerate(prompts):
                rec = RecordingBuilder(policy_builder(model, policy, args.max_nodes))
                out = generate(model, ids, drafter, max_new_tokens=args.max_new_tokens, tree=rec, do_sample=False)
                new = out[0, ids.shape[1]:].tolist()
                steps = accepted_paths(rec.steps, new[0], new)
                runs.append({"category": cat, "prompt": p_i, "prompt_ids": ids[0].tolist(), "new_tokens": new,
                             "steps": steps})
                print(f"{policy} {cat} {p_i}: {len(new)} tokens in {len(steps)} steps", file=sys.stderr, flush=True)
        meta = {"target": "SmolLM2-135M-Instruct (fp32)", "drafter": drafter_name, "policy": policy,
                "max_nodes": args.max_nodes if policy == "auto" else int(policy[len("dynamic"):]),
                "max_new_tokens": args.max_new_tokens, "prompts_per_category": args.prompts, "greedy": True,
                "recorded": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                "seconds": round(time.time() - t0, 1)}
        path = args.out / f"smollm2_{drafter_name}_{policy}.json"
        path.write_text(json.dumps({"meta": meta, "runs": runs}, separators=(",", ":")) + "\n")
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
