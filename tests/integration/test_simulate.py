"""`fedtune simulate` on the tiny model: the whole federation through the same stage functions."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli


def write_recipe(folder, site_files, rounds=2):
    recipe = {
        "name": "tiny", "model": None, "rounds": rounds, "seq_len": 32,
        "lora": {"r": 4, "alpha": 8}, "training": {"steps": 3, "batch_size": 4, "lr": 0.01},
        "data": {"eval_fraction": 0.2},
        "sites": [{"name": site, "inputs": [str(path)]} for site, path in site_files.items()],
    }
    return recipe


def test_simulate_writes_every_artifact(tmp_path, tiny_model, site_files, capsys):
    recipe = write_recipe(tmp_path, site_files)
    recipe["model"] = str(tiny_model)
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["simulate", tmp_path / "recipe", "--out", out], capsys)
    assert code == 0, stderr
    assert (out / "federation.yaml").is_file()
    for site in site_files:
        assert (out / "prepared" / site / "data_card.json").is_file()
        for number in (1, 2):
            assert (out / "updates" / f"round-{number:04d}" / site / "manifest.json").is_file()
    assert (out / "registry" / "LATEST").read_text().strip() == "v0002"
    report = json.loads((out / "report.json").read_text())
    assert set(report["base"]) == set(site_files)
    assert [r["version"] for r in report["rounds"]] == ["v0001", "v0002"]
    assert all(set(r["eval"]) == set(site_files) for r in report["rounds"])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "v0002" in stdout and "clinic" in stdout

    # The report's losses are what `evaluate` gives for the same version: simulate has no second implementation.
    from fedtune.config import load_federation
    from fedtune.evaluate import evaluate

    config = load_federation(out / "federation.yaml")
    again = evaluate(config, out / "registry" / "v0002", [out / "prepared" / s for s in site_files])
    for site, metrics in again["sites"].items():
        assert metrics["loss"] == pytest.approx(report["rounds"][-1]["eval"][site], rel=1e-5)


def test_simulate_refuses_a_used_folder_and_bad_recipe(tmp_path, tiny_model, site_files, capsys):
    recipe = write_recipe(tmp_path, site_files, rounds=1)
    recipe["model"] = str(tiny_model)
    recipe["trainig"] = {"steps": 1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_cli(["simulate", path, "--out", tmp_path / "run"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "trainig: unknown key" in stderr
    assert not (tmp_path / "run").exists()

    del recipe["trainig"]
    recipe["sites"][0]["inputs"] = ["missing.jsonl"]
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_cli(["simulate", path, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "missing.jsonl" in stderr
    assert not (tmp_path / "run").exists()
