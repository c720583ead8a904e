"""`fedtune prepare` through the CLI on the formats sites have: a CSV with its own column names (--columns and
data.columns), prompt/completion, ShareGPT, human/bot roles, unknown roles, and Hugging Face datasets on disk
(save_to_disk folder, DatasetDict split, .arrow file, parquet shards). Each run checks the tokens written decode
to the records' words and that the card and the summary count every drop by reason."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_OVERRIDES, TOPICS, decoded_tokens, run_cli, site_records, write_jsonl

from fedtune import models
from fedtune.data.sources import input_sha256

SITE = "bank"


@pytest.fixture(scope="module")
def fed(tiny_model, tmp_path_factory):
    """(federation.yaml, tokenizer) of one federation on the tiny model, shared by the module."""
    from fedtune.federation import init_federation

    root = tmp_path_factory.mktemp("formats")
    init_federation(root / "fed", list(TOPICS), str(tiny_model), json.loads(json.dumps(TINY_OVERRIDES)))
    return root / "fed" / "federation.yaml", models.load_tokenizer(str(tiny_model))


def pairs(count: int = 20, offset: int = 0) -> list[tuple[str, str]]:
    """Distinct (question, answer) pairs of the bank topic."""
    return [(r["instruction"], r["output"]) for r in site_records(SITE, count + offset)[offset:]]


def prepare(fed, tmp_path, capsys, *inputs, extra=(), config=None):
    out = tmp_path / "prepared"
    args = ["prepare", "--config", config or fed[0], "--site", SITE, "--out", out, *extra]
    for path in inputs:
        args += ["--input", path]
    code, stdout, err = run_cli(args, capsys)
    return code, stdout, err, out


def dropped_line(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if "dropped:" in line]
    return line


def one_error_line(stderr: str) -> str:
    """The CLI's failure: exactly one `error:` line, the last thing printed, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, got {lines}"
    assert "Traceback" not in stderr
    return errors[0]


def write_csv(path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_with_its_own_column_names(fed, tmp_path, capsys):
    qa = pairs()
    path = tmp_path / "questions.csv"
    write_csv(path, ["id", "question", "answer"], [(i, q, a) for i, (q, a) in enumerate(qa)] + [(99, "Unanswered?", "")])
    code, stdout, err, out = prepare(fed, tmp_path, capsys, path, extra=["--columns", "prompt=question,response=answer"])
    assert code == 0, err
    card = json.loads((out / "data_card.json").read_text())
    assert card["records"]["read"] == len(qa) + 1 and card["records"]["kept"] == len(qa)
    assert card["dropped"] == {"no_answer": 1}
    assert "no_answer 1" in dropped_line(stdout)
    decoded = decoded_tokens(out, fed[1])
    for question, answer in qa:
        assert f"<|im_start|>user\n{question}<|im_end|>" in decoded
        assert f"<|im_start|>assistant\n{answer}<|im_end|>" in decoded
    assert "Unanswered?" not in decoded


def test_chat_formats_and_unknown_roles(fed, tmp_path, capsys):
    qa = pairs(24)
    completion = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": q, "completion": a} for q, a in qa[:8]])
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "You answer banking questions."},
                           {"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in qa[8:16]])
    chats = write_jsonl(tmp_path / "humanbot.jsonl", [
        {"messages": [{"role": "Human", "content": q}, {"role": "BOT", "content": a}]} for q, a in qa[16:]] + [
        {"messages": [{"role": "narrator", "content": "The narrator speaks of vaults."},
                      {"role": "assistant", "content": "A reply nobody asked for."}]},
        {"messages": [{"role": "user", "content": "Who keeps the ledger?"},
                      {"role": "auditor", "content": "The auditor keeps the ledger."}]},
        {"question": "A row of another shape?", "answer": "It is dropped."},
    ])
    code, stdout, err, out = prepare(fed, tmp_path, capsys, completion, sharegpt, chats)
    assert code == 0, err
    card = json.loads((out / "data_card.json").read_text())
    assert [(s["name"], s["records"]) for s in card["sources"]] == [("pc.jsonl", 8), ("sharegpt.jsonl", 8),
                                                                    ("humanbot.jsonl", 11)]
    assert card["records"]["kept"] == 24
    assert card["dropped"] == {"no_known_fields": 1, "unknown_role": 2}
    line = dropped_line(stdout)
    assert "unknown_role 2" in line and "no_known_fields 1" in line
    decoded = decoded_tokens(out, fed[1])
    for question, answer in qa:
        assert f"<|im_start|>user\n{question}<|im_end|>" in decoded
        assert f"<|im_start|>assistant\n{answer}<|im_end|>" in decoded
    assert decoded.count("<|im_start|>system\nYou answer banking questions.<|im_end|>") == 8
    for gone in ("narrator", "vaults", "ledger", "another shape", "It is dropped"):
        assert gone not in decoded


def _save_to_disk(rows, folder):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "ds"))
    return folder / "ds"


def _dataset_dict_split(rows, folder):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
                         ).save_to_disk(str(folder / "dd"))
    return folder / "dd" / "train"


def _arrow_file(rows, folder):
    (arrow,) = _save_to_disk(rows, folder).glob("*.arrow")
    return arrow


def _parquet_shards(rows, folder):
    shards = folder / "shards"
    shards.mkdir()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), shards / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), shards / "train-00001-of-00002.parquet")
    return shards


@pytest.mark.parametrize("build", [_save_to_disk, _dataset_dict_split, _arrow_file, _parquet_shards],
                         ids=["save_to_disk", "dataset_dict_split", "arrow", "parquet_shards"])
def test_hugging_face_datasets_on_disk(fed, tmp_path, capsys, build):
    qa = pairs()
    rows = [{"question": q, "answer": a, "n": i} for i, (q, a) in enumerate(qa)]
    (tmp_path / "raw").mkdir()
    path = build(rows, tmp_path / "raw")
    code, _stdout, err, out = prepare(fed, tmp_path, capsys, path, extra=["--columns", "prompt=question,response=answer"])
    assert code == 0, err
    card = json.loads((out / "data_card.json").read_text())
    assert card["sources"] == [{"name": path.name, "sha256": input_sha256(path), "records": len(qa)}]
    assert card["records"]["kept"] == len(qa) and card["dropped"] == {}
    decoded = decoded_tokens(out, fed[1])
    for question, answer in qa:
        assert f"<|im_start|>user\n{question}<|im_end|>" in decoded
        assert f"<|im_start|>assistant\n{answer}<|im_end|>" in decoded


def with_columns(fed, tmp_path, columns: dict):
    data = yaml.safe_load(fed[0].read_text())
    data["data"]["columns"] = columns
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_data_columns_in_the_federation_file(fed, tmp_path, capsys):
    qa = pairs(12)
    path = write_jsonl(tmp_path / "faq.jsonl", [{"q": q, "a": a, "topic": "bank"} for q, a in qa])
    config = with_columns(fed, tmp_path, {"prompt": "q", "response": "a"})
    code, _stdout, err, out = prepare(fed, tmp_path, capsys, path, config=config)
    assert code == 0, err
    decoded = decoded_tokens(out, fed[1])
    assert all(f"<|im_start|>user\n{q}<|im_end|>" in decoded and a in decoded for q, a in qa)

    # --columns replaces the file's mapping: here the answer alone, as plain text.
    code, _stdout, err, out = prepare(fed, tmp_path, capsys, path, config=config, extra=["--columns", "text=a", "--overwrite"])
    assert code == 0, err
    decoded = decoded_tokens(out, fed[1])
    assert all(a in decoded and q not in decoded for q, a in qa)
    assert "<|im_start|>" not in decoded


def every_path(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def expect_bad_input(fed, tmp_path, capsys, *inputs, extra=(), config=None) -> str:
    before = every_path(tmp_path)
    code, _stdout, err, _out = prepare(fed, tmp_path, capsys, *inputs, extra=extra, config=config)
    assert code == 2, err
    assert every_path(tmp_path) == before  # nothing written
    return one_error_line(err)


def test_a_mapped_column_missing_from_the_file(fed, tmp_path, capsys):
    path = tmp_path / "questions.csv"
    write_csv(path, ["question", "answer"], pairs(4))
    line = expect_bad_input(fed, tmp_path, capsys, path, extra=["--columns", "prompt=query,response=answer"])
    assert line == (f"error: {path}: column 'query' (for prompt) not found; columns present: question, answer. "
                    "Fix --columns or data.columns")
    config = with_columns(fed, tmp_path, {"prompt": "question", "response": "reply"})
    line = expect_bad_input(fed, tmp_path, capsys, path, config=config)
    assert "column 'reply' (for response) not found" in line


def test_a_file_with_no_known_field(fed, tmp_path, capsys):
    path = tmp_path / "questions.csv"
    write_csv(path, ["question", "answer"], pairs(4))
    line = expect_bad_input(fed, tmp_path, capsys, path)
    assert line.startswith(f"error: {path}: no record has a field fedtune knows")
    assert "found: answer, question" in line and "--columns prompt=COL,response=COL" in line


def test_a_dataset_dict_of_several_splits(fed, tmp_path, capsys):
    _dataset_dict_split([{"text": f"Document {t}."} for t in "abc"], tmp_path)
    line = expect_bad_input(fed, tmp_path, capsys, tmp_path / "dd")
    assert f"a DatasetDict with splits train, test; give the split to prepare, e.g. --input {tmp_path / 'dd' / 'train'}" in line


@pytest.mark.parametrize("columns, fragment", [
    ("prompt=question,answer=answer", "unknown record part answer"),
    ("prompt=question", "prompt and response go together"),
])
def test_bad_columns_option(fed, tmp_path, capsys, columns, fragment):
    path = tmp_path / "questions.csv"
    write_csv(path, ["question", "answer"], pairs(4))
    line = expect_bad_input(fed, tmp_path, capsys, path, extra=["--columns", columns])
    assert line.startswith(f"error: --columns {columns}: ") and fragment in line


def test_bad_data_columns_in_the_federation_file(fed, tmp_path, capsys):
    path = tmp_path / "questions.csv"
    write_csv(path, ["question", "answer"], pairs(4))
    config = with_columns(fed, tmp_path, {"prompt": "question", "answr": "answer"})
    line = expect_bad_input(fed, tmp_path, capsys, path, config=config)
    assert line.startswith(f"error: {config}: data.columns: ") and "unknown record part answr" in line
