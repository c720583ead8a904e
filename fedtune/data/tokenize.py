"""Tokenize records (chat template for conversations, loss on the answers only) and pack to seq_len."""

from __future__ import annotations

import numpy as np

from fedtune.data.sources import Record
from fedtune.errors import BadInput

IGNORE = -100


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def tokenize_record(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) for one record; labels are IGNORE where no loss is taken."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    if not tokenizer.chat_template:
        raise BadInput("the base model's tokenizer has no chat template; give plain `text` records instead")
    messages = record.messages
    ids = _template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    # Each assistant turn is trained on: the tokens between the prompt that precedes it and the end of it.
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_template_ids(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return ids, labels


def pack(samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate samples and cut into rows of seq_len; the last row is padded (labels IGNORE), nothing dropped."""
    if not samples:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    ids = np.fromiter((t for s in samples for t in s[0]), dtype=np.int64)
    labels = np.fromiter((t for s in samples for t in s[1]), dtype=np.int64)
    rows = -(-len(ids) // seq_len)
    pad = rows * seq_len - len(ids)
    ids = np.concatenate([ids, np.full(pad, pad_id, np.int64)]).reshape(rows, seq_len)
    labels = np.concatenate([labels, np.full(pad, IGNORE, np.int64)]).reshape(rows, seq_len)
    return ids.astype(np.int32), labels.astype(np.int32)
