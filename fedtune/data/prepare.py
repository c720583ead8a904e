"""`fedtune prepare`: raw files on a site → prepared/<site>/ (packed tokens + data card). Raw text never leaves.

The records stream through on-disk Arrow tables (datasets), so memory stays bounded whatever the input size:
  read → filter, scrub PII, fingerprint (workers) → exact and near dedup (one pass over keys and signatures)
  → tokenize (workers) → pack into seq_len rows, written as they fill.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedtune import models
from fedtune.artifacts import (
    atomic_folder,
    sha256_file,
    stamp,
    write_json_atomic,
)
from fedtune.config import ColumnMap, FederationConfig
from fedtune.data.contract import (
    check_tokenizer,
    contract_record,
    pii_not_scanned,
    pii_policy,
    site_pii_settings,
)
from fedtune.data.dedup import near_duplicates
from fedtune.data.prepared import CARD_FORMAT
from fedtune.data.sources import check_input, input_sha256, read_records
from fedtune.data.tokenize import EVAL_TASKS_FILE, PACKING, pack_to_parquet, write_eval_tasks
from fedtune.errors import BadInput
from fedtune.privacy.canaries import CANARIES_FILE, make_canaries, plant, secret_format_for, write_canaries

# Below this many records per process, starting worker processes costs more than it saves.
MIN_RECORDS_PER_PROCESS = 4096
BATCH = 1000
# The record-level DP-SGD ledger train-local keeps in a prepared folder (fedtune.privacy.local.LEDGER_FILE): what
# the site's records have spent, so preparing the folder again keeps it.
PRIVACY_LEDGER = "privacy_ledger.json"


def _in_eval(keys: np.ndarray, fraction: float) -> np.ndarray:
    # The split depends only on the record's content, so it is the same on every run and in any order.
    return (keys & 0xFFFFFFFF) / 0x100000000 < fraction


def _generate(sources: list[tuple[int, str]], columns: dict[str, str] | None):
    # datasets splits a list in gen_kwargs into shards (one call per file), so each path carries its own
    # index: enumerate() here would number every file 0.
    for index, path in sources:
        for record in read_records(Path(path), columns):
            messages = None if record.messages is None else json.dumps(record.messages, ensure_ascii=False)
            # A row the reader could not use keeps its place with its reason, so the card counts it.
            yield {"text": record.text, "messages": messages, "source": index, "drop": record.drop}


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that would lose something: a file, or a folder with files in it (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: --out is a file; give a folder to write the prepared data into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"{out}: --out already holds files; give --overwrite to replace them, or a new folder")


def _read_site_deny_list(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not Path(path).is_file():
        raise BadInput(f"{path}: deny-list file not found (one term per line, # for comments)")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _array(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _batches(dataset, columns: list[str]):
    """The dataset's record batches, read from its Arrow files with plain reads rather than through the
    memory map, so pages already read do not stay resident in this process (a multi-GB input stays
    out of its memory)."""
    files = [f["filename"] for f in dataset.cache_files]
    if not files:  # an in-memory dataset
        yield from dataset.select_columns(columns).with_format("arrow").iter(batch_size=65536)
        return
    for name in files:
        with pa.OSFile(name) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.select(columns)


def _histogram(lengths: np.ndarray) -> dict[str, int]:
    """Record lengths in tokens, in power-of-two bins."""
    if not len(lengths):
        return {}
    top = max(16, 1 << int(np.ceil(np.log2(max(1, lengths.max())))))
    edges = [0] + [1 << k for k in range(4, int(np.log2(top)) + 1)]
    counts = np.histogram(lengths, bins=np.array(edges) + 0.5)[0]
    return {f"{lo + 1}-{hi}": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}


def _processes(requested: int, records: int) -> int | None:
    procs = max(1, min(requested, records // MIN_RECORDS_PER_PROCESS))
    return procs if procs > 1 else None


def prepare_site(
    config: FederationConfig,
    site: str,
    inputs: list[Path],
    out: Path | None,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    dry_run: bool = False,
    num_proc: int | None = None,
    deny_list: Path | None = None,
    ner_model: Path | None = None,
    pii_countries: list[str] | None = None,
    pii_entities: list[str] | None = None,
    pii_patterns: dict[str, str] | None = None,
    model_dir: Path | None = None,
    columns: ColumnMap | None = None,
    overwrite: bool = False,
    canaries: int = 0,
    canary_repeats: int = 1,
) -> dict:
    """Read, filter, scrub, dedup, tokenize, pack and split one site's raw files; returns the data card.

    Args:
        config: the federation (model, seq_len, data settings, contract).
        site: this site's roster name.
        inputs: raw files (.jsonl, .csv, .parquet, .arrow, .txt) or dataset folders (save_to_disk, shards).
        out: folder to write train.parquet, eval.parquet and data_card.json into (unused on a dry run).
        log: receives progress lines.
        dry_run: compute the data card only; nothing is written.
        num_proc: worker processes (default: the machine's cores).
        deny_list: this site's own file of terms to redact (names, project codes), one per line.
        ner_model: a local token-classification model folder or a spaCy pipeline; person names it finds become
            <PERSON>.
        pii_countries, pii_entities, pii_patterns: this site's additions to the federation's data.pii (a site
            may scrub more than the federation asks, never less).
        model_dir: the folder holding this site's copy of the base model (else FEDTUNE_MODEL_DIR or its id).
        columns: which of the inputs' columns hold each record part; replaces the federation's data.columns.
        overwrite: replace an `out` folder that already holds files (else it is refused before any work). A
            privacy_ledger.json in it is kept (preparing again must not reset the site's DP budget).
        canaries: plant this many random secret records in the training split (after filtering, scrubbing and
            dedup, so none is removed) and keep them in canaries.json (mode 0600), for `fedtune audit`.
        canary_repeats: copies of each canary planted.

    Under privacy.mode local, records are packed whole (none spans two sequences): a sequence is DP-SGD's unit.
    """
    # Presidio, datatrove and the language model load here, not at import: train-local imports fedtune.data.prepared,
    # and the package imports this module.
    from fedtune.data.pii import PiiPolicy
    from fedtune.data.stages import Plan, analyze_batch, prepare_tools, tokenize_batch

    config.require_site(site, "prepare")
    if canaries < 0 or canary_repeats < 1:
        raise BadInput(f"prepare: --canaries {canaries} --canary-repeats {canary_repeats}: give a count of 0 or "
                       "more and at least 1 copy of each")
    if not inputs:
        raise BadInput("prepare: give at least one --input file")
    for path in inputs:
        check_input(Path(path))
    columns = columns or config.data.columns
    if out is None and not dry_run:
        raise BadInput("prepare: give --out (or --dry-run to only print the data card)")
    if not dry_run:
        _check_out(Path(out), overwrite)
    site_terms = _read_site_deny_list(deny_list)
    pii_settings = site_pii_settings(config.data.pii, pii_countries, pii_entities, pii_patterns)
    weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "prepare")
    tokenizer = models.load_tokenizer(weights)
    fingerprint, template_sha = models.tokenizer_fingerprint(tokenizer), models.chat_template_sha(tokenizer)
    check_tokenizer(config, fingerprint, template_sha, "prepare")
    settings = config.data
    plan = Plan(
        min_chars=settings.min_chars, max_chars=settings.max_chars, languages=list(settings.languages),
        language_min_score=settings.language_min_score, language_min_letters=settings.language_min_letters,
        quality=list(settings.quality),
        pii=PiiPolicy.of(pii_settings, site_terms, str(ner_model) if ner_model else None),
        near=settings.dedup.near, ngram=settings.dedup.ngram, num_perm=settings.dedup.num_perm,
        model_dir=str(weights),
    )
    # Built here once (a bad --ner-model folder is refused before any work starts); forked workers inherit them.
    prepare_tools(plan, tokenizer)
    requested = num_proc or min(8, os.cpu_count() or 1)
    started = time.perf_counter()

    import datasets
    from datasets.exceptions import DatasetGenerationError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked; each tokenizes on its own
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="fedtune-prepare-") as work:
        log(f"{site}: reading {', '.join(Path(p).name for p in inputs)}")
        try:
            raw = datasets.Dataset.from_generator(
                _generate, gen_kwargs={"sources": [(i, str(p)) for i, p in enumerate(inputs)],
                                       "columns": columns.mapping() if columns else None}, cache_dir=work,
                features=datasets.Features({"text": datasets.Value("string"), "messages": datasets.Value("string"),
                                            "source": datasets.Value("int32"), "drop": datasets.Value("string")}),
            )
        except DatasetGenerationError as err:
            cause = err.__cause__ or err.__context__
            if isinstance(cause, BadInput):
                raise cause from None
            raise
        read = len(raw)
        log(f"{site}: {read} records read ({time.perf_counter() - started:.1f} s); filtering, scrubbing PII, fingerprinting")
        features = datasets.Features({
            "text": datasets.Value("string"), "messages": datasets.Value("string"), "source": datasets.Value("int32"),
            "drop": datasets.Value("string"), "key": datasets.Value("int64"), "lang": datasets.Value("string"),
            "pii": datasets.Value("string"), "signature": datasets.Sequence(datasets.Value("uint32")),
        })
        analyzed = raw.map(
            analyze_batch, batched=True, batch_size=BATCH, num_proc=_processes(requested, read),
            fn_kwargs={"plan": plan}, features=features, remove_columns=raw.column_names,
            cache_file_name=str(Path(work) / "analyzed.arrow"), new_fingerprint=f"analyze-{time.time_ns()}",
        )
        log(f"{site}: records analyzed ({time.perf_counter() - started:.1f} s); removing duplicates")
        keep, keys, dropped, sources_count, pii, languages = _select(analyzed, settings, Path(work), log, site)
        log(f"{site}: duplicates removed ({time.perf_counter() - started:.1f} s); tokenizing")
        in_eval = _in_eval(keys[keep], settings.eval_fraction)
        splits = {"train": keep[~in_eval], "eval": keep[in_eval]}
        if len(keep) < 2:
            why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v) or "none"
            raise BadInput(f"prepare: only {len(keep)} usable record(s) in {', '.join(map(str, inputs))} "
                           f"(dropped: {why}); need at least 2")
        if not len(splits["eval"]):  # a tiny site still gets a held-out record
            splits = {"train": keep[1:], "eval": keep[:1]}
        if not len(splits["train"]):
            splits = {"train": keep[:-1], "eval": keep[-1:]}

        card_tokens, card_rows, histograms, cut = {}, {}, {}, {}
        staging = Path(work) / "out"
        staging.mkdir()
        whole = config.privacy.mode == "local"
        secret_format = secret_format_for(tokenizer) if canaries else None
        planted = make_canaries(canaries, canary_repeats, secret_format) if canaries else []
        canary_rows: list[int] = []
        for name, rows in splits.items():
            source, positions = analyzed.select(rows).select_columns(["text", "messages"]), []
            if name == "train" and planted:
                source, positions = plant(source, planted)
                log(f"{site}: train: {len(planted)} canaries planted, {canary_repeats} copies of each")
            tokenized = source.map(
                tokenize_batch, batched=True, batch_size=BATCH, num_proc=_processes(requested, len(rows)),
                fn_kwargs={"plan": plan}, remove_columns=["text", "messages"],
                cache_file_name=str(Path(work) / f"tokens-{name}.arrow"), new_fingerprint=f"tok-{name}-{time.time_ns()}",
                features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                            "labels": datasets.Sequence(datasets.Value("int32"))}),
            )
            target = None if dry_run else staging / f"{name}.parquet"
            packed = pack_to_parquet(_batches(tokenized, ["input_ids", "labels"]), target, config.seq_len,
                                     tokenizer.pad_token_id, whole_records=whole, watch=positions)
            card_rows[name], card_tokens[name], cut[name] = packed.rows, packed.tokens, packed.cut_records
            histograms[name] = np.delete(packed.lengths, positions)  # the card describes the site's own records
            if positions:
                canary_rows = packed.watched_rows
            log(f"{site}: {name}: {len(rows)} records → {card_rows[name]} sequences of {config.seq_len} tokens "
                f"({time.perf_counter() - started:.1f} s)")

        held_out = analyzed.select(splits["eval"]).select_columns(["messages"]).iter(batch_size=BATCH)
        eval_tasks = write_eval_tasks((m for batch in held_out for m in batch["messages"]), tokenizer,
                                      None if dry_run else staging / EVAL_TASKS_FILE)
        record_lengths = np.concatenate(list(histograms.values()))
        policy = pii_policy(config, len(site_terms), ner_model is not None, pii_settings)
        card = {
            "format": CARD_FORMAT,
            "site": site,
            "sources": [{"name": Path(p).name, "sha256": input_sha256(Path(p)), "records": int(sources_count.get(i, 0))}
                        for i, p in enumerate(inputs)],
            "records": {"read": read, "kept": len(keep), "train": len(splits["train"]),
                        "eval": len(splits["eval"])},
            "dropped": {k: v for k, v in sorted(dropped.items()) if v},  # reasons that dropped something
            "pii_replaced": dict(sorted(pii.items())),
            "pii_not_scanned": pii_not_scanned(pii_settings, ner_model is not None),
            "languages": languages,
            "tokens": card_tokens,
            "token_lengths": {"histogram": _histogram(record_lengths),
                              "mean": round(float(record_lengths.mean()), 1) if len(record_lengths) else 0,
                              "max": int(record_lengths.max()) if len(record_lengths) else 0},
            "sequences": card_rows,
            "seq_len": config.seq_len,
            "packing_mode": "whole-records" if whole else "concatenate",
            "packing": PACKING["whole-records" if whole else "concatenate"],
            **({"records_cut_to_seq_len": cut} if whole else {}),
            # How many, never which: the secrets and prompts stay in canaries.json.
            "canaries": {"count": canaries, "repeats": canary_repeats if canaries else 0},
            "eval_fraction": settings.eval_fraction,
            "eval_tasks": eval_tasks,
            "filters": {"min_chars": settings.min_chars, "max_chars": settings.max_chars,
                        "languages": list(settings.languages), "quality": list(settings.quality),
                        "dedup": settings.dedup.model_dump(mode="json")},
            "contract": contract_record(config, fingerprint, template_sha, card_tokens["train"]["trained"], policy),
            "tokenizer": {"fingerprint": fingerprint, "chat_template": bool(tokenizer.chat_template)},
            "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
            "seconds": round(time.perf_counter() - started, 2),
            **stamp(),
        }
        if dry_run:
            return card
        ledger = Path(out) / PRIVACY_LEDGER
        with atomic_folder(out, replace=True, private=(CANARIES_FILE, PRIVACY_LEDGER)) as tmp:
            for name in splits:  # the work folder may be on another file system than --out
                shutil.move(staging / f"{name}.parquet", tmp / f"{name}.parquet")
            shutil.move(staging / EVAL_TASKS_FILE, tmp / EVAL_TASKS_FILE)
            written = [f"{n}.parquet" for n in splits] + [EVAL_TASKS_FILE]
            card["files"] = {name: sha256_file(tmp / name) for name in written}
            write_json_atomic(tmp / "data_card.json", card)
            if planted:
                write_canaries(tmp / CANARIES_FILE, site, planted, canary_rows, card["files"]["train.parquet"],
                               secret_format)
            if ledger.is_file():  # copied last (mode included), so a round trained meanwhile is not lost
                shutil.copy2(ledger, tmp / PRIVACY_LEDGER)
    return card


def _select(analyzed, settings, work: Path, log, site: str):
    """One pass over the analyzed records' drop reasons, keys, signatures, languages and PII counts: returns
    the rows kept (in reading order), every row's key and the card's counts. Exact duplicates are found by
    key, then near-duplicates among the distinct records by their MinHash signatures (spilled to a file, not
    held in memory)."""
    n = len(analyzed)
    dropped, sources, dropped_langs = Counter(), Counter(), Counter()
    passing = np.zeros(n, dtype=bool)
    keys = np.zeros(n, dtype=np.int64)
    lang_codes, lang_of = np.zeros(n, dtype=np.int16), {}  # each row's language, as a small code
    pii_of: dict[int, str] = {}  # PII counts (JSON) of the passing rows that had any
    num_perm = settings.dedup.num_perm
    sig_path = work / "signatures.u32"
    with open(sig_path, "wb") as sig_file:
        start = 0
        for batch in _batches(analyzed, ["drop", "key", "source", "signature", "lang", "pii"]):
            size = batch.num_rows
            drops = batch.column("drop").to_pylist()
            langs = batch.column("lang").to_pylist()
            sources.update(batch.column("source").to_pylist())
            keys[start:start + size] = batch.column("key").to_numpy()
            ok = np.array([d == "" for d in drops], dtype=bool)
            passing[start:start + size] = ok
            lang_codes[start:start + size] = [lang_of.setdefault(lang, len(lang_of)) for lang in langs]
            for i, (d, lang, counts) in enumerate(zip(drops, langs, batch.column("pii").to_pylist())):
                if d:
                    dropped[d] += 1
                    if d == "language":
                        dropped_langs[lang] += 1
                elif counts:
                    pii_of[start + i] = counts
            if settings.dedup.near and ok.any():
                sig = _array(batch.column("signature")).filter(pa.array(ok)).flatten().to_numpy()
                sig_file.write(sig.astype(np.uint32).tobytes())
            start += size

    rows = np.flatnonzero(passing)
    if settings.dedup.exact and len(rows):
        _, first = np.unique(keys[rows], return_index=True)
        unique = np.zeros(len(rows), dtype=bool)
        unique[first] = True
        dropped["duplicate"] += int((~unique).sum())
    else:
        unique = np.ones(len(rows), dtype=bool)
    if settings.dedup.near and unique.sum() > 1:
        sig = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(len(rows), num_perm))
        positions = np.flatnonzero(unique)
        near = near_duplicates(sig, positions, settings.dedup.threshold)
        unique[positions[near]] = False
        dropped["near_duplicate"] += int(near.sum())
        del sig
    keep = rows[unique]
    shown = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v) or "none"
    log(f"{site}: {len(keep)} records kept; dropped: {shown}")

    # The card counts what reached the tokens: the kept records' languages and replacements.
    names = {code: lang for lang, code in lang_of.items()}
    kept_langs = Counter({names[code]: int(count) for code, count in
                          zip(*np.unique(lang_codes[keep], return_counts=True))})
    pii = Counter()
    for row in keep.tolist():
        if row in pii_of:
            pii.update(json.loads(pii_of[row]))
    languages = {"kept": dict(kept_langs.most_common()), "dropped": dict(dropped_langs.most_common())}
    return keep, keys, dropped, sources, pii, languages
