"""The sampling acceptance rule, checked with the power to see the known wrong rules.

The check: verify many copies of a token tree, each with its own uniforms, and look at what one
step emits (the accepted path's tokens, then the next token). Whatever the tree, the k-th emitted
token given the ones before it must follow the target's distribution after that prefix: the
recursive rejection rule is lossless exactly when this holds. Three settings: a fixed tree with
siblings and leaves (candidates chosen deterministically, as the engine's drafters give them), a
chain whose tokens are drawn from draft distributions q (passed as draft_probs), and siblings
drawn independently from one q.

The real op passes on every backend here; each known wrong rule, applied to a copy of
ps_kernels/reference/tree_accept.py, fails at least one of the settings.
"""
import importlib
import importlib.util
import inspect

import pytest
import torch

import ps_kernels

from helpers import DEVICE, chi_square_pvalue, chi_square_terms, runnable_backends

V = 6
SAMPLES = 4000
# a tree with siblings at two levels, leaves at depths 1-3 and a duplicate sibling token (node 3
# repeats node 1's token: it can never be accepted after node 1 is rejected)
TREE_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
TREE_TOKENS = [0, 2, 4, 2, 1, 3, 0, 5]
CHAIN = 4   # root + 3 drawn tokens


class PrefixTable:
    """A target: one distribution over V tokens per prefix (random, with zeros), made on first use."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.rows = {}

    def __call__(self, prefix):
        prefix = tuple(prefix)
        if prefix not in self.rows:
            p = torch.rand(V, generator=self.g) ** 2
            p[torch.randperm(V, generator=self.g)[:2]] = 0.0   # two tokens the target never emits
            self.rows[prefix] = (p / p.sum()).double()
        return self.rows[prefix]


def node_prefixes(tokens, parents):
    """Per node: the tokens on its path from the root (root excluded)."""
    out = [()]
    for c in range(1, len(parents)):
        out.append(out[parents[c]] + (tokens[c],))
    return out


def fixed_tree_case(table, n, g):
    tokens = torch.tensor([TREE_TOKENS] * n)
    parents = torch.tensor(TREE_PARENTS)
    target = torch.stack([table(p) for p in node_prefixes(TREE_TOKENS, TREE_PARENTS)]).float()
    return tokens, parents, target.expand(n, -1, -1).contiguous(), None, torch.rand(n, len(TREE_PARENTS), generator=g)


def drawn_chain_case(table, n, g):
    """Node c's token drawn from q_c (q_c never proposes token 1, and differs from the target)."""
    q = torch.softmax(torch.randn(CHAIN, V, generator=g) * 1.5, -1)
    q[:, 1] = 0.0
    q = q / q.sum(-1, keepdim=True)
    tokens = torch.zeros(n, CHAIN, dtype=torch.int64)
    tokens[:, 1:] = torch.stack([torch.multinomial(q[c], n, replacement=True, generator=g) for c in range(1, CHAIN)], 1)
    target = torch.empty(n, CHAIN, V)
    for b in range(n):
        row = tokens[b].tolist()
        for c in range(CHAIN):
            target[b, c] = table(row[1:c + 1]).float()
    parents = torch.arange(-1, CHAIN - 1)
    return tokens, parents, target, q.expand(n, -1, -1).contiguous(), torch.rand(n, CHAIN, generator=g)


DRAWN_TREE_PARENTS = [-1, 0, 0, 0, 1]   # three siblings drawn i.i.d. from q_0, a child of the first from q_1


def drawn_tree_case(table, n, g):
    """Siblings drawn independently from one q (several drafts of one position): after a
    rejection the residual, renormalised, is what the next sibling is tried against."""
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    q[:, 1] = 0.0
    q = q / q.sum(-1, keepdim=True)
    N = len(DRAWN_TREE_PARENTS)
    draft = torch.zeros(n, N, V)
    tokens = torch.zeros(n, N, dtype=torch.int64)
    for c in range(1, N):
        which = 0 if DRAWN_TREE_PARENTS[c] == 0 else 1
        draft[:, c] = q[which]
        tokens[:, c] = torch.multinomial(q[which], n, replacement=True, generator=g)
    target = torch.empty(n, N, V)
    for b in range(n):
        for c, prefix in enumerate(node_prefixes(tokens[b].tolist(), DRAWN_TREE_PARENTS)):
            target[b, c] = table(prefix).float()
    return tokens, torch.tensor(DRAWN_TREE_PARENTS), target, draft, torch.rand(n, N, generator=g)


def emitted(tokens, accept_index, accept_lens, next_token):
    """Per copy: the emitted tokens (accepted nodes' tokens after the root, then the next one)."""
    out = []
    for b in range(tokens.shape[0]):
        path = accept_index[b, 1:int(accept_lens[b])].tolist()
        out.append(tokens[b, path].tolist() + [int(next_token[b])])
    return out


def conditional_pvalues(sequences, table, min_count=20):
    """Per emitted position k: the pooled chi-square p-value of token k given the tokens before it
    (over prefixes seen min_count+ times), 0 if a token of target probability 0 came out."""
    pvalues = []
    for k in range(max(map(len, sequences))):
        groups = {}
        for s in sequences:
            if len(s) > k:
                groups.setdefault(tuple(s[:k]), []).append(s[k])
        stat, df = 0.0, 0
        for prefix, toks in groups.items():
            p = table(prefix)
            counts = torch.bincount(torch.tensor(toks), minlength=V).double()
            if counts[p == 0].sum():
                stat = float("inf")
                break
            if len(toks) < min_count:
                continue
            s, d = chi_square_terms(counts, p)
            stat, df = stat + s, df + d
        if stat == float("inf"):
            pvalues.append(0.0)
        elif df:
            pvalues.append(chi_square_pvalue(stat, df))
    return pvalues


CASES = {"fixed_tree": fixed_tree_case, "drawn_chain": drawn_chain_case, "drawn_tree": drawn_tree_case}


def min_pvalue(accept, case, seed=7):
    """Run `accept(tokens, parents, target, draft_probs, uniforms)` on SAMPLES copies of the case;
    the smallest per-position p-value of the emitted tokens."""
    table = PrefixTable(seed)
    g = torch.Generator().manual_seed(seed + 1)
    tokens, parents, target, draft, uniforms = CASES[case](table, SAMPLES, g)
    out = accept(tokens, parents, target, draft, uniforms)
    pvalues = conditional_pvalues(emitted(tokens, *(t.cpu() for t in out)), table)
    assert len(pvalues) >= 2, pvalues   # deep enough: two emitted positions checked at least
    return min(pvalues)


STAT_BACKENDS = [pytest.param("reference", id="reference")] + [
    p for p in runnable_backends("tree_accept") if not (p.values[0] == "triton" and DEVICE.type == "cpu")]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_the_op_emits_the_target_distribution(backend, case):
    def accept(tokens, parents, target, draft, uniforms):
        move = lambda t: None if t is None else t.to(DEVICE)   # noqa: E731
        return ps_kernels.tree_accept(move(tokens), move(parents), move(target), mode="sample",
                                      draft_probs=move(draft), uniforms=move(uniforms), backend=backend)
    assert min_pvalue(accept, case) > 1e-4


# (name, [(text in the reference, replacement)]): each a known wrong rule
MUTATIONS = {
    "leaf bonus from the parent": [(
        "next_token[b] = sample_inverse_cdf(target[b, cur].double(), float(uniforms[b, 0]))",
        "next_token[b] = sample_inverse_cdf(target[b, path[-2]].double(), float(uniforms[b, 0]))")],
    "p instead of min(1, p/q)": [(
        "ratio = min(1.0, float(r[t] / total) / max(float(q[t]), 1e-30))",
        "ratio = float(r[t] / total)")],
    "no residual update (deterministic candidates)": [("r[t] = 0.0", "pass")],
    "no residual update (drawn candidates)": [(
        "r = torch.clamp(r / total - draft_probs[b, c].double(), min=0.0)", "pass")],
    "one uniform for all children": [(
        "if float(uniforms[b, c]) < ratio:", "if float(uniforms[b, kids[cur][0]]) < ratio:")],
    "unnormalised ratio (deterministic candidates)": [("ratio = float(r[t] / total)", "ratio = float(r[t])")],
    "unnormalised ratio (drawn candidates)": [(
        "ratio = min(1.0, float(r[t] / total) / max(float(q[t]), 1e-30))",
        "ratio = min(1.0, float(r[t]) / max(float(q[t]), 1e-30))")],
}


def mutated_reference(edits):
    """A copy of the reference module with the edits applied (each text must occur once)."""
    # the module (ps_kernels.reference re-exports its function under the same name)
    source = inspect.getsource(importlib.import_module("ps_kernels.reference.tree_accept"))
    for old, new in edits:
        assert source.count(old) == 1, f"the reference no longer holds {old!r}: update the mutation"
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader("mutated_tree_accept", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, "mutated_tree_accept", "exec"), module.__dict__)
    return module


def _reference_accept(module):
    def accept(tokens, parents, target, draft, uniforms):
        return module.tree_accept(tokens, parents, target, mode="sample", draft_probs=draft, uniforms=uniforms)
    return accept


def test_the_unmutated_copy_passes():
    """Positive control of the mutation machinery: the copy with no edit passes every setting."""
    module = mutated_reference([])
    for case in CASES:
        assert min_pvalue(_reference_accept(module), case) > 1e-4, case


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_wrong_rule_is_caught(name):
    """Each known wrong rule fails the check in at least one setting (p-value < 1e-6)."""
    module = mutated_reference(MUTATIONS[name])
    pvalues = {case: min_pvalue(_reference_accept(module), case) for case in CASES}
    assert min(pvalues.values()) < 1e-6, pvalues
