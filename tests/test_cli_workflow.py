"""A new user's path through the CLI, on a tiny random Llama saved to a folder with a tiny
tokenizer: `extract` on their own data -> `train` -> `load_drafter` -> `generate`, greedy output
equal to transformers'; every command's `main` once; the errors that say what to do."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parallelspec as ps
from parallelspec.tools import cli
from parallelspec.defaults import load_drafter
from parallelspec.drafters import ParallelDrafter

from engine_helpers import tiny_model
from test_cli import _word_tokenizer

VOCAB = 64
# a chat template in the tiny vocabulary: t1 <content> t2 per message, t3 opens the answer
CHAT_TEMPLATE = ("{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}"
                 "{% if add_generation_prompt %}t3{% endif %}")


def _save_model(path: Path, seed: int = 0, hidden: int | None = None):
    model, tok = tiny_model("llama", VOCAB, seed=seed), _word_tokenizer(VOCAB)
    if hidden is not None:      # another architecture: a model the shards / drafters were not made for
        import transformers as tf
        cfg = model.config.to_dict() | {"hidden_size": hidden}
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _user_data(path: Path, n: int = 24) -> Path:
    """The user's own file: chats ([{role, content}], some multi-turn) and plain prompts, as JSONL."""
    g = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(f"t{int(i)}" for i in torch.randint(4, VOCAB, (k,), generator=g))

    with open(path, "w") as f:
        for i in range(n):
            if i % 3 == 0:
                record = words(6)
            elif i % 3 == 1:
                record = [{"role": "user", "content": words(5)}]
            else:
                record = {"messages": [{"role": "system", "content": words(2)}, {"role": "user", "content": words(3)},
                                       {"role": "assistant", "content": words(4)}, {"role": "user", "content": words(3)}]}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """extract -> train once for the module's tests (a few seconds)."""
    root = tmp_path_factory.mktemp("workflow")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = _save_model(root / "model")
    data = _user_data(root / "chats.jsonl")
    shards, run = root / "shards", root / "run"
    assert cli.main(["extract", "--target", str(root / "model"), "--data", str(data), "--out", str(shards),
                     "--max-new-tokens", "16", "--shard-size", "8", "--held-out", "0.2", "--fp32"]) == 0
    assert cli.main(["train", "--target", str(root / "model"), "--data", str(shards), "--out", str(run),
                     "--steps", "6", "--batch", "4", "--warmup", "2", "--eval-every", "3", "--draft-vocab", "0",
                     "--device", "cpu"]) == 0
    torch.set_num_threads(threads)
    return {"root": root, "model": model, "tok": tok, "data": data, "shards": shards, "run": run}


def test_extract_train_load_generate_equals_transformers(workflow, capsys, one_thread):
    shards, run, model, tok = workflow["shards"], workflow["run"], workflow["model"], workflow["tok"]
    assert sorted(p.name for p in shards.glob("train-ext-*.pt")) and (shards / "target.json").exists()
    assert (run / "drafter" / "config.json").exists() and (run / "summary.json").exists()
    drafter = load_drafter(str(run), model)      # the run directory itself: its drafter/ is taken
    assert isinstance(drafter, ParallelDrafter)
    prompt = "t5 t9 t5 t9 t5 t1 t2"
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(ps.generate(model, ids, drafter, max_new_tokens=12), ref)
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(workflow["root"] / "model"), "--drafter", str(run), "--prompt", prompt,
                     "--max-new-tokens", "12", "--tree", "chain"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(ref[0, ids.shape[1]:]).strip()


def test_extract_reads_chats_and_plain_prompts(workflow):
    """Every record of the file is a prompt of one split: chats up to their last user turn in the
    chat template, plain prompts as a user turn; the target continued each (self-distillation)."""
    from parallelspec.tools.training.data import load_user_prompts
    tok = workflow["tok"]
    prompts = {tuple(p) for split in ("train", "heldout")
               for _, p, _ in load_user_prompts(tok, workflow["data"], split, held_out=0.2)}
    assert len(prompts) == 24
    shards = [torch.load(p) for p in sorted(workflow["shards"].glob("*-ext-*.pt"))]
    seqs = [(s["ids"][i].tolist(), s["start"][i]) for s in shards for i in range(len(s["ids"]))]
    assert {tuple(ids[:start]) for ids, start in seqs} == prompts
    multi = next(json.loads(line) for line in open(workflow["data"]) if '"messages"' in line)["messages"]
    want = tok.apply_chat_template(multi, tokenize=False, add_generation_prompt=True)
    assert tuple(tok(want, add_special_tokens=False).input_ids) in prompts
    model = workflow["model"]
    ids, start = seqs[0]
    ref = model.generate(torch.tensor([ids[:start]]), max_new_tokens=16, do_sample=False)
    assert ref[0].tolist() == ids


def test_extract_progress_and_estimate(tmp_path, capsys, monkeypatch, one_thread):
    """A line before anything slow, progress from the first decoding step, and a time estimate
    once 10 s have passed (a clock that moves 4 s a reading here)."""
    import types
    from parallelspec.tools.training import extract
    now = iter(range(0, 100000, 4))
    monkeypatch.setattr(extract, "time", types.SimpleNamespace(time=lambda: float(next(now))))
    _save_model(tmp_path / "model")
    data = _user_data(tmp_path / "d.jsonl", n=6)
    assert cli.main(["extract", "--target", str(tmp_path / "model"), "--data", str(data), "--out",
                     str(tmp_path / "s"), "--max-new-tokens", "4", "--shard-size", "4", "--fp32",
                     "--heldout-shards", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("loading the target")
    progress = [line for line in out if "prompts;" in line]
    assert "time estimate from the next line" in progress[0]
    assert any("s left" in line for line in progress[1:])
    assert not list((tmp_path / "s").glob("heldout-*"))


def test_extract_from_a_datasets_directory(tmp_path, monkeypatch, one_thread):
    """A `datasets` save_to_disk directory, read with datasets.load_from_disk (a stand-in module
    here when the package is not installed: it is not a dependency)."""
    import types
    rows = [{"messages": [{"role": "user", "content": "t4 t5 t6"}]}, {"prompt": "t7 t8"}]
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: {"train": rows}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    from parallelspec.tools.training.data import load_user_prompts
    (tmp_path / "ds").mkdir()
    tok = _word_tokenizer(VOCAB)
    tok.chat_template = CHAT_TEMPLATE
    got = [p for split in ("train", "heldout") for _, p, _ in load_user_prompts(tok, tmp_path / "ds", split)]
    want = [tok("t1 t4 t5 t6 t2 t3", add_special_tokens=False).input_ids,
            tok("t1 t7 t8 t2 t3", add_special_tokens=False).input_ids]
    assert sorted(got) == sorted(want)
    monkeypatch.setitem(sys.modules, "datasets", None)       # not installed: say so
    with pytest.raises(ValueError, match="--data: .* is a directory, read as a `datasets` dataset.*pip install datasets"):
        load_user_prompts(tok, tmp_path / "ds", "train")


# ---------------------------------------------------------------- errors that say what to do

def test_extract_data_errors(tmp_path, capsys, workflow):
    model = str(workflow["root"] / "model")
    assert cli.main(["extract", "--target", model, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert "--data: expected a JSONL file" in (err := capsys.readouterr().err) and "does not exist" in err
    (tmp_path / "empty.jsonl").write_text("")
    assert cli.main(["extract", "--target", model, "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "b")]) == 2
    assert "--data: no usable prompt in" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"answer": "t3"}\n')
    assert cli.main(["extract", "--target", model, "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "c")]) == 2
    assert "bad.jsonl:1 has keys ['answer']; expected" in capsys.readouterr().err


def test_extract_out_of_another_target_is_refused(tmp_path, capsys, workflow):
    _save_model(tmp_path / "other", hidden=32)
    assert cli.main(["extract", "--target", str(tmp_path / "other"), "--data", str(workflow["data"]),
                     "--out", str(workflow["shards"])]) == 2
    assert "--out: " in (err := capsys.readouterr().err) and "made for another target" in err


def test_train_errors(tmp_path, capsys, workflow):
    model, shards, run = str(workflow["root"] / "model"), str(workflow["shards"]), workflow["run"]
    assert cli.main(["train", "--target", model, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "--data: expected a directory of shards written by `parallelspec extract" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--target", model, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "--data: expected training shards (train-ext-NNNNN.pt)" in capsys.readouterr().err
    _save_model(tmp_path / "other", hidden=32)
    assert cli.main(["train", "--target", str(tmp_path / "other"), "--data", shards, "--out", str(tmp_path / "r")]) == 2
    assert "--data: the shards in" in (err := capsys.readouterr().err) and "made for another model" in err
    # the run's checkpoint is a parallel drafter at step 6
    args = ["train", "--target", model, "--data", shards, "--out", str(run), "--draft-vocab", "0"]
    assert cli.main(args + ["--kind", "eagle", "--steps", "8"]) == 2
    assert "--out: " in (err := capsys.readouterr().err) and "--kind parallel (now eagle)" in err
    assert cli.main(args + ["--steps", "6"]) == 2
    assert "--steps 6: the checkpoint in" in (err := capsys.readouterr().err) and "already at step 6" in err


def test_load_drafter_names_a_run_directory(tmp_path, workflow):
    (tmp_path / "logs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config.json .*`parallelspec train --out RUN` saves its "
                                                r"drafter in RUN/drafter"):
        load_drafter(str(tmp_path / "logs"), workflow["model"])


def test_shipped_drafter_on_another_model_suggests_what_to_use(tmp_path, capsys, workflow):
    from parallelspec.defaults import SHIPPED
    if not SHIPPED["parallel"].exists():
        pytest.skip("no shipped parallel drafter in this checkout")
    assert cli.main(["generate", "--model", str(workflow["root"] / "model"), "--prompt", "t4 t5",
                     "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "shipped 'parallel' drafter is trained for the embedded SmolLM2-135M-Instruct" in err
    assert "--drafter ngram" in err and "'none'" in err and "parallelspec train" in err


def test_generate_with_a_stock_generation_config_option(tmp_path, capsys, one_thread):
    """A generation_config.json with repetition_penalty 1.05 (as Qwen2.5-Instruct's): refused with
    the flags that get past it; with them, transformers' output with the option off."""
    model, tok = _save_model(tmp_path)
    model.generation_config.repetition_penalty = 1.05
    model.generation_config.save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--drafter", "ngram", "--prompt", "t5 t9 t5 t9",
            "--max-new-tokens", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "repetition_penalty=1.05 is set by the model's generation_config.json" in err
    assert "--ignore-unsupported-options" in err and "--generation-option repetition_penalty=1.0" in err
    ids = tok("t5 t9 t5 t9", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    want = tok.decode(ref[0, ids.shape[1]:]).strip()
    for extra in (["--ignore-unsupported-options"], ["--generation-option", "repetition_penalty=1.0"]):
        assert cli.main(argv + extra) == 0
        assert capsys.readouterr().out.strip() == want


# ---------------------------------------------------------------- every command's main

def test_help_does_not_import_torch():
    """`parallelspec --help` answers at once: the CLI module imports nothing heavy."""
    code = "import sys, parallelspec.tools.cli as c; c.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_main_on_a_tiny_model(monkeypatch, capsys, workflow, one_thread):
    monkeypatch.setattr(cli, "load_target", lambda path, dtype, device: (workflow["model"], workflow["tok"]))
    assert cli.main(["demo", "--drafter", "ngram", "--prompts", "1", "--max-new-tokens", "6", "--tree", "chain"]) == 0
    assert "outputs identical to transformers generate: yes" in capsys.readouterr().out


def test_bench_main_writes_to_a_user_directory(tmp_path, monkeypatch, capsys, workflow, one_thread):
    """bench without --out: ./parallelspec-bench in the current directory, never the checkout's results."""
    from parallelspec import models
    from parallelspec.tools import bench
    from parallelspec.tools.benchutil import RESULTS
    model, tok = workflow["model"], _word_tokenizer(VOCAB)
    tok.chat_template, tok.pad_token = CHAT_TEMPLATE, "t0"      # the batch-4 run pads
    monkeypatch.setattr(models, "load_default_target", lambda *a, **k: (model, tok))
    prompts = [tok(f"t{i} t9 t{i} t9 t5", return_tensors="pt").input_ids for i in range(4, 8)]
    monkeypatch.setattr(bench, "prompt_sets", lambda tok, n: {"chat": prompts, "code": prompts[:1], "long": prompts[:1]})
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime for p in Path(RESULTS).glob("e2e_cpu.*")}
    assert cli.main(["bench", "--methods", "hf_generate,plain_loop,ngram_chain", "--prompts", "1",
                     "--max-new-tokens", "6"]) == 0
    result = json.loads((tmp_path / "parallelspec-bench" / "e2e_cpu.json").read_text())
    # hf_generate is among the methods, so every row was compared with its output (None = not
    # compared), and is equal
    assert all(r["equal_to_hf"] is True for r in result["rows"]), result["rows"]
    assert {p: p.stat().st_mtime for p in Path(RESULTS).glob("e2e_cpu.*")} == before
    # --cpu-capability: transformers' methods once, ours once per level (NAME@level); the batch-4
    # run covers every level too
    from ps_kernels import _backend
    levels = _backend.runnable_cpu_levels()[:2]
    if levels:
        assert cli.main(["bench", "--methods", "hf_generate,plain_loop", "--prompts", "1", "--max-new-tokens", "6",
                         "--cpu-capability", ",".join(levels), "--out", str(tmp_path / "levels")]) == 0
        result = json.loads((tmp_path / "levels" / "e2e_cpu.json").read_text())
        want = {"hf_generate", *(f"plain_loop@{lv}" for lv in levels)}
        assert {r["method"] for r in result["rows"]} == want
        assert {r["method"] for r in result["batch4"]} == want
        assert all(r["equal_to_hf"] is True for r in result["rows"] + result["batch4"])


def test_report_main_on_the_workflow(workflow, capsys):
    from parallelspec.tools.training import report
    report.main(["--data", str(workflow["shards"]), "--curve", str(workflow["run"] / "summary.json")])
    out = capsys.readouterr().out
    assert "| step | tokens seen" in out and '"ngram"' in out


def test_train_checks_shards_and_runs_of_older_versions(tmp_path, capsys, workflow):
    """Shards without target.json and a run without run.json (made before those records existed)
    are still checked: feature width against the target, the network settings its summary kept."""
    import shutil
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(workflow["shards"], shards)
    (shards / "target.json").unlink()
    shutil.copytree(workflow["run"], run)
    (run / "run.json").unlink()
    _save_model(tmp_path / "other", hidden=32)
    assert cli.main(["train", "--target", str(tmp_path / "other"), "--data", str(shards), "--out", str(tmp_path / "r")]) == 2
    assert "features of width 64" in (err := capsys.readouterr().err) and "hidden_size is 32" in err
    assert cli.main(["train", "--target", str(workflow["root"] / "model"), "--data", str(shards), "--out", str(run),
                     "--k", "3", "--steps", "8", "--draft-vocab", "0"]) == 2
    assert "--k 4 (now 3)" in capsys.readouterr().err
