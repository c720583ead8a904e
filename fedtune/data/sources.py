"""Read raw records from .jsonl, .csv, .parquet and .txt files into one shape.

A record is either plain text (`{"text": …}`) or a conversation (`{"messages": [{"role", "content"}…]}`).
Instruction records (`instruction`, optional `input`, `output`) become a user turn and an assistant turn.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import BadInput

SUPPORTED = (".jsonl", ".csv", ".parquet", ".txt")


@dataclass
class Record:
    text: str | None = None
    messages: list[dict] | None = None

    def contents(self) -> list[str]:
        return [self.text] if self.text is not None else [m["content"] for m in self.messages or []]


def _from_mapping(row: dict, where: str) -> Record | None:
    """Turn one row into a Record; None for a row with nothing in it (counted as empty)."""
    if row.get("messages") is not None:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as err:
                raise BadInput(f"{where}: `messages` is not valid JSON ({err.msg})") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise BadInput(f"{where}: `messages` must be a list of {{role, content}} objects")
        return Record(messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    if row.get("instruction") is not None or row.get("output") is not None:
        instruction = str(row.get("instruction") or "")
        extra = str(row.get("input") or "")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Record(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row.get("output") or "")}])
    if "text" in row:
        return Record(text="" if row["text"] is None else str(row["text"]))
    raise BadInput(
        f"{where}: record has none of the fields text, instruction/output or messages "
        f"(found: {', '.join(sorted(row)) or 'nothing'})"
    )


def read_records(path: Path) -> Iterator[Record]:
    """Yield the records of one file in order."""
    if not path.is_file():
        raise BadInput(f"{path}: input file not found")
    try:
        yield from _read(path)
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BadInput(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise BadInput(f"{path}:{number}: each line must be a JSON object")
                yield _from_mapping(row, f"{path}:{number}")
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                yield _from_mapping(row, f"{path}:{number}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise BadInput(f"{path}: not a readable parquet file ({err})") from None
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield _from_mapping(row, str(path))
    elif suffix == ".txt":
        # Paragraphs (blank-line separated) are records.
        block: list[str] = []
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield Record(text="\n".join(block))
                    block = []
        if block:
            yield Record(text="\n".join(block))
    else:
        raise BadInput(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUPPORTED)}")
