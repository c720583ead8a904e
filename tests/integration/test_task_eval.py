"""`fedtune evaluate`'s task metrics through the CLI on the tiny model: held-out prompts answered greedily by the
base model and a version, scored per site in --json, shown side by side with --samples, and the same answers
and scores through lm-eval's harness."""

from __future__ import annotations

import json
import shutil

import pytest

import fedkit
from conftest import run_cli, write_jsonl
from fedtune.tasks import METRICS, score

SITES = ("clinic", "bank", "dev")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Three prepared sites and v0001 aggregated from their first round."""
    from fedtune.aggregate import aggregate_round

    built = fedkit.build_world(tmp_path_factory.mktemp("task-eval"), tiny_model)
    aggregate_round(built.config, built.registry, built.round1)
    return built


def evaluate_json(world, capsys, *extra, adapter=None) -> dict:
    args = ["evaluate", "--config", world.config_path, "--adapter", adapter or world.registry / "v0001"]
    for site in SITES:
        args += ["--data", world.prepared(site)]
    code, out, err = run_cli([*args, *map(str, extra), "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_task_metrics_per_site_match_the_answers_shown(world, capsys):
    result = evaluate_json(world, capsys, "--task-examples", "4", "--max-new-tokens", "8", "--samples", "4")
    assert result["adapter"] == "v0001"
    for site in SITES:
        card = json.loads((world.prepared(site) / "data_card.json").read_text())
        task = result["sites"][site]["task"]
        assert task["examples"] == min(4, card["eval_tasks"]["count"]) > 0
        assert task["max_new_tokens"] == 8
        assert set(task) == {*METRICS, "examples", "max_new_tokens"}
        shown = [s for s in result["samples"] if s["site"] == site]
        assert len(shown) == task["examples"]
        # The site's scores are the means of the scorers over exactly the answers shown.
        for metric in METRICS:
            expected = sum(score(s["version"], s["reference"])[metric] for s in shown) / len(shown)
            assert task[metric] == pytest.approx(expected, abs=1e-12)
            assert 0.0 <= task[metric] <= 1.0
        for sample in shown:
            assert sample["reference"] and sample["prompt"].endswith("assistant")
            assert isinstance(sample["base"], str) and isinstance(sample["version"], str)
    # Loss is still there, unchanged by the task metrics.
    plain = evaluate_json(world, capsys, "--task-examples", "0")
    for site in SITES:
        assert "task" not in plain["sites"][site]
        assert plain["sites"][site]["loss"] == pytest.approx(result["sites"][site]["loss"], abs=1e-9)


def test_samples_table_in_text_mode(world, capsys):
    args = ["evaluate", "--config", world.config_path, "--adapter", world.registry / "v0001",
            "--data", world.prepared("dev"), "--task-examples", "2", "--max-new-tokens", "4", "--samples", "1"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "token F1" in out and "ROUGE-L" in out
    assert "held-out prompts: base vs v0001" in out and "reference" in out


def test_base_answers_in_samples_are_the_base_models(world, capsys):
    """The base column of a version's samples is what evaluating the base model itself answers."""
    version = evaluate_json(world, capsys, "--task-examples", "3", "--max-new-tokens", "6", "--samples", "3")
    base = evaluate_json(world, capsys, "--task-examples", "3", "--max-new-tokens", "6", "--samples", "3",
                         adapter="base")
    assert [s["base"] for s in version["samples"]] == [s["base"] for s in base["samples"]]
    assert all(s["version"] is None for s in base["samples"])


def test_lm_eval_harness_gives_the_same_answers_and_scores(world, capsys):
    common = ["--task-examples", "6", "--max-new-tokens", "8", "--samples", "6", "--batch-size", "4"]
    ours = evaluate_json(world, capsys, *common)
    harness = evaluate_json(world, capsys, *common, "--harness", "lm-eval")
    assert [s["version"] for s in harness["samples"]] == [s["version"] for s in ours["samples"]]
    for site in SITES:
        for metric in METRICS:
            assert harness["sites"][site]["task"][metric] == pytest.approx(ours["sites"][site]["task"][metric],
                                                                           abs=1e-12)


def test_plain_text_site_and_old_prepared_folder_give_notes_not_errors(world, tmp_path, capsys):
    from fedtune.data import prepare_site

    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": f"Plain note number {i} about the north {i} ward."}
                                                for i in range(30)])
    plain = tmp_path / "plain"
    card = prepare_site(world.config, "dev", [raw], plain)
    assert card["eval_tasks"]["count"] == 0 and card["eval_tasks"]["without_answer"] == card["records"]["eval"]
    old = shutil.copytree(world.prepared("bank"), tmp_path / "old")  # as prepared before tasks were kept
    (old / "eval_tasks.parquet").unlink()
    card_path = old / "data_card.json"
    old_card = json.loads(card_path.read_text())
    del old_card["files"]["eval_tasks.parquet"], old_card["eval_tasks"]
    card_path.write_text(json.dumps(old_card))

    args = ["evaluate", "--config", world.config_path, "--adapter", "base", "--data", plain, "--data", old,
            "--task-examples", "2", "--max-new-tokens", "2", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert all("task" not in m and m["loss"] > 0 for m in result["sites"].values())
    assert any("no assistant turn" in note for note in result["notes"])
    assert any("run `fedtune prepare` again" in note for note in result["notes"])
    assert sum(line.startswith("note: ") for line in err.splitlines()) == 2

    # Asking for samples where no site has a task is an error, and says why.
    code, out, err = run_cli([*args[:-1], "--samples", "1"], capsys)
    assert code == 2 and "error: evaluate: --samples needs held-out tasks" in err


@pytest.mark.parametrize("extra, message", [
    (["--task-examples", "-1"], "--task-examples -1 --samples 0: give 0 or more"),
    (["--samples", "-2"], "--samples -2: give 0 or more"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give 1 or more"),
    (["--harness", "helm"], "--harness helm: unknown; choose fedtune or lm-eval"),
    (["--task-examples", "2", "--samples", "3"], "--samples 3 is more than --task-examples 2"),
])
def test_bad_task_options_are_one_error_line(world, capsys, extra, message):
    args = ["evaluate", "--config", world.config_path, "--adapter", "base", "--data", world.prepared("dev"), *extra]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and not out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err


def test_tampered_tasks_file_is_refused(world, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = shutil.copytree(world.prepared("clinic"), tmp_path / "clinic")
    table = pq.read_table(folder / "eval_tasks.parquet")
    easier = pa.array([[5, 6]] * table.num_rows, pa.list_(pa.int32()))  # the answers swapped for easier ones
    pq.write_table(table.set_column(1, "answer_ids", easier), folder / "eval_tasks.parquet")
    code, out, err = run_cli(["evaluate", "--config", world.config_path, "--adapter", "base", "--data", folder],
                             capsys)
    assert code == 2 and "eval_tasks.parquet: contents do not match data_card.json" in err


@pytest.mark.slow  # a two-round simulation with both baselines: about 30 s
def test_simulate_reports_task_metrics_for_base_versions_and_baselines(tmp_path, tiny_model, site_files, capsys):
    import yaml

    from fedtune.config import load_federation
    from fedtune.evaluate import evaluate
    from fedtune.tasks import task_rows

    recipe = {"name": "tiny", "model": str(tiny_model), "rounds": 2, "seq_len": 32, "lora": {"r": 4, "alpha": 8},
              "training": {"steps": 2, "batch_size": 4, "lr": 0.01}, "data": {"eval_fraction": 0.2},
              "evaluation": {"task_examples": 3, "max_new_tokens": 4},
              "sites": [{"name": site, "inputs": [str(path)]} for site, path in site_files.items()]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    code, _stdout, err = run_cli(["simulate", tmp_path / "recipe.yaml", "--out", out, "--baselines", "local,central"],
                                 capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    tasks = report["tasks"]
    # v0001 is scored by loss alone: only the last version's answers are generated (evaluation.every_version)
    assert list(tasks) == ["base", "v0002", "local", "central"]
    assert [r["version"] for r in report["rounds"]] == ["v0001", "v0002"]
    for name, sites in tasks.items():
        assert set(sites) == set(site_files), name
        assert all(t["examples"] == 3 and t["max_new_tokens"] == 4 for t in sites.values())
    # The report's scores are what `evaluate` gives for the same adapter: no second implementation.
    config = load_federation(out / "federation.yaml")
    data = [out / "prepared" / site for site in site_files]
    for name, adapter in (("v0002", out / "registry" / "v0002"), ("central", out / "baselines" / "central")):
        again = evaluate(config, adapter, data, task_examples=3, max_new_tokens=4)
        assert {s: m["task"] for s, m in again["sites"].items()} == tasks[name]
    header, rows = task_rows(report)
    assert header == ["adapter", *site_files] and [r[0] for r in rows] == list(tasks)


def test_lm_eval_missing_names_the_extra(world, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what Python does for a package that is not installed
    args = ["evaluate", "--config", world.config_path, "--adapter", "base", "--data", world.prepared("dev"),
            "--harness", "lm-eval"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and not out
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: evaluate --harness lm-eval: lm-eval is not installed; pip install 'fedtune[eval]'"]
