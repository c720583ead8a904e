"""fedtune.data.sources and records: every input format a site may have, read into Records; the column mapping
(data.columns, --columns); rows the reader cannot use dropped with a reason; whole-input problems as one
BadInput. `prepare` through the CLI on these formats is in tests/integration/test_prepare_formats.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from fedtune.config import ColumnMap, DataSettings, parse_columns, parse_model
from fedtune.data.sources import Record, check_input, input_sha256, read_records
from fedtune.errors import BadInput


def chat(*turns: tuple[str, str]) -> Record:
    return Record(messages=[{"role": role, "content": content} for role, content in turns])


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


QA = [{"question": "What is a bond coupon?", "answer": "The interest a bond pays each year."},
      {"question": "What is an index fund?", "answer": "A fund that tracks a market index."}]


# --- formats recognised by their field names ------------------------------------------------------------


def test_prompt_completion_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Define escrow.", "completion": "Money held by a third party."},
        {"prompt": "Define lien.", "response": "A claim on property as security.", "system": "Be brief."},
    ])
    assert list(read_records(path)) == [
        chat(("user", "Define escrow."), ("assistant", "Money held by a third party.")),
        chat(("system", "Be brief."), ("user", "Define lien."), ("assistant", "A claim on property as security.")),
    ]


def test_sharegpt_conversations(tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "You are a bank clerk."},
                           {"from": "human", "value": "Can I open an account?"},
                           {"from": "gpt", "value": "Yes, with an ID."},
                           {"from": "human", "value": "Online?"},
                           {"from": "gpt", "value": "Yes."}]},
        {"id": 7, "system": "Answer in one word.", "conversations": [{"from": "human", "value": "Colour of the sky?"},
                                                                     {"from": "gpt", "value": "Blue."}]},
    ])
    first, second = read_records(path)
    assert first == chat(("system", "You are a bank clerk."), ("user", "Can I open an account?"),
                         ("assistant", "Yes, with an ID."), ("user", "Online?"), ("assistant", "Yes."))
    assert second == chat(("system", "Answer in one word."), ("user", "Colour of the sky?"), ("assistant", "Blue."))


def test_sharegpt_in_parquet(tmp_path):
    # Parquet stores the turns as structs; they come back as dicts.
    path = tmp_path / "sharegpt.parquet"
    pq.write_table(pa.table({"conversations": [[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]]}),
                   path)
    assert list(read_records(path)) == [chat(("user", "Hi"), ("assistant", "Hello"))]


@pytest.mark.parametrize("role, expected", [
    ("user", "user"), ("Human", "user"), ("USER", "user"), ("assistant", "assistant"), ("bot", "assistant"),
    ("GPT", "assistant"), ("model", "assistant"), ("Chatbot", "assistant"), (" System ", "system"),
])
def test_role_aliases(tmp_path, role, expected):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": role, "content": "words"}]}])
    assert list(read_records(path)) == [chat((expected, "words"))]


def test_human_and_bot_roles_are_a_usable_conversation(tmp_path):
    path = write_jsonl(tmp_path / "hb.jsonl", [{"messages": [{"role": "human", "content": "Opening hours?"},
                                                             {"role": "bot", "content": "Nine to five."}]}])
    (record,) = read_records(path)
    assert record.drop is None
    assert record == chat(("user", "Opening hours?"), ("assistant", "Nine to five."))


def test_unknown_role_drops_that_record_only(tmp_path):
    path = write_jsonl(tmp_path / "roles.jsonl", [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
        {"messages": [{"role": "narrator", "content": "Once upon a time"}, {"role": "assistant", "content": "A."}]},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "tool", "value": "{}"}]},
    ])
    assert [r.drop for r in read_records(path)] == [None, "unknown_role", "unknown_role"]


def test_alpaca_with_input_is_kept(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Translate.", "input": "Hallo", "output": "Hello"}])
    assert list(read_records(path)) == [chat(("user", "Translate.\n\nHallo"), ("assistant", "Hello"))]


def test_rows_of_no_known_format_are_dropped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "A plain document."}, {"question": "q", "answer": "a"},
                                                  {"prompt": "P?", "completion": "C."}])
    assert [r.drop for r in read_records(path)] == [None, "no_known_fields", None]


def test_an_input_with_no_known_field_is_one_error(tmp_path):
    path = write_jsonl(tmp_path / "own.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2", "reply": "a2"}])
    with pytest.raises(BadInput) as info:
        list(read_records(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: no record has a field fedtune knows")
    assert "found: answer, question, reply" in message
    assert "--columns prompt=COL,response=COL" in message and "data.columns" in message


# --- the column mapping --------------------------------------------------------------------------------------


def test_csv_with_its_own_column_names(tmp_path):
    path = write_csv(tmp_path / "qa.csv", [{"id": "1", **QA[0]}, {"id": "2", **QA[1]}])
    columns = parse_columns("prompt=question,response=answer").mapping()
    assert list(read_records(path, columns)) == [chat(("user", q["question"]), ("assistant", q["answer"])) for q in QA]


def test_mapping_reads_only_the_named_columns(tmp_path):
    # `text` is a known name, but the mapping says where the record is: text is not read.
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ignored", "q": "Q?", "ctx": "Context.", "a": "A.", "sys": "S."}])
    columns = {"prompt": "q", "input": "ctx", "response": "a", "system": "sys"}
    assert list(read_records(path, columns)) == [chat(("system", "S."), ("user", "Q?\n\nContext."), ("assistant", "A."))]
    assert list(read_records(path, {"text": "ctx"})) == [Record(text="Context.")]


def test_mapped_messages_column_in_sharegpt_shape(tmp_path):
    path = tmp_path / "dialogs.parquet"
    dialog = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    pq.write_table(pa.table({"dialog": [dialog], "persona": ["Be kind."]}), path)
    assert list(read_records(path, {"messages": "dialog", "system": "persona"})) == [
        chat(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"))]


def test_a_mapped_column_missing_from_the_input(tmp_path):
    path = write_csv(tmp_path / "qa.csv", QA)
    with pytest.raises(BadInput) as info:
        list(read_records(path, {"prompt": "query", "response": "answer"}))
    assert str(info.value) == (f"{path}: column 'query' (for prompt) not found; columns present: question, answer. "
                               "Fix --columns or data.columns")


def test_txt_paragraphs_stay_text_under_a_mapping(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First note.\n\nSecond note.\n", encoding="utf-8")
    assert [r.text for r in read_records(path, {"prompt": "q", "response": "a"})] == ["First note.", "Second note."]


def test_parse_columns():
    assert parse_columns(" prompt = question , response=answer ").mapping() == {"prompt": "question",
                                                                                "response": "answer"}
    assert parse_columns("messages=dialog,system=persona").mapping() == {"messages": "dialog", "system": "persona"}
    assert parse_columns("text=body").mapping() == {"text": "body"}


@pytest.mark.parametrize("text, fragment", [
    ("prompt=q,answer=a", "unknown record part answer (use text, prompt, input, response, messages, system)"),
    ("prompt=q", "prompt and response go together"),
    ("text=t,prompt=q,response=a", "text is read on its own"),
    ("messages=m,response=a", "messages or prompt/response, not both"),
    ("system=s", "name the column of text, messages, or prompt and response"),
    ("prompt", "PART=COLUMN"),
    ("prompt=q,prompt=r,response=a", "each part once"),
])
def test_parse_columns_refuses(text, fragment):
    with pytest.raises(BadInput) as info:
        parse_columns(text)
    assert str(info.value).startswith(f"--columns {text}: ") and fragment in str(info.value)


def test_data_columns_in_the_federation_file():
    settings = parse_model(DataSettings, {"columns": {"prompt": "question", "response": "answer"}}, "f.yaml")
    assert settings.columns == ColumnMap(prompt="question", response="answer")
    assert parse_model(DataSettings, {}, "f.yaml").columns is None
    with pytest.raises(BadInput) as info:
        parse_model(DataSettings, {"columns": {"promt": "question", "response": "answer"}}, "f.yaml")
    assert str(info.value) == ("f.yaml: columns: unknown record part promt "
                               "(use text, prompt, input, response, messages, system)")


# --- Hugging Face datasets on disk, Arrow files, shard folders ------------------------------------------------


def qa_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


EXPECTED = [chat(("user", q["question"]), ("assistant", q["answer"])) for q in QA]
MAPPING = {"prompt": "question", "response": "answer"}


def test_save_to_disk_folder(tmp_path):
    qa_dataset(QA).save_to_disk(str(tmp_path / "ds"))
    assert list(read_records(tmp_path / "ds", MAPPING)) == EXPECTED


def test_dataset_dict_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": qa_dataset(QA)}).save_to_disk(str(tmp_path / "one"))
    assert list(read_records(tmp_path / "one", MAPPING)) == EXPECTED  # its only split

    both = datasets.DatasetDict({"train": qa_dataset(QA[:1]), "test": qa_dataset(QA[1:])})
    both.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(BadInput) as info:
        check_input(tmp_path / "two")
    assert str(info.value) == (f"{tmp_path / 'two'}: a DatasetDict with splits train, test; give the split to "
                               f"prepare, e.g. --input {tmp_path / 'two' / 'train'} (repeat --input for several)")
    assert list(read_records(tmp_path / "two" / "test", MAPPING)) == EXPECTED[1:]


def test_arrow_files(tmp_path):
    # The stream format datasets writes, and the random-access file format (Feather v2).
    qa_dataset(QA).save_to_disk(str(tmp_path / "ds"))
    (stream,) = (tmp_path / "ds").glob("*.arrow")
    assert list(read_records(stream, MAPPING)) == EXPECTED
    table = pa.table({"prompt": [q["question"] for q in QA], "completion": [q["answer"] for q in QA]})
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert list(read_records(tmp_path / "file.arrow")) == EXPECTED
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"not arrow at all")
    with pytest.raises(BadInput, match=f"{broken}: not a readable Arrow file"):
        list(read_records(broken))


def test_parquet_shards_folder(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    # Read in name order, whatever order they were written in.
    pq.write_table(pa.table({"text": ["second shard"]}), shards / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": ["first shard", "still first"]}), shards / "train-00000-of-00002.parquet")
    (shards / "README.md").write_text("not data")
    assert [r.text for r in read_records(shards)] == ["first shard", "still first", "second shard"]

    digest = input_sha256(shards)
    pq.write_table(pa.table({"text": ["changed"]}), shards / "train-00001-of-00002.parquet")
    assert input_sha256(shards) != digest


def test_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("text")
    with pytest.raises(BadInput, match="neither a datasets save_to_disk folder .* nor a folder of .parquet or .arrow"):
        check_input(tmp_path / "notes")
    with pytest.raises(BadInput, match="input file not found"):
        check_input(tmp_path / "missing")
