"""The CLI's errors name the flag, what was expected and what came; drafters resolve by name."""
import pytest

from parallelspec import cli
from parallelspec.defaults import load_drafter
from parallelspec.drafters import HybridDrafter, NgramDrafter

from engine_helpers import tiny_model


def test_bad_flag_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "0"])
    assert exc.value.code == 2
    assert "--max-new-tokens: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "hi", "--tree", "forest"])
    assert "invalid choice: 'forest'" in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    code = cli.main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")])
    assert code == 2
    assert "--model: expected a local model directory" in capsys.readouterr().err


def test_empty_prompt_is_refused(monkeypatch):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("   "))
    with pytest.raises(SystemExit, match="--prompt: expected a non-empty prompt"):
        cli.main(["generate"])


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
