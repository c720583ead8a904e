"""Tokenize records (chat template for conversations, loss on the answers only) and pack them into rows of seq_len."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedtune.data.prepared import EVAL_TASKS_FILE
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


# The data card's description of each way of packing (its packing_mode).
PACKING = {
    "concatenate": "concatenate records with EOS, cut to seq_len, pad the last sequence",
    "whole-records": "concatenate whole records with EOS while they fit; a record that does not fit starts the next "
                     "sequence (the previous one padded); a record longer than seq_len is cut to seq_len",
}


class Packer:
    """Packs records into rows of seq_len, written to `write(ids, labels)` a block of rows at a time, so a site's
    whole token stream is never in memory. Each record ends with EOS (or its template's end of turn).

    concatenate (the default): records run on across rows and a row is cut wherever seq_len falls; only the
    last row is padded (labels IGNORE), so nothing is dropped and no token is padding but the last row's.
    whole_records: a record goes into the current row only if it fits in what is left of it; otherwise the row
    is padded and the record starts the next one, and a record longer than seq_len is cut to seq_len. No record
    then spans two rows, which record-level DP-SGD needs: a row is its unit of privacy (one clipped gradient), and a
    record split across two rows would move two of them, twice the sensitivity its accountant assumes.
    """

    BLOCK_ROWS = 1024

    def __init__(self, seq_len: int, pad_id: int, write: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 whole_records: bool = False):
        self.seq_len, self.pad_id, self.write, self.whole_records = seq_len, pad_id, write, whole_records
        self.rows = 0  # rows written so far (all of them after close)
        # whole_records: records cut to seq_len, the tokens cut off them and how many of those were trained on
        self.cut_records = self.cut_tokens = self.cut_trained = 0
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0
        self._offset = 0  # concatenate: tokens added so far (where the next record starts in the stream)
        self._block = self._block_labels = None  # whole_records: the block of rows being filled
        self._row = self._used = 0  # whole_records: the row being filled in the block, and its tokens so far

    def add(self, ids, labels, lengths=None) -> np.ndarray:
        """Add records: `ids` and `labels` are their tokens back to back, `lengths` each one's token count (None:
        one record). Returns the first and last row of each record, [records, 2]."""
        ids, labels = np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)
        lengths = np.asarray([len(ids)] if lengths is None else lengths, dtype=np.int64)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"record lengths add up to {int(lengths.sum())}, not the {len(ids)} tokens given")
        if self.whole_records:
            return self._add_whole(ids, labels, lengths)
        starts = self._offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        spans = np.stack([starts // self.seq_len, (starts + np.maximum(lengths, 1) - 1) // self.seq_len], axis=1)
        self._offset += len(ids)
        self._ids.append(ids)
        self._labels.append(labels)
        self._pending += len(ids)
        if self._pending >= self.BLOCK_ROWS * self.seq_len:
            self._flush(final=False)
        return spans

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

    def _add_whole(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        spans = np.zeros((len(lengths), 2), dtype=np.int64)
        start = 0
        for i, length in enumerate(lengths.tolist()):
            take = min(length, self.seq_len)
            if take < length:
                self.cut_records += 1
                self.cut_tokens += length - take
                self.cut_trained += int((labels[start + take:start + length] != IGNORE).sum())
            if self._block is None:
                self._new_block()
            elif self._used + take > self.seq_len:  # does not fit: the rest of this row stays padding
                self._next_row()
            row = self._row
            self._block[row, self._used:self._used + take] = ids[start:start + take]
            self._block_labels[row, self._used:self._used + take] = labels[start:start + take]
            self._used += take
            spans[i] = self.rows + row
            start += length
        return spans

    def _new_block(self) -> None:
        self._block = np.full((self.BLOCK_ROWS, self.seq_len), self.pad_id, np.int32)
        self._block_labels = np.full((self.BLOCK_ROWS, self.seq_len), IGNORE, np.int32)
        self._row = self._used = 0

    def _next_row(self) -> None:
        self._row, self._used = self._row + 1, 0
        if self._row == self.BLOCK_ROWS:
            self._write_block(self.BLOCK_ROWS)
            self._new_block()

    def _write_block(self, rows: int) -> None:
        if rows and self.write is not None:
            self.write(self._block[:rows], self._block_labels[:rows])
        self.rows += rows

    def close(self) -> None:
        if not self.whole_records:
            self._flush(final=True)
        elif self._block is not None:
            self._write_block(self._row + (self._used > 0))
            self._block = self._block_labels = None


def pack(samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
         whole_records: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pack samples in memory: (rows, seq_len) input_ids and labels (see Packer for the two ways)."""
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    packer = Packer(seq_len, pad_id, lambda ids, labels: blocks.append((ids, labels)), whole_records)
    for ids, labels in samples:
        packer.add(ids, labels)
    packer.close()
    if not blocks:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


@dataclass
class PackedSplit:
    """What packing one split produced: its rows, its token counts, each record's length (in the order added),
    the rows that hold the records asked about, and (whole_records) the records cut to seq_len."""

    rows: int
    tokens: dict
    lengths: np.ndarray
    watched_rows: list[int]
    cut_records: int = 0


def _parquet_writer(path: Path):
    """A Packer sink that appends (rows, seq_len) arrays to a parquet file of input_ids and labels."""
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    writer = pq.ParquetWriter(path, schema)

    def write(ids: np.ndarray, labels: np.ndarray) -> None:
        offsets = pa.array(np.arange(len(ids) + 1, dtype=np.int32) * ids.shape[1])
        writer.write_table(pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.reshape(-1))),
        }))

    return write, writer.close


def pack_to_parquet(batches: Iterable, target: Path | None, seq_len: int, pad_id: int, *,
                    whole_records: bool = False, watch: Iterable[int] = ()) -> PackedSplit:
    """Pack Arrow record batches of tokenized records (list columns input_ids and labels, one record a row) into
    `target` (nothing written when None). `watch` names records by their place in the stream; the rows they
    land in are returned (the audit leaves the rows that hold canaries out of its membership test)."""
    write, close = _parquet_writer(target) if target is not None else (None, lambda: None)
    packer = Packer(seq_len, pad_id, write, whole_records)
    watch = np.asarray(sorted(set(watch)), dtype=np.int64)
    total = trained = seen = 0
    lengths, watched = [], set()
    for batch in batches:
        ids_col, labels_col = _arrow(batch.column("input_ids")), _arrow(batch.column("labels"))
        ids = ids_col.flatten().to_numpy().astype(np.int32)
        labels = labels_col.flatten().to_numpy().astype(np.int32)
        offsets = ids_col.offsets.to_numpy()
        sizes = np.diff(offsets - offsets[0])
        spans = packer.add(ids, labels, sizes)
        here = watch[(watch >= seen) & (watch < seen + len(sizes))] - seen
        for first, last in spans[here].tolist():
            watched.update(range(first, last + 1))
        seen += len(sizes)
        lengths.append(sizes)
        total += len(ids)
        trained += int((labels != IGNORE).sum())
    packer.close()
    close()
    # What was cut off a long record (whole_records) is not in the rows, so it is not counted.
    tokens = {"total": total - packer.cut_tokens, "trained": trained - packer.cut_trained}
    return PackedSplit(packer.rows, tokens, np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                       sorted(watched), packer.cut_records)


def _arrow(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


# Held-out generation tasks (`evaluate`'s task metrics): at most this many of the eval split's conversations are
# kept, in the split's order; task metrics sample far fewer (evaluate --task-examples).
MAX_EVAL_TASKS = 1000
# A task's prompt keeps its last, and its answer its first, this many tokens (a few MB per site at most).
MAX_TASK_TOKENS = 1024


def generation_task(tokenizer, messages: list[dict] | None,
                    max_tokens: int) -> tuple[list[int], list[int], bool] | None:
    """The generation task of one held-out record, as tokens (a prepared folder never holds raw text): the
    conversation rendered up to and including the generation prompt of its last assistant turn (cut on the left to
    `max_tokens`), that turn's text tokenized alone (cut on the right to `max_tokens`), and whether either was cut.
    None for a record with no assistant turn (plain text)."""
    if not messages:
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    prompt = _template_ids(tokenizer, messages[:last], generation_prompt=True) if last else []
    answer = list(tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"])
    cut = len(prompt) > max_tokens or len(answer) > max_tokens
    return prompt[-max_tokens:], answer[:max_tokens], cut


def write_eval_tasks(conversations: Iterable[str | None], tokenizer, target: Path | None) -> dict:
    """Write the generation tasks of a held-out split's records (each one's `messages` as JSON, None for plain
    text) to `target` as parquet, prompt_ids and answer_ids (lists of int32), at most MAX_EVAL_TASKS of them in the
    split's order (nothing written when None); returns what the data card says of them."""
    tasks, records, answered, cut = [], 0, 0, 0
    for raw in conversations:
        records += 1
        messages = json.loads(raw) if raw is not None else []
        if not any(m["role"] == "assistant" for m in messages):
            continue
        answered += 1
        if len(tasks) < MAX_EVAL_TASKS:
            prompt, answer, was_cut = generation_task(tokenizer, messages, MAX_TASK_TOKENS)
            tasks.append((prompt, answer))
            cut += was_cut
    if target is not None:
        schema = pa.schema([("prompt_ids", pa.list_(pa.int32())), ("answer_ids", pa.list_(pa.int32()))])
        pq.write_table(pa.table({"prompt_ids": [p for p, _ in tasks], "answer_ids": [a for _, a in tasks]},
                                schema=schema), target)
    return {"count": len(tasks), "file": EVAL_TASKS_FILE, "max": MAX_EVAL_TASKS, "without_answer": records - answered,
            "cut_to_max_tokens": cut, "max_tokens": MAX_TASK_TOKENS,
            "about": "the last assistant turn of each held-out conversation and its prompt through the chat template, "
                     "as tokens; plain-text records give none"}
