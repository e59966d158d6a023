"""The CLI's errors name the flag, what was expected and what came; drafters resolve by name."""
import pytest

from parallelspec.tools import cli
from parallelspec.defaults import load_drafter
from parallelspec.drafters import HybridDrafter, NgramDrafter

from engine_helpers import tiny_model


def test_bad_flag_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "0"])
    assert exc.value.code == 2
    assert "--max-new-tokens: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "hi", "--tree", "forest"])
    assert "invalid choice: 'forest'" in capsys.readouterr().err


def test_device_flag_is_checked(capsys):
    import torch
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "hi", "--device", "tpu9"])
    assert exc.value.code == 2
    assert "--device: expected cpu, cuda or cuda:N, got 'tpu9'" in capsys.readouterr().err
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for argv in (["generate", "--prompt", "hi", "--device", missing], ["bench", "--device", missing],
                 ["extract", "--device", missing], ["train", "--device", missing]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "--device: expected " in (err := capsys.readouterr().err) and f"got '{missing}'" in err


def _word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer over the words t0..t{vocab-1} (id i = word ti)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_generate_command_prints_hf_greedy_text(tmp_path, capsys, drafter):
    """`parallelspec generate --model DIR --device cpu` streams what transformers' greedy
    generate gives for the same model and prompt."""
    import torch
    model, tok = tiny_model("llama", 64), _word_tokenizer(64)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompt = "t5 t9 t5 t9 t5 t1 t2"
    code = cli.main(["generate", "--prompt", prompt, "--model", str(tmp_path), "--drafter", drafter,
                     "--device", "cpu", "--max-new-tokens", "12", "--stats"])
    assert code == 0
    out = capsys.readouterr()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    want = tok.decode(ref[0, ids.shape[1]:])
    assert out.out.strip() == want.strip()
    assert "12 tokens in" in out.err


def test_missing_model_directory(tmp_path, capsys):
    code = cli.main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")])
    assert code == 2
    assert "--model: expected a local model directory" in capsys.readouterr().err


def test_empty_prompt_is_refused(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("   "))
    assert cli.main(["generate"]) == 2
    assert "--prompt: expected a non-empty prompt" in capsys.readouterr().err


def test_load_drafter_by_name_and_bad_paths(tmp_path):
    model = tiny_model("llama", 128)
    assert load_drafter("none", model) is None
    assert isinstance(load_drafter("ngram", model), NgramDrafter)
    from parallelspec.defaults import NGRAM_TOKENS
    assert load_drafter("ngram", model).num_tokens == NGRAM_TOKENS
    assert load_drafter("ngram", model, ngram_tokens=3).num_tokens == 3
    with pytest.raises(FileNotFoundError, match="expected one of"):
        load_drafter(str(tmp_path / "missing"), model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_drafter(str(tmp_path / "empty"), model)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"kind": "medusa"}')
    with pytest.raises(ValueError, match="records kind 'medusa'"):
        load_drafter(str(tmp_path / "other"), model)


def test_shipped_drafters_refuse_another_target():
    from parallelspec.defaults import SHIPPED
    if not SHIPPED["parallel"].exists():
        pytest.skip("no shipped parallel drafter in this checkout")
    with pytest.raises(ValueError):
        load_drafter("parallel", tiny_model("llama", 128))


def test_hybrid_needs_drafters():
    with pytest.raises(TypeError, match="drafters: expected a non-empty list"):
        HybridDrafter([object()])


@pytest.mark.parametrize("command", [["demo", "--prompts", "1"], ["bench", "--quick"], ["export", "--format", "vllm", "a", "b"]])
def test_bad_cpu_level_variable_is_an_error_not_a_traceback(command):
    """PS_KERNELS_CPU_CAPABILITY naming no level: every command stops at once with exit code 2 and
    the variable's error (read before anything runs; a separate process, since the level is read
    once per process)."""
    import os
    import subprocess
    import sys

    import ps_kernels
    if ps_kernels.cpu_capability().active is None:
        pytest.skip("no native CPU library in this install: the variable is not read")
    env = {**os.environ, "PS_KERNELS_CPU_CAPABILITY": "avx3"}
    proc = subprocess.run([sys.executable, "-m", "parallelspec.tools.cli", *command], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"parallelspec {command[0]}: error: PS_KERNELS_CPU_CAPABILITY=avx3: expected one of" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_command_sampling_flags(tmp_path, capsys, monkeypatch):
    """--do-sample, --temperature, --top-k, --top-p, --seed and --dtype reach generate as given:
    the model in bf16, the sampling settings, and the seed (the same seed prints the same text, which
    is parallelspec.generate's draw after torch.manual_seed(seed), also when the auto tree measures
    its cost table on first use); without --do-sample the settings are said to be ignored and the
    output is greedy."""
    import torch

    import parallelspec
    model, tok = tiny_model("llama", 64), _word_tokenizer(64)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    calls = []
    real = parallelspec.generate

    def spy(model, ids, drafter, **kwargs):
        out = real(model, ids, drafter, **kwargs)
        calls.append((model, ids, drafter, kwargs, out[0]))
        return out
    monkeypatch.setattr(parallelspec, "generate", spy)
    from parallelspec.trees import verify_cost

    def measured(model, **kwargs):    # the auto tree's first-use measurement, fast: it draws random inputs
        torch.rand(1000)
        return {1: 1.0, 64: 1.5}
    monkeypatch.setattr(verify_cost, "measure_verify_cost", measured)
    flags = ["--do-sample", "--temperature", "1.5", "--top-k", "40", "--top-p", "0.95", "--dtype", "bf16"]
    base = ["generate", "--prompt", "t5 t9 t5 t9 t5 t1 t2", "--model", str(tmp_path), "--drafter", "ngram",
            "--device", "cpu", "--max-new-tokens", "16"]
    texts = []
    for seed in ("3", "3", "4"):
        assert cli.main(base + flags + ["--seed", seed]) == 0
        texts.append(capsys.readouterr().out.strip())
    loaded, ids, drafter, kwargs, out = calls[0]
    assert loaded.dtype == torch.bfloat16
    assert {k: kwargs[k] for k in ("do_sample", "temperature", "top_k", "top_p")} == \
        {"do_sample": True, "temperature": 1.5, "top_k": 40, "top_p": 0.95}
    assert texts[0] == texts[1] != texts[2]           # the seed decides the draw
    torch.manual_seed(3)
    again = real(loaded, ids, drafter, **{k: v for k, v in kwargs.items() if k != "streamer"})[0]
    assert torch.equal(again, out)
    assert texts[0] == tok.decode(out[0, ids.shape[1]:]).strip()

    assert cli.main(base + ["--temperature", "1.5", "--top-k", "40"]) == 0   # no --do-sample
    captured = capsys.readouterr()
    assert "--temperature, --top-k set without --do-sample" in captured.err
    assert calls[-1][3]["do_sample"] is False and "temperature" not in calls[-1][3]
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert captured.out.strip() == tok.decode(greedy[0, ids.shape[1]:]).strip()
