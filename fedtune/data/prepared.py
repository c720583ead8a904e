"""Read the prepared-data format that `fedtune prepare` writes: prepared/<site>/ holds train.parquet and
eval.parquet (packed rows of seq_len input_ids and labels) and data_card.json, which names the card format,
seq_len, base model and each file's sha256. Light on purpose: train-local imports it, and the heavy data
tooling (Presidio, datatrove, datasets) stays in `prepare`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fedtune.artifacts import read_json, sha256_file
from fedtune.config import FederationConfig
from fedtune.errors import BadInput

CARD_FORMAT = "fedtune.data_card/2"


def read_card(folder: Path, config: FederationConfig) -> dict:
    """A prepared folder's data card, checked to be of this format, seq_len and base model."""
    card_path = folder / "data_card.json"
    card = read_json(card_path)
    if card.get("format") != CARD_FORMAT:
        raise BadInput(f"{card_path}: not a data card of this fedtune version; run `fedtune prepare` again")
    if card.get("seq_len") != config.seq_len:
        raise BadInput(f"{card_path}: prepared at seq_len {card.get('seq_len')}, the federation uses {config.seq_len}; prepare again")
    if card.get("base_model", {}).get("sha256") != config.base_model.sha256:
        raise BadInput(f"{card_path}: prepared for another base model; prepare again with this federation's config")
    return card


def read_prepared(folder: Path, config: FederationConfig, split: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Load a prepared split after checking its card matches the federation; returns (card, ids, labels)."""
    card = read_card(folder, config)
    path = folder / f"{split}.parquet"
    if not path.is_file():
        raise BadInput(f"{path}: file not found; run `fedtune prepare` again")
    expected = card.get("files", {}).get(path.name)
    if expected and sha256_file(path) != expected:
        raise BadInput(f"{path}: contents do not match data_card.json (changed after prepare); prepare again")
    table = pq.read_table(path)
    columns = []
    for name in ("input_ids", "labels"):
        if name not in table.column_names:
            raise BadInput(f"{path}: column '{name}' missing; prepare again")
        flat = np.asarray(table.column(name).combine_chunks().flatten(), dtype=np.int64)
        if flat.size != table.num_rows * config.seq_len:
            raise BadInput(f"{path}: rows are not all {config.seq_len} tokens long; prepare again")
        columns.append(flat.reshape(table.num_rows, config.seq_len))
    return card, columns[0], columns[1]


EVAL_TASKS_FILE = "eval_tasks.parquet"


def read_eval_tasks(folder: Path, config: FederationConfig) -> tuple[dict, list[tuple[list[int], list[int]]] | None]:
    """The held-out generation tasks `prepare` wrote: (card, [(prompt_ids, answer_ids)]), in the file's order.

    The tasks are None for a folder prepared before fedtune wrote them (its card lists no eval_tasks.parquet); a
    file that is there but does not match its card's sha256 is refused.
    """
    card = read_card(folder, config)
    path = folder / EVAL_TASKS_FILE
    expected = card.get("files", {}).get(EVAL_TASKS_FILE)
    if expected is None:
        if path.exists():
            raise BadInput(f"{path}: not listed in data_card.json (written after prepare); prepare again")
        return card, None
    if not path.is_file():
        raise BadInput(f"{path}: file not found; run `fedtune prepare` again")
    if sha256_file(path) != expected:
        raise BadInput(f"{path}: contents do not match data_card.json (changed after prepare); prepare again")
    table = pq.read_table(path)
    if {"prompt_ids", "answer_ids"} - set(table.column_names):
        raise BadInput(f"{path}: columns prompt_ids and answer_ids expected; prepare again")
    return card, list(zip(table.column("prompt_ids").to_pylist(), table.column("answer_ids").to_pylist()))
