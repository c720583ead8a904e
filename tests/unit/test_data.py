"""fedtune.data: reading raw files, length filter and duplicate key, tokenize + pack, and prepare_site
(PII scrubbing itself is covered in test_pii.py, the prepare pipeline's stages in test_prepare_pipeline.py)."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import decoded_tokens, site_records, write_jsonl

from fedtune import models
from fedtune.artifacts import sha256_file
from fedtune.data import prepare_site
from fedtune.data.dedup import exact_key, normalize
from fedtune.data.quality import length_verdict
from fedtune.data.sources import Record, read_records
from fedtune.data.stages import _record_parts
from fedtune.data.tokenize import IGNORE, pack, tokenize_record
from fedtune.errors import BadInput


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return models.load_tokenizer(str(tiny_model))


def chat(question: str, answer: str) -> Record:
    return Record(messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


# --- sources ---------------------------------------------------------------------------------------


def test_read_jsonl_all_record_shapes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"text": "Plain text record."},
        {"instruction": "Translate this.", "input": "Hallo Welt", "output": "Hello world"},
        {"instruction": "Say hi.", "output": "Hi!"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                      {"role": "assistant", "content": "A."}]},
    ])
    # blank lines are skipped
    path.write_text(path.read_text() + "\n   \n", encoding="utf-8")
    records = list(read_records(path))
    assert len(records) == 4
    assert records[0] == Record(text="Plain text record.")
    assert records[1].messages == [{"role": "user", "content": "Translate this.\n\nHallo Welt"},
                                   {"role": "assistant", "content": "Hello world"}]
    assert records[1].text is None
    assert records[2].messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert [m["role"] for m in records[3].messages] == ["system", "user", "assistant"]
    assert records[3].contents() == ["Be brief.", "Q?", "A."]


def test_read_csv(tmp_path):
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Add, please", "input": "2 + 2", "output": "4, of course"})
        writer.writerow({"instruction": "Name a colour", "input": "", "output": "Blue"})
    records = list(read_records(path))
    assert records == [chat("Add, please\n\n2 + 2", "4, of course"), chat("Name a colour", "Blue")]

    text_csv = tmp_path / "t.csv"
    text_csv.write_text('text\n"line one, with comma"\nsecond\n', encoding="utf-8")
    assert [r.text for r in read_records(text_csv)] == ["line one, with comma", "second"]


def test_read_csv_messages_column_json(tmp_path):
    path = tmp_path / "m.csv"
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["messages"])
        writer.writeheader()
        writer.writerow({"messages": json.dumps(messages)})
    assert list(read_records(path)) == [Record(messages=messages)]


def test_read_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["What is 1+1?", "Capital of France?"],
                             "input": [None, "Answer in one word."],
                             "output": ["Two.", "Paris"]}), path)
    records = list(read_records(path))
    assert records == [chat("What is 1+1?", "Two."), chat("Capital of France?\n\nAnswer in one word.", "Paris")]

    texts = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["first document", "second document"], "id": [1, 2]}), texts)
    assert [r.text for r in read_records(texts)] == ["first document", "second document"]

    msgs = tmp_path / "m.parquet"
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pq.write_table(pa.table({"messages": [convo]}), msgs)
    assert list(read_records(msgs)) == [Record(messages=convo)]


def test_read_txt_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First paragraph\ncontinues here.\n\n\nSecond paragraph.\n  \nThird\n", encoding="utf-8")
    assert [r.text for r in read_records(path)] == ["First paragraph\ncontinues here.", "Second paragraph.", "Third"]


def test_csv_messages_cell_not_json(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('messages\n"[{broken"\n', encoding="utf-8")
    with pytest.raises(BadInput, match=rf"{path}:2"):
        list(read_records(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_file_not_utf8_is_bad_input(tmp_path, suffix):
    path = tmp_path / f"latin{suffix}"
    body = {".jsonl": b'{"text": "caf\xe9"}\n', ".csv": b"text\ncaf\xe9\n", ".txt": b"caf\xe9\n"}[suffix]
    path.write_bytes(body)
    with pytest.raises(BadInput) as info:
        list(read_records(path))
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(BadInput) as info:
        list(read_records(path))
    assert f"{path}:3" in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_json_line_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(BadInput, match=rf"{path}:1"):
        list(read_records(path))


def test_record_without_known_fields(tmp_path):
    # One row of no known format is dropped and counted; a file of only such rows is an error (test_sources.py).
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "ok"}, {"question": "x", "answer": "y"}])
    assert [r.drop for r in read_records(path)] == [None, "no_known_fields"]


def test_bad_messages_shape(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(BadInput, match="messages"):
        list(read_records(path))


def test_unsupported_suffix_and_missing_file(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(BadInput) as info:
        list(read_records(path))
    assert ".xlsx" in str(info.value) and ".jsonl" in str(info.value)
    with pytest.raises(BadInput, match="not found"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_damaged_parquet_is_bad_input(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(BadInput, match="parquet"):
        list(read_records(path))


# --- filters ---------------------------------------------------------------------------------------


def test_length_verdict():
    assert length_verdict(Record(text=""), 8, 100) == "empty"
    assert length_verdict(Record(text="   \n "), 8, 100) == "empty"
    assert length_verdict(chat("", ""), 8, 100) == "empty"
    assert length_verdict(Record(text="short"), 8, 100) == "too_short"
    assert length_verdict(Record(text="x" * 101), 8, 100) == "too_long"
    assert length_verdict(Record(text="x" * 100), 8, 100) is None
    assert length_verdict(Record(text="just right"), 8, 100) is None
    assert length_verdict(chat("A question that is long enough?", ""), 8, 100) == "no_answer"
    assert length_verdict(chat("A question that is long enough?", "   "), 8, 100) == "no_answer"
    assert length_verdict(chat("Question?", "Answer."), 8, 100) is None
    assert length_verdict(chat("Q", "A"), 8, 100) == "too_short"


def normalized_key(record: Record) -> int:
    """The exact-duplicate key `prepare` gives a record (see analyze_batch)."""
    return exact_key(normalize(_record_parts(record)))


def test_record_parts_name_the_role():
    assert _record_parts(Record(text="Plain text.")) == ["Plain text."]
    assert _record_parts(chat("Q?", "A.")) == ["user\x1fQ?", "assistant\x1fA."]


def test_normalized_key_ignores_case_and_whitespace():
    a = normalized_key(Record(text="Hello   World\n again"))
    assert a == normalized_key(Record(text="hello world again"))
    assert a == normalized_key(Record(text="  HELLO\tworld AGAIN  "))
    assert a != normalized_key(Record(text="hello world, again"))
    c1 = normalized_key(chat("What is  X?", "It is Y."))
    assert c1 == normalized_key(chat("what is x?", "it is   y."))
    assert c1 != normalized_key(chat("What is X?", "It is Z."))
    # the roles count: the same words in other roles are another record
    assert c1 != normalized_key(Record(messages=[{"role": "assistant", "content": "What is X?"},
                                                 {"role": "user", "content": "It is Y."}]))
    assert c1 != normalized_key(Record(text="What is X? It is Y."))
    # a signed 64-bit value: it is stored in an Arrow int64 column
    assert all(-(2**63) <= k < 2**63 for k in (a, c1))


# --- tokenize and pack -----------------------------------------------------------------------------


def labelled_span(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE]


def test_tokenize_instruction_trains_on_answer_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "How is north-7 asthma coded?",
                                               "output": "Asthma of north-7 severity is coded in category J45."}])
    (record,) = read_records(path)
    ids, labels = tokenize_record(tokenizer, record)
    assert len(ids) == len(labels) > 10
    trained = labelled_span(labels)
    assert trained, "no token is trained on"
    start, end = trained[0], trained[-1] + 1
    assert trained == list(range(start, end))  # one contiguous span
    assert all(label == IGNORE for label in labels[:start])
    assert labels[start:end] == ids[start:end]
    answer = tokenizer.decode(ids[start:end])
    prompt = tokenizer.decode(ids[:start])
    assert "Asthma of north-7 severity is coded in category J45." in answer
    assert "How is north-7 asthma" not in answer
    assert "user" not in answer
    assert "How is north-7 asthma coded?" in prompt
    assert "Asthma" not in prompt
    # the end of the turn is trained on so the model learns to stop
    assert tokenizer.eos_token_id in ids[start:end]


def test_tokenize_multi_turn_trains_on_each_answer(tokenizer):
    record = Record(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question about escrow?"},
        {"role": "assistant", "content": "First answer about escrow."},
        {"role": "user", "content": "Second question about overdraft?"},
        {"role": "assistant", "content": "Second answer about overdraft."},
    ])
    ids, labels = tokenize_record(tokenizer, record)
    kept = [t if label != IGNORE else None for t, label in zip(ids, labels)]
    spans, current = [], []
    for t in kept:
        if t is None:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(t)
    if current:
        spans.append(current)
    assert len(spans) == 2
    assert "First answer about escrow." in tokenizer.decode(spans[0])
    assert "Second answer about overdraft." in tokenizer.decode(spans[1])
    for span in spans:
        text = tokenizer.decode(span)
        assert "question" not in text and "Be brief" not in text


def test_tokenize_text_trains_on_all_tokens(tokenizer):
    ids, labels = tokenize_record(tokenizer, Record(text="Put alpha tests under tests/ mirroring the package."))
    assert labels == ids
    assert IGNORE not in labels
    assert ids[-1] == tokenizer.eos_token_id
    assert "Put alpha tests under tests/" in tokenizer.decode(ids)


def test_tokenize_conversation_without_chat_template(tiny_model):
    tok = models.load_tokenizer(str(tiny_model))
    tok.chat_template = None
    with pytest.raises(BadInput, match="chat template"):
        tokenize_record(tok, chat("Q?", "A."))


def test_pack_loses_nothing():
    samples = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5, 6, 7, 8], [4, 5, 6, 7, 8]), ([9, 10], [IGNORE, IGNORE])]
    ids, labels = pack(samples, seq_len=4, pad_id=0)
    assert ids.shape == labels.shape == (3, 4)
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    flat_ids, flat_labels = ids.reshape(-1).tolist(), labels.reshape(-1).tolist()
    assert flat_ids[:10] == list(range(1, 11))
    assert flat_labels[:10] == [IGNORE, 2, 3, 4, 5, 6, 7, 8, IGNORE, IGNORE]
    assert flat_ids[10:] == [0, 0] and flat_labels[10:] == [IGNORE, IGNORE]


def test_pack_exact_fit_and_empty():
    ids, labels = pack([([5, 6], [5, 6]), ([7, 8], [7, 8])], seq_len=2, pad_id=99)
    assert ids.tolist() == [[5, 6], [7, 8]] and labels.tolist() == [[5, 6], [7, 8]]
    ids, labels = pack([], seq_len=8, pad_id=0)
    assert ids.shape == labels.shape == (0, 8)


def test_pack_real_records(tokenizer):
    samples = [tokenize_record(tokenizer, chat(r["instruction"], r["output"])) for r in site_records("bank", 10)]
    ids, labels = pack(samples, seq_len=32, pad_id=-7)
    total = sum(len(s[0]) for s in samples)
    assert ids.shape[0] == -(-total // 32)
    assert int((ids != -7).sum()) == total
    assert ids.reshape(-1)[:total].tolist() == [t for s in samples for t in s[0]]
    assert labels.reshape(-1)[:total].tolist() == [t for s in samples for t in s[1]]
    assert (labels.reshape(-1)[total:] == IGNORE).all() and (ids.reshape(-1)[total:] == -7).all()


# --- prepare_site ----------------------------------------------------------------------------------

EMAIL = "jane.doe@clinic-example.org"
PHONE_INTL = "+44 20 7946 0958"
PHONE_US = "(415) 555-2671"  # a number valid in the US plan (555-01xx and (555) prefixes are not)
CARD = "4111 1111 1111 1111"
DISTINCTIVE = "The zebra-crossing protocol applies to quartz-9 wards only."


def planted_rows() -> list[dict]:
    rows = site_records("clinic")
    rows += [
        dict(rows[0]),                                                                      # exact duplicate
        {"instruction": rows[1]["instruction"].upper(), "output": "  " + rows[1]["output"].replace(" ", "   ")},
        {"text": ""},                                                                        # empty
        {"instruction": "", "output": "   "},                                                # empty
        {"text": "hi"},                                                                      # too short
        {"instruction": "Is there an answer to this question?", "output": ""},              # no answer
        {"instruction": "Who handles billing questions?",
         "output": f"Write to {EMAIL} or call {PHONE_INTL} on weekdays."},
        {"instruction": "Where do I report a lost badge?", "output": f"Call security on {PHONE_US} right away."},
        {"text": f"Payment card {CARD} was charged for the visit."},
        {"text": DISTINCTIVE},
    ]
    return rows


def written_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def table_rows(path: Path) -> dict:
    return pq.read_table(path).to_pydict()


def test_prepare_site_writes_card_and_splits(federation, site_files, tmp_path, tiny_model, tokenizer):
    config, _ = federation
    out = tmp_path / "prepared" / "clinic"
    card = prepare_site(config, "clinic", [site_files["clinic"]], out)
    assert sorted(p.name for p in out.iterdir()) == ["data_card.json", "eval.parquet", "eval_tasks.parquet", "train.parquet"]
    on_disk = json.loads((out / "data_card.json").read_text())
    assert on_disk == card

    assert card["format"] == "fedtune.data_card/2" and card["site"] == "clinic"
    assert card["sources"] == [{"name": "clinic.jsonl", "sha256": sha256_file(site_files["clinic"]), "records": 40}]
    assert card["records"]["read"] == 40 and card["records"]["kept"] == 40
    assert card["records"]["train"] + card["records"]["eval"] == 40
    assert card["records"]["eval"] >= 1 and card["records"]["train"] > card["records"]["eval"]
    assert card["dropped"] == {} and card["pii_replaced"] == {}
    assert card["seq_len"] == config.seq_len == 32
    assert card.get("packing")
    assert card["tokenizer"]["fingerprint"] == models.tokenizer_fingerprint(tokenizer)
    assert card["tokenizer"]["chat_template"] is True
    assert card["base_model"] == {"id": config.base_model.id, "sha256": config.base_model.sha256}
    # card format 2: languages, record lengths, the filters that ran, the data contract, the time taken
    assert card["languages"] == {"kept": {"en": 40}, "dropped": {}}
    lengths = card["token_lengths"]
    assert sum(lengths["histogram"].values()) == 40
    assert 0 < lengths["mean"] <= lengths["max"]
    all_tokens = card["tokens"]["train"]["total"] + card["tokens"]["eval"]["total"]
    assert lengths["mean"] == pytest.approx(all_tokens / 40, abs=0.05)
    assert card["filters"] == {"min_chars": config.data.min_chars, "max_chars": config.data.max_chars,
                               "languages": ["en"], "quality": [], "dedup": config.data.dedup.model_dump(mode="json")}
    contract = card["contract"]
    assert contract["satisfied"] is True and contract["problems"] == []
    assert contract["tokenizer"] == config.contract.tokenizer == card["tokenizer"]["fingerprint"]
    assert contract["chat_template"] == config.contract.chat_template
    assert contract["seq_len"] == 32 and contract["trained_tokens"] == card["tokens"]["train"]["trained"]
    assert card["seconds"] >= 0

    for split in ("train", "eval"):
        table = pq.read_table(out / f"{split}.parquet")
        assert table.column_names == ["input_ids", "labels"]
        ids = np.array(table.column("input_ids").to_pylist())
        labels = np.array(table.column("labels").to_pylist())
        assert ids.shape == labels.shape == (card["sequences"][split], 32)
        assert card["tokens"][split]["trained"] == int((labels != IGNORE).sum())
        assert 0 < card["tokens"][split]["trained"] < card["tokens"][split]["total"] <= ids.size
        assert ids.size - card["tokens"][split]["total"] < 32  # only the last row is padded
        assert card["files"][f"{split}.parquet"] == sha256_file(out / f"{split}.parquet")
        trained = labels != IGNORE
        assert (labels[trained] == ids[trained]).all()


def test_prepare_site_drops_and_scrubs(federation, tmp_path, tokenizer):
    config, _ = federation
    raw = write_jsonl(tmp_path / "raw" / "clinic.jsonl", planted_rows())
    extra = tmp_path / "raw" / "notes.txt"
    extra.write_text(f"Second source paragraph with contact {EMAIL} inside.\n\nok\n", encoding="utf-8")
    out = tmp_path / "prepared" / "clinic"
    card = prepare_site(config, "clinic", [raw, extra], out)

    assert card["sources"][0]["records"] == 50 and card["sources"][1] == {
        "name": "notes.txt", "sha256": sha256_file(extra), "records": 2}
    assert card["records"]["read"] == 52
    assert card["dropped"] == {"duplicate": 2, "empty": 2, "no_answer": 1, "too_short": 2}
    assert card["records"]["kept"] == 52 - 7 == card["records"]["train"] + card["records"]["eval"]
    assert card["pii_replaced"] == {"CARD": 1, "EMAIL": 2, "PHONE": 2}

    blob = written_bytes(out)
    decoded = decoded_tokens(out, tokenizer)
    for secret in (EMAIL, PHONE_INTL, PHONE_US, CARD, "jane.doe", "7946 0958", "555-2671"):
        assert secret.encode() not in blob, f"{secret} written to disk"
        assert secret not in decoded, f"{secret} survives in the tokens"
    for placeholder in ("<EMAIL>", "<PHONE>", "<CARD>"):
        assert placeholder in decoded
    assert decoded.count("<PHONE>") == 2 and decoded.count("<EMAIL>") == 2
    # the records themselves did make it into the tokens (so the checks above are meaningful)
    assert "Write to <EMAIL> or call <PHONE> on weekdays." in decoded
    assert DISTINCTIVE in decoded


def test_prepare_site_writes_no_raw_text(federation, site_files, tmp_path):
    config, _ = federation
    rows = site_records("clinic") + [{"text": DISTINCTIVE}]
    raw = write_jsonl(tmp_path / "raw" / "c.jsonl", rows)
    out = tmp_path / "prepared" / "clinic"
    prepare_site(config, "clinic", [raw], out)
    blob = written_bytes(out)
    for needle in (DISTINCTIVE, "zebra-crossing", "quartz-9", rows[0]["output"], rows[0]["instruction"],
                   "essential alpha-0 hypertension"):
        assert needle.encode() not in blob
        assert needle.encode("utf-16-le") not in blob


def test_prepare_site_is_deterministic(federation, site_files, tmp_path):
    config, _ = federation
    first = prepare_site(config, "bank", [site_files["bank"]], tmp_path / "one")
    second = prepare_site(config, "bank", [site_files["bank"]], tmp_path / "two")
    for split in ("train", "eval"):
        assert table_rows(tmp_path / "one" / f"{split}.parquet") == table_rows(tmp_path / "two" / f"{split}.parquet")
    assert first["files"] == second["files"]
    for key in ("records", "dropped", "tokens", "sequences", "sources"):
        assert first[key] == second[key]


def test_prepare_split_independent_of_record_order(federation, tmp_path):
    config, _ = federation
    rows = site_records("dev", 60)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != rows
    a = prepare_site(config, "dev", [write_jsonl(tmp_path / "a" / "dev.jsonl", rows)], tmp_path / "pa")
    b = prepare_site(config, "dev", [write_jsonl(tmp_path / "b" / "dev.jsonl", shuffled)], tmp_path / "pb")
    assert a["records"] == b["records"] and a["tokens"] == b["tokens"]
    assert 0 < a["records"]["eval"] < 60
    for split in ("train", "eval"):
        ta, tb = table_rows(tmp_path / "pa" / f"{split}.parquet"), table_rows(tmp_path / "pb" / f"{split}.parquet")
        # the same records land in each split (as a multiset of tokens), whatever their order in the file
        assert Counter(t for row in ta["input_ids"] for t in row) == Counter(t for row in tb["input_ids"] for t in row)
        assert Counter(t for row in ta["labels"] for t in row) == Counter(t for row in tb["labels"] for t in row)


def test_prepare_unknown_site(federation, site_files, tmp_path):
    config, _ = federation
    out = tmp_path / "prepared" / "mars"
    with pytest.raises(BadInput) as info:
        prepare_site(config, "mars", [site_files["clinic"]], out)
    assert "mars" in str(info.value) and "clinic" in str(info.value)
    assert not out.exists()


def test_prepare_missing_input_writes_nothing(federation, site_files, tmp_path):
    config, _ = federation
    out = tmp_path / "prepared" / "clinic"
    missing = tmp_path / "raw" / "nope.jsonl"
    with pytest.raises(BadInput) as info:
        prepare_site(config, "clinic", [site_files["clinic"], missing], out)
    assert str(missing) in str(info.value)
    assert not out.exists()
    assert not (tmp_path / "prepared").exists() or list((tmp_path / "prepared").iterdir()) == []


def test_prepare_bad_input_file_writes_nothing(federation, tmp_path):
    config, _ = federation
    raw = tmp_path / "raw" / "bad.jsonl"
    raw.parent.mkdir()
    raw.write_text('{"text": "a fine first record"}\n{oops\n', encoding="utf-8")
    out = tmp_path / "prepared" / "clinic"
    with pytest.raises(BadInput, match=rf"{raw}:2"):
        prepare_site(config, "clinic", [raw], out)
    assert not out.exists()


def test_prepare_too_few_usable_records(federation, tmp_path):
    config, _ = federation
    raw = write_jsonl(tmp_path / "raw" / "tiny.jsonl", [{"text": "only one usable record here"}, {"text": ""}])
    with pytest.raises(BadInput, match="usable"):
        prepare_site(config, "clinic", [raw], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_records_differing_only_in_pii_are_duplicates_after_scrubbing(federation, tmp_path):
    from fedtune.data import prepare_site

    config, _ = federation
    rows = [{"instruction": "Who do I write to about claims?", "output": f"Write to {name}@example.com for claims."}
            for name in ("anna", "bert", "carl")]
    rows += [{"instruction": f"Question {i} about dev tests?", "output": f"Answer {i} about tests."} for i in range(6)]
    card = prepare_site(config, "clinic", [write_jsonl(tmp_path / "pii.jsonl", rows)], tmp_path / "out")
    assert card["dropped"] == {"duplicate": 2}
    # the card counts the PII replaced in the data written: the kept record's one address, not the
    # addresses of the two copies dropped after scrubbing made them equal
    assert card["pii_replaced"] == {"EMAIL": 1}
    assert card["records"]["kept"] == 7
