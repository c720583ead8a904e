"""Tokenize records (chat template for conversations, loss on the answers only) and pack to seq_len."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

import numpy as np

from fedtune.data.sources import Record
from fedtune.errors import BadInput
from fedtune.models import IGNORE


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def tokenize_record(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) for one record; labels are IGNORE where no loss is taken."""
    return tokenize_records(tokenizer, [record])[0]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
    """The rendered conversation and the character span of each assistant turn (from the end of the prompt
    that precedes it to the end of the turn, so the end-of-turn token is trained on and the model learns to
    stop). None when the template does not render prefixes as prefixes; the caller then goes token by token."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through)):
            return None
        spans.append((len(before), len(through)))
    return full, spans


def _tokenwise(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids = _template_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_template_ids(tokenizer, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_records(tokenizer, records: list[Record]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for each record, tokenized in one batched call per kind.

    Plain text is trained on entirely (and ends with EOS). A conversation goes through the chat template and
    only its assistant turns are trained on: each token that starts inside an answer's character span.
    """
    out: list = [None] * len(records)
    texts = [(i, r.text) for i, r in enumerate(records) if r.text is not None]
    if texts:
        encoded = tokenizer([t for _, t in texts], add_special_tokens=True)["input_ids"]
        for (i, _), ids in zip(texts, encoded):
            ids = list(ids) + [tokenizer.eos_token_id]
            out[i] = (ids, list(ids))
    chats = [(i, r.messages) for i, r in enumerate(records) if r.text is None]
    if chats and not tokenizer.chat_template:
        raise BadInput("the base model's tokenizer has no chat template; give plain `text` records instead")
    rendered = []
    for i, messages in chats:
        spans = _answer_spans(tokenizer, messages)
        if spans is None:
            out[i] = _tokenwise(tokenizer, messages)
        else:
            rendered.append((i, *spans))
    if rendered:
        encoded = tokenizer([full for _, full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for (i, _, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
            begins = [begin for begin, _end in offsets]  # non-decreasing: the tokens in text order
            labels = [IGNORE] * len(ids)
            for start, end in spans:
                first, last = bisect_left(begins, start), bisect_left(begins, end)
                labels[first:last] = ids[first:last]
            out[i] = (list(ids), labels)
    return out


class Packer:
    """Concatenates records (each ends with EOS) and cuts rows of seq_len as they fill; the last row is
    padded (labels IGNORE). Nothing is dropped. Full rows go to `write(ids, labels)` a block at a time, so
    a site's whole token stream is never in memory."""

    BLOCK_ROWS = 1024

    def __init__(self, seq_len: int, pad_id: int, write: Callable[[np.ndarray, np.ndarray], None] | None = None):
        self.seq_len, self.pad_id, self.write, self.rows = seq_len, pad_id, write, 0
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0

    def add(self, ids, labels) -> None:
        self._ids.append(np.asarray(ids, dtype=np.int32))
        self._labels.append(np.asarray(labels, dtype=np.int32))
        self._pending += len(self._ids[-1])
        if self._pending >= self.BLOCK_ROWS * self.seq_len:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        ids, labels = np.concatenate(self._ids), np.concatenate(self._labels)
        full = len(ids) // self.seq_len * self.seq_len
        if final and full < len(ids):
            pad = self.seq_len - (len(ids) - full)
            ids = np.concatenate([ids, np.full(pad, self.pad_id, np.int32)])
            labels = np.concatenate([labels, np.full(pad, IGNORE, np.int32)])
            full = len(ids)
        self._ids, self._labels = [ids[full:]], [labels[full:]]
        self._pending = len(ids) - full
        rows = full // self.seq_len
        if rows and self.write is not None:
            self.write(ids[:full].reshape(rows, self.seq_len), labels[:full].reshape(rows, self.seq_len))
        self.rows += rows

    def close(self) -> None:
        self._flush(final=True)


def pack(samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack samples in memory: (rows, seq_len) input_ids and labels."""
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    packer = Packer(seq_len, pad_id, lambda ids, labels: blocks.append((ids, labels)))
    for ids, labels in samples:
        packer.add(ids, labels)
    packer.close()
    if not blocks:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
