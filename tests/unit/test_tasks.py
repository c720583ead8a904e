"""fedtune.tasks: the scorers against hand-computed values and rouge-score's own scorer; greedy batched generation
against a step-by-step argmax; the held-out tasks `prepare` writes (content, hash, tampering caught)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import site_records
from fedtune.data.prepared import EVAL_TASKS_FILE, read_eval_tasks
from fedtune.data.tokenize import generation_task
from fedtune.errors import BadInput
from fedtune.tasks import exact_match, generate, mean_scores, normalize_answer, rouge_l, task_rows, token_f1

# --- scorers -------------------------------------------------------------------------------------------------


def test_normalisation_is_squads():
    assert normalize_answer("  The Cat, sat on A mat!  ") == "cat sat on mat"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theme") == "theme"  # an article only as a whole word


def test_exact_match_after_normalisation():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cat", "cats") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_by_hand():
    # normalised: [quick, brown, fox] vs [quick, fox, jumps]: 2 shared, P = R = 2/3
    assert token_f1("the quick brown fox", "quick fox jumps") == pytest.approx(2 / 3)
    # repeated tokens count as often as both have them: [x, x, y] vs [x, y, y]: shared x, y → P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4 → 2·1·0.25 / 1.25
    assert token_f1("alpha", "alpha beta gamma delta") == pytest.approx(0.4)
    assert token_f1("nothing shared", "at all") == 0.0
    assert token_f1("", "something") == 0.0 and token_f1("", "") == 1.0


def test_rouge_l_by_hand():
    # LCS of [x y z w] and [x z w q r] is x z w: P = 3/4, R = 3/5, F = 2PR / (P + R) = 2/3
    assert rouge_l("x y z w", "x z w q r") == pytest.approx(2 / 3)
    assert rouge_l("w z y x", "x y z w") == pytest.approx(0.25)  # reversed: LCS of one token
    assert rouge_l("same words here", "same words here") == 1.0
    assert rouge_l("", "reference") == 0.0


PAIRS = [
    ("Use I10 for essential hypertension", "Use I10 for essential hypertension without heart involvement"),
    ("prefix booleans with is or has", "Prefix booleans with is_, has_ or can_ so conditions read naturally"),
    ("keep functions short", "Keep each function under forty lines; split it when it grows"),
    ("escrow holds funds for third party", "escrow account holds funds for third party until conditions are met"),
    ("completely unrelated output", "Injuries such as fractures are in chapter 19"),
]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_is_rouge_scores_on_plain_ascii(prediction, reference):
    """Where SQuAD's normalisation and rouge-score's tokenizer see the same tokens (no articles, ASCII words),
    the score is rouge-score's own."""
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_keeps_other_scripts_where_rouge_scores_default_drops_them():
    from rouge_score import rouge_scorer

    prediction, reference = "Привет, мир", "привет мир сегодня"
    assert rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure == 0.0
    assert rouge_l(prediction, reference) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert token_f1(prediction, reference) == pytest.approx(0.8)


def test_mean_scores_average_each_metric():
    means = mean_scores(["cat", "dog house"], ["the cat", "house"])
    assert means["exact_match"] == pytest.approx(0.5)
    assert means["token_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert means["rouge_l"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_task_rows_one_row_per_adapter():
    report = {"base": {"a": 1.0, "b": 2.0},
              "tasks": {"base": {"a": {"exact_match": 0.0, "token_f1": 0.125, "rouge_l": 0.25}},
                        "v0001": {"a": {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.75},
                                  "b": {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}}}}
    header, rows = task_rows(report)
    assert header == ["adapter", "a", "b"]
    assert rows == [["base", "0.00 / 0.12 / 0.25", "-"], ["v0001", "0.50 / 0.50 / 0.75", "1.00 / 1.00 / 1.00"]]
    assert task_rows({"base": {"a": 1.0}}) == (["adapter", "a"], [])


# --- generation ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    from fedtune.models import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), load_tokenizer(tiny_model)


def _prompts(tokenizer, count=5):
    records = site_records("bank", count)
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"] * (1 + i % 3)}],
                                          tokenize=True, add_generation_prompt=True) for i, r in enumerate(records)]


def _as_ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@torch.no_grad()
def _stepwise_greedy(model, ids, steps, stops):
    """The oracle: one full forward pass per token, no cache, no padding, argmax."""
    ids = list(ids)
    answer = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token in stops:
            break
        answer.append(token)
        ids.append(token)
    return answer


def test_batched_left_padded_greedy_matches_stepwise_argmax(tiny):
    from fedtune.tasks import stop_ids

    model, tokenizer = tiny
    prompts = [_as_ids(p) for p in _prompts(tokenizer)]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    alone = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    stops = stop_ids(model, tokenizer)
    expected = [tokenizer.decode(_stepwise_greedy(model, p, 6, stops), skip_special_tokens=True) for p in prompts]
    assert batched == alone == expected
    assert any(expected)


# --- the held-out tasks prepare writes -----------------------------------------------------------------------


def test_generation_task_takes_the_last_assistant_turn(tiny):
    _model, tokenizer = tiny
    messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
    ids, answer, cut = generation_task(tokenizer, messages, max_tokens=1000)
    assert tokenizer.decode(answer) == "second answer" and not cut
    assert ids == _as_ids(tokenizer.apply_chat_template(messages[:3], tokenize=True, add_generation_prompt=True))
    assert tokenizer.decode(ids).endswith("second question<|im_end|>\n<|im_start|>assistant\n")
    short, answer_start, was_cut = generation_task(tokenizer, messages, max_tokens=2)
    assert was_cut and short == ids[-2:]  # the prompt cut on the left: the generation prompt stays
    assert answer_start == answer[:2]  # the answer on the right
    assert generation_task(tokenizer, None, 100) is None
    assert generation_task(tokenizer, [{"role": "user", "content": "no answer"}], 100) is None


def test_prepare_writes_hashed_tasks_for_the_eval_split(federation, prepared, tiny):
    from fedtune.artifacts import sha256_file

    config, _ = federation
    _model, tokenizer = tiny
    folder = prepared["clinic"]
    card = json.loads((folder / "data_card.json").read_text())
    assert card["files"][EVAL_TASKS_FILE] == sha256_file(folder / EVAL_TASKS_FILE)
    _, tasks = read_eval_tasks(folder, config)
    assert card["eval_tasks"]["count"] == len(tasks) == card["records"]["eval"] > 0
    assert card["eval_tasks"]["without_answer"] == 0
    # Every task is a held-out record: its prompt rendered through the chat template, its answer the record's.
    by_question = {r["instruction"]: r["output"] for r in site_records("clinic")}
    train_text = tokenizer.decode(pq.read_table(folder / "train.parquet").column("input_ids").combine_chunks()
                                  .flatten().to_pylist())
    for ids, answer_ids in tasks:
        answer = tokenizer.decode(answer_ids)
        question = tokenizer.decode(ids, skip_special_tokens=True).removeprefix("user\n").removesuffix("\nassistant\n")
        assert by_question[question] == answer
        assert ids == _as_ids(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                            add_generation_prompt=True))
        assert answer not in train_text  # held out: never trained on
        assert answer.encode() not in (folder / EVAL_TASKS_FILE).read_bytes()  # tokens, never raw text


def test_tampered_or_unlisted_tasks_file_is_refused(federation, prepared, tmp_path):
    config, _ = federation
    folder = shutil.copytree(prepared["bank"], tmp_path / "bank")
    path = folder / EVAL_TASKS_FILE
    table = pq.read_table(path)
    forged = pa.array([[7, 8, 9]] * table.num_rows, pa.list_(pa.int32()))
    pq.write_table(table.set_column(1, "answer_ids", forged), path)
    with pytest.raises(BadInput, match="eval_tasks.parquet: contents do not match data_card.json"):
        read_eval_tasks(folder, config)

    card = json.loads((folder / "data_card.json").read_text())
    del card["files"][EVAL_TASKS_FILE]
    (folder / "data_card.json").write_text(json.dumps(card))
    with pytest.raises(BadInput, match="not listed in data_card.json"):
        read_eval_tasks(folder, config)
    path.unlink()  # an older folder: no file and none listed → no tasks, no error
    assert read_eval_tasks(folder, config)[1] is None
