"""Read a site's raw inputs into Records, one row at a time, without loading a whole input into memory.

An input is a file (.jsonl, .csv, .parquet, .arrow, .txt) or a folder: a Hugging Face `datasets` folder
written by `save_to_disk`, or a folder of .parquet / .arrow shards. records.py turns each row into a Record.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from fedtune.artifacts import sha256_file
from fedtune.data.records import KNOWN_FIELDS, NO_KNOWN_FIELDS, Record, to_record
from fedtune.errors import BadInput

__all__ = ["SUPPORTED", "Record", "check_input", "input_sha256", "read_records"]

SUPPORTED = (".jsonl", ".csv", ".parquet", ".arrow", ".txt")
SHARDS = (".parquet", ".arrow")
BATCH = 4096


def check_input(path: Path) -> None:
    """Refuse an input that cannot be read, before any work starts.

    Raises:
        BadInput: the path is missing, has an unsupported suffix, or is a folder that is not a dataset.
    """
    if path.is_dir():
        _folder_parts(path)
    elif not path.is_file():
        raise BadInput(f"{path}: input file not found")
    elif path.suffix.lower() not in SUPPORTED:
        raise BadInput(f"{path}: unsupported file type '{path.suffix.lower()}'; use one of {', '.join(SUPPORTED)}, "
                       "a datasets save_to_disk folder or a folder of .parquet/.arrow shards")


def input_sha256(path: Path) -> str:
    """sha256 of an input file; of a folder, over each file's relative path and sha256, in path order."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def read_records(path: Path, columns: dict[str, str] | None = None) -> Iterator[Record]:
    """Yield the records of one input in order.

    Args:
        path: a file or a dataset folder (see check_input).
        columns: record part → column name (`prompt`, `response`, `text`, `messages`, `input`, `system`);
            None recognises the common formats by their field names. Paragraphs of a .txt file are always text.

    Raises:
        BadInput: an unreadable input, a mapped column the input lacks, or an input none of whose rows has a
            field fedtune knows (one line naming the fields found and how to map them).
    """
    check_input(path)
    if path.suffix.lower() == ".txt":
        columns = None
    rows = unknown = 0
    found: set[str] = set()
    try:
        for where, row in _rows(path):
            if rows == 0 and columns:
                _check_columns(path, row, columns)
            rows += 1
            record = to_record(row, columns, where)
            if record.drop == NO_KNOWN_FIELDS:
                unknown += 1
                found.update(map(str, row))
            yield record
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if rows and unknown == rows:
        shown = ", ".join(sorted(found)[:20]) + (", …" if len(found) > 20 else "")
        raise BadInput(f"{path}: no record has a field fedtune knows ({KNOWN_FIELDS}); found: {shown}. "
                       "Name your columns with --columns prompt=COL,response=COL (or text=COL, messages=COL) "
                       "or under data.columns in federation.yaml")


def _check_columns(path: Path, row: dict, columns: dict[str, str]) -> None:
    # The first row stands for the input's columns (a CSV header, a table's schema, a JSONL file's first object).
    missing = [f"'{column}' (for {part})" for part, column in columns.items() if column not in row]
    if missing:
        raise BadInput(f"{path}: column {', '.join(missing)} not found; columns present: {', '.join(map(str, row))}. "
                       "Fix --columns or data.columns")


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(place, row) pairs of one input; the place names the file and line or row for error messages."""
    if path.is_dir():
        kind, parts = _folder_parts(path)
        if kind == "dataset":
            yield from _dataset_rows(parts[0])
        else:
            for shard in parts:
                yield from _rows(shard)
        return
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
                yield f"{path}:{number}", row
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                yield f"{path}:{number}", row
    elif suffix == ".parquet":
        yield from _table_rows(path, _parquet_batches(path))
    elif suffix == ".arrow":
        yield from _table_rows(path, _arrow_batches(path))
    else:  # .txt: paragraphs (blank-line separated) are records
        block: list[str] = []
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield str(path), {"text": "\n".join(block)}
                    block = []
        if block:
            yield str(path), {"text": "\n".join(block)}


def _table_rows(path: Path, batches) -> Iterator[tuple[str, dict]]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", row


def _parquet_batches(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise BadInput(f"{path}: not a readable parquet file ({err})") from None
    yield from table.iter_batches(batch_size=BATCH)


def _arrow_batches(path: Path):
    """Record batches of an Arrow IPC file: the stream format `datasets` writes, or the random-access file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as err:
                raise BadInput(f"{path}: not a readable Arrow file ({err})") from None
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _folder_parts(folder: Path) -> tuple[str, list[Path]]:
    """What a folder input holds: ("dataset", [a save_to_disk folder]) or ("shards", [files in name order]).

    A DatasetDict folder with one split reads that split; with several, the site names the one to prepare, so
    a held-out test split is never trained on by accident.
    """
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError):
            raise BadInput(f"{folder}: dataset_dict.json is not a datasets split list; save the dataset again") from None
        if len(splits) == 1:
            return _folder_parts(folder / splits[0])
        raise BadInput(f"{folder}: a DatasetDict with splits {', '.join(splits) or '(none)'}; give the split to prepare, "
                       f"e.g. --input {folder / (splits or ['train'])[0]} (repeat --input for several)")
    if (folder / "state.json").is_file():
        return "dataset", [folder]
    shards = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SHARDS)
    if not shards:
        raise BadInput(f"{folder}: neither a datasets save_to_disk folder (state.json, dataset_info.json) nor a "
                       "folder of .parquet or .arrow shards; give a file or such a folder")
    return "shards", shards


def _dataset_rows(folder: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))  # memory-mapped: rows are read as they are iterated
    except Exception as err:  # datasets raises several types for a damaged or foreign folder
        raise BadInput(f"{folder}: not a readable datasets folder ({err})") from None
    yield from _table_rows(folder, dataset.with_format("arrow").iter(batch_size=BATCH))
