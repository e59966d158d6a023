"""What the commands share: the target and device arguments and prompt encoding."""
from __future__ import annotations

import argparse


def load_target(path: str | None, dtype: str = "fp32", device="cpu"):
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct when path is None, else a local
    transformers checkpoint directory; the model on `device`."""
    from pathlib import Path

    import torch

    from .. import models
    check_target_dir(path, "--model")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return models.load_target(path, torch_dtype, device)


def check_target_dir(path: str | None, flag: str = "--target") -> None:
    """Refuse, before any work, a target parallelspec does not run: `path`'s config.json alone is
    read (no weights) and checked by parallelspec.hf.check_target. None is the embedded default
    (a llama). Errors (FileNotFoundError, ValueError) name `flag`. Every command calls it first."""
    from pathlib import Path

    if path is None:
        return
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{flag}: expected a local model directory (config.json + weights), got {path!r}")
    from transformers import AutoConfig

    from ..hf import check_target
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag}: expected a transformers model directory with a readable config.json, got "
                         f"{path!r} ({exc})") from None
    try:
        check_target(config)
    except ValueError as exc:
        raise ValueError(f"{flag} {path}: {exc}") from None


def encode_prompt(tokenizer, text: str, chat: bool):
    import torch
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def int_at_least(low: int = 1):
    """argparse type: an integer >= low (argparse names the flag in its message)."""
    def parse(value):
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default and keeps the description's line breaks."""


def device_arg(text: str):
    """argparse type of --device: cpu, cuda or cuda:N, checked against what torch sees here."""
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"--device: expected cpu on this machine (torch sees no CUDA GPU), got {text!r}")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"--device: expected cuda:0..cuda:{count - 1} (torch sees {count} GPU(s)), got {text!r}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    return device
