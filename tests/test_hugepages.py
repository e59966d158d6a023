"""parallelspec.hugepages: a model's weights moved into one 2 MiB-page mapping (what generate does
on the CPU once its calls have paid for it): the same Parameter objects, values, ties, shapes and
strides, laid out in parameter order; nothing moved while another call runs on the model, before
the move has paid, or when turned off; generate's output unchanged."""
import threading
import time

import pytest
import torch
import transformers as tf

from parallelspec import generate, hugepages

from engine_helpers import tiny_model

USABLE, WHY = hugepages.available()
needs_thp = pytest.mark.skipif(not USABLE, reason=f"huge pages unavailable: {WHY}")


@pytest.fixture
def any_size(monkeypatch):
    """Tiny test models are below MIN_BYTES: move them anyway."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)


@pytest.fixture
def pays_at_once(any_size, monkeypatch):
    """serving's rule with a move taken to cost nothing: a model moves at its first call after one
    that took any time."""
    monkeypatch.setattr(hugepages, "_rate", [1e18])


def tied_model():
    config = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def unique_params(model):
    return list({id(p): p for p in model.parameters()}.values())


@needs_thp
def test_move_keeps_parameters_values_ties_and_lays_them_out_in_order(any_size):
    model = tied_model()
    params = unique_params(model)
    before = [(p, p.detach().clone(), p.stride(), p.data_ptr()) for p in params]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    moved = hugepages.move(model)
    assert moved == sum(-(-p.numel() * p.element_size() // hugepages.ALIGN) * hugepages.ALIGN for p in params)
    assert unique_params(model) == params                          # the same objects, in the same order
    assert model.lm_head.weight is model.model.embed_tokens.weight    # still tied
    for p, value, stride, old in before:
        assert torch.equal(p, value) and p.stride() == stride and p.data_ptr() != old
    ptrs = [p.data_ptr() for p in params]
    assert ptrs[0] % hugepages.HUGE_PAGE == 0
    for p, nxt in zip(params, ptrs[1:]):    # one after another, each at a cache-line boundary
        assert nxt - p.data_ptr() == -(-p.numel() * p.element_size() // 64) * 64
    out = model(torch.arange(12).view(1, 12)).logits
    torch.manual_seed(0)
    torch.testing.assert_close(out, tied_model()(torch.arange(12).view(1, 12)).logits, rtol=0, atol=0)


@needs_thp
def test_moves_once_then_again_after_a_conversion(any_size):
    model = tiny_model()
    assert hugepages.move(model) > 0
    assert hugepages.move(model) == 0          # already there
    model.to(torch.bfloat16)                   # new storages (nn.Module._apply replaces .data)
    want = [p.detach().clone() for p in model.parameters()]
    assert hugepages.move(model) > 0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want))


@needs_thp
def test_leaves_shared_non_contiguous_and_small_models_alone(monkeypatch):
    model = tiny_model()
    q = model.model.layers[0].self_attn.q_proj.weight
    k = model.model.layers[0].self_attn.k_proj.weight
    big = torch.randn(q.numel() + 10)
    q.data = big[:q.numel()].view(q.shape)           # a view into a bigger storage
    k.data = k.data.t().contiguous().t()             # not contiguous
    shared = (q.data_ptr(), k.data_ptr())
    assert hugepages.move(model) == 0                # below MIN_BYTES
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    assert hugepages.move(model) > 0
    assert (q.data_ptr(), k.data_ptr()) == shared
    monkeypatch.setenv(hugepages.ENV, "0")
    other = tiny_model(seed=3)
    assert hugepages.move(other) == 0


@needs_thp
def test_the_mapping_is_backed_by_huge_pages():
    layer = torch.nn.Linear(2048, 2048)              # 16 MiB of fp32 weight: 8 huge pages
    assert hugepages.move(layer) > 0
    huge = hugepages.huge_bytes(layer.weight)
    if huge is None:
        pytest.skip("/proc/self/smaps reports no AnonHugePages here")
    assert huge >= hugepages.HUGE_PAGE, huge         # the kernel gave at least one 2 MiB page


@needs_thp
def test_serving_moves_once_the_calls_have_paid_for_it(any_size, monkeypatch):
    model = tiny_model()
    w = model.lm_head.weight
    bytes_ = sum(-(-p.numel() * p.element_size() // 64) * 64 for p in model.parameters())
    monkeypatch.setattr(hugepages, "_rate", [bytes_ / (0.05 * hugepages.SAVING)])   # paid by 0.05 s of calls
    ptr = w.data_ptr()
    with hugepages.serving(model):         # no time spent yet: nothing moves
        pass
    assert w.data_ptr() == ptr
    with hugepages.serving(model):
        time.sleep(0.06)                   # 0.06 s of calls x SAVING covers the move's cost
    assert w.data_ptr() == ptr
    with hugepages.serving(model):
        assert w.data_ptr() != ptr
    assert hugepages.move(model) == 0


@needs_thp
def test_no_move_while_another_call_runs_on_the_model(pays_at_once):
    model = tiny_model()
    w = model.model.layers[1].mlp.up_proj.weight
    with hugepages.serving(model):
        time.sleep(0.01)
    with hugepages.serving(model):
        moved = w.data_ptr()
        w.data = w.data.clone()                       # as if converted by another thread meanwhile
        with hugepages.serving(model):                # a second call: the first still runs
            assert w.data_ptr() != moved
            kept = w.data_ptr()
        assert w.data_ptr() == kept
        time.sleep(0.01)
    with hugepages.serving(model):                    # alone again: moved
        assert w.data_ptr() != kept
        assert hugepages.move(model) == 0


@needs_thp
def test_generate_moves_the_weights_and_its_output_is_unchanged(pays_at_once, one_thread):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ptr = model.lm_head.weight.data_ptr()
    assert torch.equal(generate(model, ids, max_new_tokens=12, do_sample=False, compile=False), want)
    assert model.lm_head.weight.data_ptr() == ptr     # the first call: nothing spent before it
    assert torch.equal(generate(model, ids, max_new_tokens=12, do_sample=False, compile=False), want)
    assert model.lm_head.weight.data_ptr() != ptr
    results, errors = [], []

    def run():
        try:
            for _ in range(3):
                results.append(generate(model, ids, max_new_tokens=12, do_sample=False, compile=False))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
    model.to(torch.float64).to(torch.float32)         # new storages: the next call moves them again
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert all(torch.equal(r, want) for r in results)
    assert hugepages.move(model) == 0                 # one of the calls moved them
