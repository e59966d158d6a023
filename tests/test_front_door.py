"""The package as a new user meets it: an install without the native kernels says so (at install
and once at first use), the extras bring what the embedded model needs, and the README and docs
point at names and files that exist."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_KERNELS_")}
    env.update(extra)
    return env


def _build_ext(src: Path, **env):
    """`setup.py build_ext --inplace` in a copy of the build files, with no cmake on PATH (a ninja
    there, so that setup.py does not add the ninja package's folder, which may hold cmake too)."""
    tools = src / "bin"
    tools.mkdir(exist_ok=True)
    (tools / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (tools / "ninja").chmod(0o755)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True,
                          text=True, timeout=120, env=_env(PATH=str(tools), **env))


def test_build_without_cmake_says_so_and_require_native_fails(tmp_path):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "ps_kernels").mkdir()
    soft = _build_ext(tmp_path)
    assert soft.returncode == 0, soft.stderr[-2000:]
    assert "native CPU/CUDA kernels were NOT built: cmake not found on PATH" in soft.stderr
    assert "pip install cmake ninja" in soft.stderr
    note = json.loads((tmp_path / "ps_kernels" / "_native_build.json").read_text())
    assert note["status"] == "failed" and note["reason"] == "cmake not found on PATH"
    assert not list((tmp_path / "ps_kernels").glob("_C*.so"))

    hard = _build_ext(tmp_path, PS_KERNELS_REQUIRE_NATIVE="1")
    assert hard.returncode != 0
    assert "cmake not found on PATH" in hard.stderr

    skipped = _build_ext(tmp_path, PS_KERNELS_SKIP_NATIVE="1")
    assert skipped.returncode == 0 and "NOT built" not in skipped.stderr
    assert json.loads((tmp_path / "ps_kernels" / "_native_build.json").read_text())["status"] == "skipped"


_FIRST_USE = textwrap.dedent("""
    import json, warnings
    import torch
    import ps_kernels
    from ps_kernels import _backend
    here = _backend.Path(_backend.__file__).parent
    out = {}
    for case, note in (("no note", None), ("failed", {"status": "failed", "reason": "cmake not found on PATH",
                                                      "rebuild": "REBUILD-COMMAND"}),
                       ("skipped", {"status": "skipped", "reason": "built with PS_KERNELS_SKIP_NATIVE=1"})):
        if note is not None:
            (here / _backend.BUILD_NOTE).write_text(json.dumps(note))
        _backend.native_library.cache_clear()
        _backend._why_unavailable.cache_clear()
        _backend._select.cache_clear()
        _backend._warned_missing = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, w = torch.randn(3, 8), torch.randn(5, 8)
            for _ in range(3):   # several ops, several calls: one warning
                ps_kernels.skinny_linear(x, w)
                ps_kernels.backends()
        out[case] = {"warnings": [str(c.message) for c in caught if c.category is _backend.NativeLibraryWarning],
                     "cpu": ps_kernels.backends()["cpu"]}
    print(json.dumps(out))
""")


def test_missing_native_library_warns_once_at_first_use(tmp_path):
    """A copy of ps_kernels without its native library, as an install without cmake leaves it."""
    shutil.copytree(ROOT / "ps_kernels", tmp_path / "ps_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "_native_build.json", "__pycache__"))
    run = subprocess.run([sys.executable, "-c", _FIRST_USE], capture_output=True, text=True, timeout=300,
                         env=_env(PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    (plain,) = out["no note"]["warnings"]
    assert "native CPU/CUDA kernels are missing" in plain and "no _C*.so" in plain
    assert "pip install cmake ninja" in plain
    (failed,) = out["failed"]["warnings"]
    assert "at install: cmake not found on PATH" in failed and failed.endswith("REBUILD-COMMAND")
    assert "cmake not found on PATH" in out["failed"]["cpu"]
    assert out["skipped"]["warnings"] == []      # skipped on purpose: said by backends() only
    assert "PS_KERNELS_SKIP_NATIVE=1" in out["skipped"]["cpu"]


def test_model_extra_brings_what_the_embedded_model_loads_with():
    """transformers loads the embedded GGUF model only with gguf and accelerate installed."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {e: {re.split(r"[<>=;\[ ]", r)[0] for r in reqs} for e, reqs in extras.items()}
    assert {"gguf", "accelerate"} <= names["model"]
    assert set().union(*(v for k, v in names.items() if k != "all")) == names["all"]


def _readme():
    return (ROOT / "README.md").read_text()


def test_readme_is_a_front_page():
    assert len(_readme().splitlines()) <= 120


def test_readme_python_names_exist():
    """Every `ps.NAME` and `from parallelspec.X import Y` of the README's Python blocks exists."""
    import importlib

    import parallelspec as ps
    code = "\n".join(re.findall(r"```python\n(.*?)```", _readme(), flags=re.S))
    assert code, "the README has a Python example"
    for name in set(re.findall(r"\bps\.(\w+)", code)):
        assert name in ps.__all__, f"README uses ps.{name}, not exported by parallelspec"
    for module, names in re.findall(r"from (parallelspec[\w.]*) import ([\w, ]+)", code):
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"README imports {name.strip()} from {module}"


def test_doc_links_resolve():
    """Relative links of the README and docs/ point at files that exist."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("python/parallelspec/assets/*/TRAINING.md")),
             ROOT / "benchmarks" / "results" / "README.md", *sorted((ROOT / "benchmarks" / "results" / "variants").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


# -- the command line as a new user meets it ------------------------------------------------------

def _cli(argv, capsys):
    from parallelspec.tools import cli
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_flag(capsys):
    import pytest

    import parallelspec
    from parallelspec.tools import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"parallelspec {parallelspec.__version__}"


def test_empty_prompt_exits_2_before_loading_a_model(monkeypatch, capsys):
    from parallelspec.tools import cli
    monkeypatch.setattr(cli, "load_target", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    code, _, err = _cli(["generate", "--prompt", "  "], capsys)
    assert code == 2 and "--prompt: expected a non-empty prompt" in err


def test_sampling_flags_without_do_sample_warn(monkeypatch, capsys):
    from parallelspec.tools import cli

    class Loaded(Exception):
        pass
    monkeypatch.setattr(cli, "load_target", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    import pytest
    with pytest.raises(Loaded):
        cli.main(["generate", "--prompt", "hi", "--temperature", "0.5", "--top-k", "3"])
    err = capsys.readouterr().err
    assert "--temperature, --top-k set without --do-sample" in err
    with pytest.raises(Loaded):
        cli.main(["generate", "--prompt", "hi", "--temperature", "0.5", "--do-sample"])
    assert "without --do-sample" not in capsys.readouterr().err


def test_bad_count_names_the_flag_once(capsys):
    import pytest

    from parallelspec.tools import cli
    for argv, flag in ((["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
                       (["extract", "--out", "x", "--shard-size", "0"], "--shard-size")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]     # the error line (the usage lists flags)
        assert exit_.value.code == 2 and err.count(flag) == 1 and "expected an integer >= 1, got 0" in err, err


def test_help_shows_defaults_and_no_docstring_leftovers(capsys):
    import pytest

    from parallelspec.tools import cli
    for command in ("generate", "extract", "train", "export"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "Returns the exit code" not in out and "(default:" in out, command


def test_extract_says_why_there_is_no_held_out_split_and_names_the_target_next(tmp_path, capsys):
    """A small prompt set leaves the held-out split empty: extract says so (train will not evaluate)
    and its "next:" line carries --target for the user's own model."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_cli_workflow import _save_model   # the tiny model + tokenizer the workflow tests use
    torch.manual_seed(0)
    _save_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i}"}) + "\n" for i in range(3)))
    code, out, err = _cli(["extract", "--target", str(tmp_path / "model"), "--data", str(data), "--out",
                           str(tmp_path / "shards"), "--max-new-tokens", "4", "--held-out", "0.0001", "--fp32"], capsys)
    assert code == 0, err
    assert "no prompt fell in the held-out split" in out
    assert f"next: parallelspec train --target {tmp_path / 'model'} --data {tmp_path / 'shards'}" in out
