"""`fedtune prepare`: raw files on a site → prepared/<site>/ (packed tokens + data card). Raw text never leaves."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedtune import models
from fedtune.artifacts import atomic_folder, read_json, sha256_file, stamp, write_json_atomic
from fedtune.config import FederationConfig
from fedtune.data.filters import length_verdict, normalized_key, scrub_record
from fedtune.data.sources import read_records
from fedtune.data.tokenize import IGNORE, pack, tokenize_record
from fedtune.errors import BadInput

CARD_FORMAT = "fedtune.data_card/1"


def _in_eval(key: str, fraction: float) -> bool:
    # The split depends only on the record's content, so it is the same on every run and in any order.
    return int(key[:8], 16) / 0xFFFFFFFF < fraction


def _write_split(path: Path, ids: np.ndarray, labels: np.ndarray) -> None:
    table = pa.table({
        "input_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
        "labels": pa.array(list(labels), type=pa.list_(pa.int32())),
    })
    pq.write_table(table, path)


def prepare_site(
    config: FederationConfig,
    site: str,
    inputs: list[Path],
    out: Path,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Read, filter, scrub, tokenize, pack and split one site's raw files; returns the data card.

    Args:
        config: the federation (model, seq_len, data settings).
        site: this site's roster name.
        inputs: raw files (.jsonl, .csv, .parquet, .txt).
        out: folder to write train.parquet, eval.parquet and data_card.json into.
        log: receives progress lines.
    """
    config.require_site(site, "prepare")
    if not inputs:
        raise BadInput("prepare: give at least one --input file")
    for path in inputs:
        if not Path(path).is_file():
            raise BadInput(f"{path}: input file not found")
    models.check_fingerprint(config.base_model.id, config.base_model.sha256, "prepare")
    tokenizer = models.load_tokenizer(config.base_model.id)
    settings = config.data

    dropped: Counter = Counter()
    pii: dict[str, int] = {}
    seen: set[str] = set()
    splits: dict[str, list] = {"train": [], "eval": []}
    sources, read = [], 0
    for path in map(Path, inputs):
        count = 0
        for record in read_records(path):
            count += 1
            verdict = length_verdict(record, settings.min_chars, settings.max_chars)
            if verdict:
                dropped[verdict] += 1
                continue
            # Scrub first: records that differ only in an email address are duplicates once scrubbed.
            record = scrub_record(record, pii)
            key = normalized_key(record)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            splits["eval" if _in_eval(key, settings.eval_fraction) else "train"].append((key, record))
        read += count
        sources.append({"name": path.name, "sha256": sha256_file(path), "records": count})
        log(f"{site}: read {count} records from {path.name}")

    kept = len(splits["train"]) + len(splits["eval"])
    if kept < 2:
        raise BadInput(f"prepare: only {kept} usable record(s) in {', '.join(map(str, inputs))}; need at least 2")
    if not splits["eval"]:  # a tiny site still gets a held-out record
        splits["train"].sort(key=lambda kr: kr[0])
        splits["eval"].append(splits["train"].pop(0))
    if not splits["train"]:
        splits["eval"].sort(key=lambda kr: kr[0])
        splits["train"].append(splits["eval"].pop())

    card_tokens, card_rows, tables = {}, {}, {}
    for name, items in splits.items():
        samples = [tokenize_record(tokenizer, record) for _key, record in items]
        ids, labels = pack(samples, config.seq_len, tokenizer.pad_token_id)
        tables[name] = (ids, labels)
        card_rows[name] = int(ids.shape[0])
        card_tokens[name] = {"total": int(sum(len(s[0]) for s in samples)), "trained": int((labels != IGNORE).sum())}
        log(f"{site}: {name}: {len(items)} records → {ids.shape[0]} sequences of {config.seq_len} tokens")

    card = {
        "format": CARD_FORMAT,
        "site": site,
        "sources": sources,
        "records": {"read": read, "kept": kept, "train": len(splits["train"]), "eval": len(splits["eval"])},
        "dropped": dict(sorted(dropped.items())),
        "pii_replaced": dict(sorted(pii.items())),
        "tokens": card_tokens,
        "sequences": card_rows,
        "seq_len": config.seq_len,
        "packing": "concatenate records with EOS, cut to seq_len, pad the last sequence",
        "eval_fraction": settings.eval_fraction,
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(tokenizer), "chat_template": bool(tokenizer.chat_template)},
        "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
        **stamp(),
    }
    with atomic_folder(out, replace=True) as tmp:
        for name, (ids, labels) in tables.items():
            _write_split(tmp / f"{name}.parquet", ids, labels)
        card["files"] = {f"{n}.parquet": sha256_file(tmp / f"{n}.parquet") for n in tables}
        write_json_atomic(tmp / "data_card.json", card)
    return card


def read_prepared(folder: Path, config: FederationConfig, split: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Load a prepared split after checking its card matches the federation; returns (card, ids, labels)."""
    card_path = folder / "data_card.json"
    card = read_json(card_path)
    if card.get("format") != CARD_FORMAT:
        raise BadInput(f"{card_path}: not a fedtune data card; run `fedtune prepare` first")
    if card.get("seq_len") != config.seq_len:
        raise BadInput(f"{card_path}: prepared at seq_len {card.get('seq_len')}, the federation uses {config.seq_len}; prepare again")
    if card.get("base_model", {}).get("sha256") != config.base_model.sha256:
        raise BadInput(f"{card_path}: prepared for another base model; prepare again with this federation's config")
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


