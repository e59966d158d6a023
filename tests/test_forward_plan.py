"""The attention plan made once per forward (hf/target.py): where the backends take one, every
layer's tree_attention call gets the plan of its window, made once per forward pass, not once per
layer, and the output is unchanged. On a CPU the plan is checked by the op and changes nothing,
so the path is exercised here by planning on the CPU too."""
import torch

import ps_kernels
import parallelspec as ps
from parallelspec.hf import target as target_module

from engine_helpers import hf_greedy, tiny_model


def test_one_plan_per_forward_and_window(monkeypatch):
    model = tiny_model("llama", 64, layers=3)
    ids = torch.tensor([[5, 9, 5, 9, 5, 3, 7]])
    mask = torch.ones_like(ids)
    want = hf_greedy(model, ids, mask, 10)

    made, planned_calls = [], []
    real_plan, real_attention = ps_kernels.attention_plan, ps_kernels.tree_attention

    def plan(*args, **kwargs):
        made.append(kwargs["rows"])
        return real_plan(*args, **kwargs)

    def attention(*args, plan=None, **kwargs):
        planned_calls.append(plan)
        return real_attention(*args, plan=plan, **kwargs)
    monkeypatch.setattr(target_module, "PLANNED_DEVICES", ("cpu",))
    monkeypatch.setattr(ps_kernels, "attention_plan", plan)
    monkeypatch.setattr(ps_kernels, "tree_attention", attention)
    out, stats = ps.generate(model, ids, ps.NgramDrafter(num_tokens=3), attention_mask=mask, max_new_tokens=10,
                             tree="chain", return_stats=True)
    assert torch.equal(out, want)
    forwards = len(made)
    assert forwards >= stats.steps and len(planned_calls) == 3 * forwards     # one plan per forward, 3 layers
    assert all(p is not None for p in planned_calls)


def test_no_plan_on_the_cpu_by_default(monkeypatch):
    model = tiny_model("llama", 64, layers=2)
    ids = torch.tensor([[5, 9, 5, 9]])
    plans = []
    real_attention = ps_kernels.tree_attention
    monkeypatch.setattr(ps_kernels, "tree_attention", lambda *a, plan=None, **k: plans.append(plan) or real_attention(*a, **k))
    ps.generate(model, ids, None, max_new_tokens=3)
    assert plans and all(p is None for p in plans)
