"""What the commands share: the target and device arguments and prompt encoding."""
from __future__ import annotations

import argparse


def load_target(path: str | None, dtype: str = "fp32", device="cpu"):
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct when path is None, else a local
    transformers checkpoint directory; the model on `device`."""
    from pathlib import Path

    import torch

    from .. import models
    if path is not None and not Path(path).is_dir():
        raise FileNotFoundError(f"--model: expected a local model directory (config.json + weights), got {path!r}")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return models.load_target(path, torch_dtype, device)


def encode_prompt(tokenizer, text: str, chat: bool):
    import torch
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def _positive(name):
    def parse(value):
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {value!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {v}")
        return v
    return parse


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
