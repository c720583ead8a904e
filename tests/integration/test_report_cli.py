"""`fedtune report` and `--track mlflow` end to end on a tiny simulated federation: the page simulate writes, the
page from a registry (from the run's report.json, or evaluating versions on --data), --json, the MLflow run read
back with MLflow's own client, and bad input."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from conftest import run_cli

SECTIONS = ("eval", "tasks", "baselines", "contributions", "rejected", "participation", "privacy", "cost", "alerts")


def _recipe(folder, tiny_model, site_files, rounds=2):
    recipe = {
        "name": "tiny", "model": str(tiny_model), "rounds": rounds, "seq_len": 32,
        "lora": {"r": 4, "alpha": 8}, "training": {"steps": 3, "batch_size": 4, "lr": 0.01},
        "data": {"eval_fraction": 0.2},
        "sites": [{"name": site, "inputs": [str(path)]} for site, path in site_files.items()],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def _mlflow_run(store):
    MlflowClient = pytest.importorskip("mlflow.tracking", reason="the track extra (MLflow) is not installed").MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("fedtune/tiny")
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


def _sections(text: str) -> dict[str, str]:
    found = dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', text, flags=re.S))
    assert set(found) == set(SECTIONS)
    assert "<script" not in text.lower() and "http" not in text.lower()
    return found


@pytest.fixture(scope="module")
def simulated(tiny_model, tmp_path_factory):
    """A 2-round simulation of clinic, bank and dev, tracked to a store folder of its own."""
    pytest.importorskip("mlflow", reason="the track extra (MLflow) is not installed")
    from conftest import TOPICS, site_records, write_jsonl

    root = tmp_path_factory.mktemp("report-cli")
    site_files = {s: write_jsonl(root / "raw" / f"{s}.jsonl", site_records(s)) for s in TOPICS}
    recipe = _recipe(root / "recipe", tiny_model, site_files)
    return root, recipe, root / "store"


def _simulate(root, recipe, store, capsys):
    """The simulated run, made through the CLI by the first test that needs it (capsys is per test)."""
    out = root / "run"
    if not (out / "report.html").is_file():
        code, stdout, stderr = run_cli(["simulate", recipe, "--out", out, "--track", "mlflow", "--track-uri", store,
                                        "--json"], capsys)
        assert code == 0, stderr
        (root / "simulate.json").write_text(stdout)
    return out, json.loads((root / "simulate.json").read_text())


@pytest.mark.slow
def test_simulate_writes_the_page_and_tracks_the_run(simulated, capsys):
    root, recipe, store = simulated
    out, printed = _simulate(root, recipe, store, capsys)
    report = json.loads((out / "report.json").read_text())
    assert [r["version"] for r in report["rounds"]] == ["v0001", "v0002"]
    assert all(r["seconds"] > 0 for r in report["rounds"])

    part = _sections((out / "report.html").read_text(encoding="utf-8"))
    assert f"{report['rounds'][-1]['eval']['clinic']:.4f}" in part["eval"]
    assert part["cost"].count("<td>simulate</td>") == 2  # seconds simulate measured, not manifest timestamps
    assert all(site in part["contributions"] for site in ("clinic", "bank", "dev"))

    # The run, read back with MLflow's own client from the SQLite store in --track-uri's folder.
    assert printed["tracking"]["store"] == f"sqlite:///{store / 'mlflow.db'}"
    client, run = _mlflow_run(store / "mlflow.db")
    assert run.info.run_id == printed["tracking"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["method"] == "fedavg" and run.data.params["rounds"] == "2"
    assert run.data.params["sites"] == "clinic,bank,dev" and run.data.params["lora.r"] == "4"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss/clinic"))
    assert history == [(0, report["base"]["clinic"])] + [(n, r["eval"]["clinic"])
                                                        for n, r in enumerate(report["rounds"], start=1)]
    weights = client.get_metric_history(run.info.run_id, "weight/bank")
    manifest = json.loads((out / "registry" / "v0001" / "manifest.json").read_text())
    assert {(m.step, m.value) for m in weights if m.step == 1} == \
        {(1, c["weight"]) for c in manifest["contributors"] if c["site"] == "bank"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"report.html", "report.json", "report.png", "report_page.json"}


@pytest.mark.slow
def test_report_from_the_run_results_as_json(simulated, tmp_path, capsys):
    root, recipe, store = simulated
    out, _ = _simulate(root, recipe, store, capsys)
    page_path = tmp_path / "page.html"
    code, stdout, stderr = run_cli(["report", "--registry", out / "registry", "--out", page_path, "--json"], capsys)
    assert code == 0, stderr
    page = json.loads(stdout)
    report = json.loads((out / "report.json").read_text())
    assert page["html"] == str(page_path) and page["latest"] == "v0002" and page["held"] == []
    assert page["run"]["base"] == report["base"]  # taken from report.json beside the registry, not re-evaluated
    assert [v["version"] for v in page["versions"]] == ["v0001", "v0002"]
    first = page["versions"][0]
    assert first["bytes"]["update_count"] == 3 and first["bytes"]["updates"] > first["bytes"]["version"] > 0
    assert {c["site"] for c in first["contributors"]} == {"clinic", "bank", "dev"}
    _sections(page_path.read_text(encoding="utf-8"))
    assert not (tmp_path / "mlflow.db").exists()  # no --track: nothing tracked

    # A results file that is not a run's report.json is refused with its name, and nothing is written.
    (tmp_path / "other.json").write_text(json.dumps({"base": 6.0, "rounds": "two"}))
    code, _, stderr = run_cli(["report", "--registry", out / "registry", "--out", tmp_path / "other.html",
                               "--run-report", tmp_path / "other.json"], capsys)
    assert code == 2 and f"{tmp_path / 'other.json'}: not a run's report.json" in stderr
    assert not (tmp_path / "other.html").exists()


@pytest.mark.slow
def test_report_evaluates_chosen_versions_and_tracks(simulated, tmp_path, capsys):
    root, recipe, store = simulated
    out, _ = _simulate(root, recipe, store, capsys)
    page_path = tmp_path / "page.html"
    code, stdout, stderr = run_cli(["report", "--registry", out / "registry", "--out", page_path, "--json",
                                    "--data", out / "prepared" / "clinic", "--data", out / "prepared" / "dev",
                                    "--versions", "v0002", "--task-examples", "2", "--max-new-tokens", "4",
                                    "--track", "mlflow"], capsys)
    assert code == 0, stderr
    assert "evaluating v0002" in stderr  # progress, on stderr; stdout is the JSON alone
    page = json.loads(stdout)
    report = json.loads((out / "report.json").read_text())
    assert [r["version"] for r in page["run"]["rounds"]] == ["v0002"]
    assert set(page["run"]["base"]) == {"clinic", "dev"}
    for site in ("clinic", "dev"):  # the same numbers simulate measured: one evaluation, not a second one
        assert page["run"]["rounds"][0]["eval"][site] == pytest.approx(report["rounds"][-1]["eval"][site], rel=1e-5)
        assert page["run"]["base"][site] == pytest.approx(report["base"][site], rel=1e-5)
    for name in ("base", "v0002"):
        for site, scores in page["run"]["tasks"][name].items():
            assert scores["examples"] == 2 and all(0 <= scores[k] <= 1 for k in ("exact_match", "token_f1", "rouge_l"))
    part = _sections(page_path.read_text(encoding="utf-8"))
    assert "F1 " in part["tasks"]

    client, run = _mlflow_run(tmp_path / "mlflow.db")  # default store: beside --out
    history = client.get_metric_history(run.info.run_id, "loss/dev")
    assert sorted(m.step for m in history) == [0, 2]
    assert client.get_metric_history(run.info.run_id, "task/token_f1/clinic")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"page.html", "report_page.json"}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model, site_files, capsys, monkeypatch):
    page_path = tmp_path / "page.html"
    code, stdout, stderr = run_cli(["report", "--registry", tmp_path / "nowhere", "--out", page_path], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "not a registry" in stderr and str(tmp_path / "nowhere") in stderr
    assert not page_path.exists()

    (tmp_path / "a-file").write_text("x")
    code, stdout, stderr = run_cli(["report", "--registry", tmp_path / "nowhere", "--out",
                                    tmp_path / "a-file" / "page.html", "--json"], capsys)
    assert code == 2 and "cannot be written" in json.loads(stdout)["error"]

    code, _, stderr = run_cli(["report", "--registry", tmp_path / "nowhere", "--out", page_path, "--track", "wandb"],
                              capsys)
    assert code == 2 and "--track wandb: unknown tracker" in stderr

    code, _, stderr = run_cli(["report", "--registry", tmp_path / "nowhere", "--out", page_path, "--track",
                               "mlflow", "--track-uri", "https://tracking.example.org"], capsys)
    assert code == 2 and "local store only" in stderr

    (tmp_path / "notes.db").write_text("not a database")
    code, _, stderr = run_cli(["report", "--registry", tmp_path / "nowhere", "--out", page_path, "--track",
                               "mlflow", "--track-uri", tmp_path / "notes.db"], capsys)
    assert code == 2 and "is not an SQLite file" in stderr
    assert (tmp_path / "notes.db").read_text() == "not a database"

    # Without MLflow installed, simulate --track fails at once with the install line, before anything is made.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    recipe = _recipe(tmp_path / "recipe", tiny_model, site_files, rounds=1)
    code, _, stderr = run_cli(["simulate", recipe, "--out", tmp_path / "run", "--track", "mlflow"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "pip install 'fedtune[track]'" in stderr
    assert not (tmp_path / "run").exists()


def test_tracking_turns_off_mlflow_telemetry(tmp_path, monkeypatch):
    """MLflow would send usage telemetry to its servers (it stays quiet only in CI or tests, which it detects):
    choosing the store turns that off, so tracking opens no connection."""
    telemetry = pytest.importorskip("mlflow.telemetry.utils", reason="the track extra (MLflow) is not installed")
    from fedtune.tracking import tracking_store

    monkeypatch.setattr(telemetry, "_IS_IN_CI_ENV_OR_TESTING", False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    assert not telemetry.is_telemetry_disabled()
    assert tracking_store("mlflow", None, tmp_path) == tmp_path.absolute() / "mlflow.db"
    assert telemetry.is_telemetry_disabled()
