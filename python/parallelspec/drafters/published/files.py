"""Where a published drafter's files are and how they are read: a local directory or a Hugging
Face repo id (``huggingface_hub``: its local cache, or a download where the machine is online),
config.json, and the weights (safetensors, one file or sharded; or ``.bin`` read with
``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects).

Every failure names the file, the argument it came from and what to do."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
BINARIES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve(source, arg: str = "drafter") -> Path:
    """A local directory, or a repo id ("owner/name") resolved through huggingface_hub: the local
    cache first, then a download. Offline with nothing cached: a FileNotFoundError that says to
    download it elsewhere and pass the directory."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{arg}: expected a drafter directory (config.json + weights), got the file {source!r}")
    text = str(source)
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "~")):
        raise FileNotFoundError(f"{arg}: {source!r} is not a directory and not a Hugging Face repo id "
                                "(owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise FileNotFoundError(f"{arg}: {source!r} is not a local directory, and huggingface_hub (which resolves "
                                "repo ids) is not installed; download the repo and pass its directory") from None
    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:
        raise FileNotFoundError(
            f"{arg}: {source!r} is not a local directory, is not in the Hugging Face cache, and could not be "
            f"downloaded from the Hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"This machine may be offline: download it where the Hub is reachable (`huggingface-cli download "
            f"{text} --local-dir DIR`), copy DIR here and pass the directory: load_drafter('DIR', model) or "
            "--drafter DIR") from None


def read_config(path: Path, arg: str = "drafter") -> dict:
    config = path / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{arg}: {path} has no config.json; a published drafter directory holds config.json "
                                f"and its weights ({', '.join(SAFETENSORS + BINARIES)})")
    try:
        return json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{arg}: {config} is not valid JSON ({exc}); the file is damaged: download it again") from None


def weight_files(path: Path, arg: str = "drafter") -> list[Path]:
    """The weight files of a directory, safetensors preferred over .bin; a sharded checkpoint's
    index lists its shards."""
    for single, index in (SAFETENSORS, BINARIES):
        if (path / index).exists():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError, AttributeError) as exc:
                raise ValueError(f"{arg}: {path / index} is not a readable weight index ({type(exc).__name__}: "
                                 f"{exc}); download it again") from None
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise FileNotFoundError(f"{arg}: {path / index} lists shards missing from {path}: {missing}; the "
                                        "download is incomplete: download it again")
            return [path / s for s in shards]
        if (path / single).exists():
            return [path / single]
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{arg}: {path} holds no weights: expected one of {', '.join(SAFETENSORS + BINARIES)}, "
                            f"found {found}")


def tensor_names(files: list[Path], arg: str = "drafter") -> list[str]:
    """The tensor names, without reading the tensors where the format allows (safetensors)."""
    names = []
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(f), framework="pt") as handle:
                    names += list(handle.keys())
            except Exception as exc:
                raise _unreadable(f, arg, exc) from None
        else:
            names += list(read_tensors([f], arg))
    return names


def read_tensors(files: list[Path], arg: str = "drafter") -> dict[str, torch.Tensor]:
    """Every tensor of the files (on the CPU, as stored)."""
    out = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                part = load_file(str(f))
            else:
                part = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _unreadable(f, arg, exc) from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ValueError(f"{arg}: {f} does not hold a dict of tensors (got {type(part).__name__}); expected a "
                             "state dict as the publisher saves it")
        out.update(part)
    return out


def _unreadable(f: Path, arg: str, exc: Exception) -> ValueError:
    size = f.stat().st_size if f.exists() else 0
    if f.suffix == ".safetensors":
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return ValueError(f"{arg}: {f} ({size} bytes) is not a readable safetensors file ({why}); it is truncated or "
                          "damaged: download it again")
    if isinstance(exc, __import__("pickle").UnpicklingError):
        return ValueError(f"{arg}: {f} ({size} bytes) is not a readable PyTorch weights file: it holds objects other "
                          "than tensors, and parallelspec reads .bin files with weights_only=True only (it never "
                          "unpickles arbitrary objects); it is truncated or damaged, or not a weights file: download "
                          "it again, or convert it to safetensors where you trust it")
    why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ValueError(f"{arg}: {f} ({size} bytes) is not a readable PyTorch weights file ({why}); it is truncated or "
                      "damaged: download it again")
