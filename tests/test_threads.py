"""Two generate calls on one model at the same time: parallelspec.generate in some threads and
transformers' own generate in others give each caller transformers' output, and the model is
left as it was (its config's attention implementation and class, its nn.Linear modules), also
when a call raises mid-way."""
import threading

import pytest
import torch
from torch import nn

import parallelspec as ps
from engine_helpers import hf_greedy, left_padded, tiny_model

VOCAB = 256
NEW = 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_model("llama", VOCAB)
    ids, mask = left_padded([5, 9, 1, 7], VOCAB)
    return model, ids, mask, hf_greedy(model, ids, mask, NEW)


def _untouched(model, config_class, implementation):
    """The model as transformers left it: no parallelspec state on it."""
    assert type(model.config) is config_class
    assert model.config._attn_implementation == implementation
    assert not [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" in m.__dict__]


def _run_in_threads(jobs):
    """Start the jobs together (a barrier), return {name: output or the exception raised}."""
    barrier = threading.Barrier(len(jobs))
    results = {}

    def run(name, job):
        barrier.wait()
        try:
            results[name] = job()
        except BaseException as e:   # noqa: BLE001 - reported to the test
            results[name] = e

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _network_drafter(model, net=None):
    from parallelspec.drafters import build_network

    net = net or build_network(model, parallel=True, depth=3, seed=2)
    return ps.HybridDrafter([ps.NgramDrafter(num_tokens=3), ps.ParallelDrafter(net, top_m=4)]), net


def test_concurrent_calls_give_each_caller_transformers_output(setup):
    """Per trial: two threads in parallelspec.generate (n-gram; and two hybrid drafters sharing
    one network, so its linears are routed by two threads at once) and two in transformers'
    generate, each looping a few calls; every output is transformers' greedy output."""
    model, ids, mask, reference = setup
    config_class, implementation = type(model.config), model.config._attn_implementation
    for trial in range(3):
        first, net = _network_drafter(model)
        second, _ = _network_drafter(model, net)

        def ours(drafter, tree):
            return lambda: [ps.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=NEW, tree=tree)
                            for _ in range(2)]

        def theirs():
            return [hf_greedy(model, ids, mask, NEW) for _ in range(3)]

        results = _run_in_threads({"ngram": ours(ps.NgramDrafter(), "dynamic"), "hybrid-1": ours(first, "chain"),
                                   "hybrid-2": ours(second, "dynamic"), "hf-1": theirs, "hf-2": theirs})
        for name, outs in results.items():
            assert not isinstance(outs, BaseException), f"trial {trial}, {name}: raised {outs!r}"
            for out in outs:
                assert torch.equal(out, reference), f"trial {trial}, {name}: output differs from transformers'"
        _untouched(model, config_class, implementation)


class _Boom(Exception):
    pass


class _RaisingCriterion:
    """A StoppingCriteria that raises after `after` calls."""

    def __init__(self, after):
        self.after, self.calls = after, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise _Boom("stopping criterion raised")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _RaisingStreamer:
    """A streamer that raises at its third put (mid-way through the decoding loop)."""

    def __init__(self):
        self.puts = 0

    def put(self, value):
        self.puts += 1
        if self.puts == 3:
            raise _Boom("streamer raised")

    def end(self):
        pass


def test_exception_mid_call_leaves_the_model_usable(setup):
    """A stopping criterion or a streamer raising inside the loop: the exception reaches the
    caller, and the model is transformers' again (config, class, linears; plain generate equal
    to before), alone and while another thread is inside parallelspec.generate."""
    from transformers import StoppingCriteriaList

    model, ids, mask, reference = setup
    config_class, implementation = type(model.config), model.config._attn_implementation
    with pytest.raises(_Boom):
        ps.generate(model, ids, ps.NgramDrafter(), attention_mask=mask, max_new_tokens=NEW,
                    stopping_criteria=StoppingCriteriaList([_RaisingCriterion(after=2)]))
    _untouched(model, config_class, implementation)
    torch.testing.assert_close(hf_greedy(model, ids, mask, NEW), reference, rtol=0, atol=0)
    with pytest.raises(_Boom):
        ps.generate(model, ids[1:2], _network_drafter(model)[0], max_new_tokens=NEW, streamer=_RaisingStreamer())
    _untouched(model, config_class, implementation)
    torch.testing.assert_close(hf_greedy(model, ids, mask, NEW), reference, rtol=0, atol=0)

    # one thread raises while another decodes: the other's output is right, and the model is
    # restored only once both have ended
    results = _run_in_threads({
        "raises": lambda: ps.generate(model, ids, ps.NgramDrafter(), attention_mask=mask, max_new_tokens=NEW,
                                      stopping_criteria=StoppingCriteriaList([_RaisingCriterion(after=1)])),
        "decodes": lambda: [ps.generate(model, ids, _network_drafter(model)[0], attention_mask=mask,
                                        max_new_tokens=NEW) for _ in range(2)],
        "hf": lambda: hf_greedy(model, ids, mask, NEW)})
    assert isinstance(results["raises"], _Boom), results["raises"]
    for out in results["decodes"] + [results["hf"]]:
        assert torch.equal(out, reference)
    _untouched(model, config_class, implementation)
    torch.testing.assert_close(hf_greedy(model, ids, mask, NEW), reference, rtol=0, atol=0)
