"""The per-record work of `prepare`, run a batch at a time in worker processes (datasets `map` with num_proc).

The analyzer, language model, filters and tokenizer are built once per process (`prepare_tools`) and kept for
every batch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from fedtune.data.dedup import exact_key, normalize, signatures
from fedtune.data.pii import PiiPolicy, PiiScrubber
from fedtune.data.quality import (
    UNDETERMINED,
    LanguageFilter,
    QualityFilters,
    length_verdict,
)
from fedtune.data.sources import Record


@dataclass
class Plan:
    """Everything a worker needs, as plain values (it is sent to each worker process)."""

    min_chars: int
    max_chars: int
    languages: list[str]
    language_min_score: float
    language_min_letters: int
    quality: list[str]
    pii: PiiPolicy | None
    near: bool
    ngram: int
    num_perm: int
    model_dir: str = ""


@dataclass
class _Tools:
    language: LanguageFilter
    quality: QualityFilters
    scrubber: PiiScrubber | None
    tokenizer: object = None


# The one plan this process serves and its tools. prepare builds them in the parent before the workers are
# forked, so each worker starts with them instead of loading the analyzer, models and tokenizer again.
_SERVING: dict[str, object] = {}


def prepare_tools(plan: Plan, tokenizer=None) -> _Tools:
    key = repr(plan)
    if _SERVING.get("plan") != key:
        _SERVING.clear()
        _SERVING["plan"] = key
        _SERVING["tools"] = _Tools(
            language=LanguageFilter(plan.languages, plan.language_min_letters, plan.language_min_score),
            quality=QualityFilters(plan.quality),
            scrubber=PiiScrubber(plan.pii) if plan.pii is not None else None,
        )
    tools = _SERVING["tools"]
    if tokenizer is not None:
        tools.tokenizer = tokenizer
    return tools


def to_record(text: str | None, messages: str | None) -> Record:
    return Record(text=text) if messages is None else Record(messages=json.loads(messages))


def _record_parts(record: Record) -> list[str]:
    if record.messages is not None:
        return [f"{m['role']}\x1f{m['content']}" for m in record.messages]
    return [record.text or ""]


def analyze_batch(batch: dict, plan: Plan) -> dict:
    """Filter, scrub and fingerprint a batch: returns the scrubbed records with their drop reason ("" keeps),
    exact-duplicate key, detected language, PII counts (JSON) and MinHash signature."""
    tools = prepare_tools(plan)
    out: dict[str, list] = {k: [] for k in ("text", "messages", "source", "drop", "key", "lang", "pii", "signature")}
    normalized_kept: list[tuple[int, str]] = []
    rows = zip(batch["text"], batch["messages"], batch["source"], batch["drop"])
    for i, (text, messages, source, read_drop) in enumerate(rows):
        record = to_record(text, messages)
        # A row the reader could not use arrives with its reason (e.g. unknown_role) and stays dropped.
        drop = read_drop or length_verdict(record, plan.min_chars, plan.max_chars)
        lang = UNDETERMINED
        if drop is None:
            joined = "\n".join(record.contents())
            drop, lang = tools.language.verdict(joined)
            if drop is None:
                drop = tools.quality.verdict(joined)
        counts: Counter = Counter()
        if drop is None and tools.scrubber is not None:
            scrub = tools.scrubber.scrub
            if record.text is not None:
                record = Record(text=scrub(record.text, counts))
            else:
                record = Record(messages=[{"role": m["role"], "content": scrub(m["content"], counts)}
                                          for m in record.messages])
        normalized = normalize(_record_parts(record))
        if drop is None and plan.near:
            normalized_kept.append((i, normalized))
        out["text"].append(record.text)
        out["messages"].append(None if record.messages is None else json.dumps(record.messages, ensure_ascii=False))
        out["source"].append(source)
        out["drop"].append(drop or "")
        out["key"].append(exact_key(normalized))
        out["lang"].append(lang)
        out["pii"].append(json.dumps(counts, sort_keys=True) if counts else "")
        out["signature"].append([])
    if normalized_kept:
        rows = signatures([t for _, t in normalized_kept], plan.ngram, plan.num_perm)
        for (i, _), row in zip(normalized_kept, rows):
            out["signature"][i] = row
    return out


def tokenize_batch(batch: dict, plan: Plan) -> dict:
    """input_ids and labels of each record (chat template for conversations, loss on the answers only)."""
    from fedtune import models
    from fedtune.data.tokenize import tokenize_records

    tools = prepare_tools(plan)
    if tools.tokenizer is None:
        tools.tokenizer = models.load_tokenizer(plan.model_dir)
    records = [to_record(text, messages) for text, messages in zip(batch["text"], batch["messages"])]
    pairs = tokenize_records(tools.tokenizer, records)
    return {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}
