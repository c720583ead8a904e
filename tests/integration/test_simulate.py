"""`fedtune simulate` on the tiny model: the whole federation through the same stage functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


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


def _recipe_file(tmp_path, tiny_model, site_files, name="recipe", rounds=1, attacks=None, **top):
    """A tiny recipe on disk; `attacks` maps a site to its attack block."""
    recipe = write_recipe(tmp_path, site_files, rounds=rounds)
    recipe["model"] = str(tiny_model)
    for site in recipe["sites"]:
        if attacks and site["name"] in attacks:
            site["attack"] = attacks[site["name"]]
    recipe.update(top)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tensors(folder):
    from fedtune.adapter import read_tensors

    return read_tensors(folder / "adapter_model.safetensors")


def test_simulate_baselines_and_method_override(tmp_path, tiny_model, site_files, capsys):
    recipe = _recipe_file(tmp_path, tiny_model, site_files, rounds=2)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["simulate", recipe, "--out", out, "--method", "ffa", "--baselines", "local,central"], capsys)
    assert code == 0, stderr

    # --method reaches the federation file (so train-local froze A), every version's manifest and the report.
    assert yaml.safe_load((out / "federation.yaml").read_text())["aggregation"]["method"] == "ffa"
    for version in ("v0001", "v0002"):
        assert json.loads((out / "registry" / version / "manifest.json").read_text())["method"] == "ffa"
    update = json.loads((out / "updates" / "round-0001" / "clinic" / "manifest.json").read_text())
    assert update["trained"] == "B"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "ffa"

    # One local adapter per site (its own rounds × steps = 2 × 3) and one central (× 3 sites), each loadable.
    from fedtune.config import load_federation
    from fedtune.evaluate import evaluate

    config = load_federation(out / "federation.yaml")
    v0000 = _tensors(out / "registry" / "v0000")
    for site in site_files:
        folder = out / "baselines" / "local" / site
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["baseline"]["sites"] == [site] and manifest["baseline"]["train"]["steps"] == 6
        assert (folder / "adapter_config.json").is_file()
        trained = _tensors(folder)
        assert set(trained) == set(v0000)
        assert any(not torch.equal(trained[k], v0000[k]) for k in trained if "lora_A" in k)  # plain LoRA: A trains too
        again = evaluate(config, folder, [out / "prepared" / site])
        assert again["sites"][site]["loss"] == pytest.approx(report["baselines"]["local"][site], rel=1e-5)
    central = json.loads((out / "baselines" / "central" / "manifest.json").read_text())
    assert sorted(central["baseline"]["sites"]) == sorted(site_files) and central["baseline"]["train"]["steps"] == 18
    assert set(report["baselines"]["central"]) == set(site_files)
    again = evaluate(config, out / "baselines" / "central", [out / "prepared" / s for s in site_files])
    for site, metrics in again["sites"].items():
        assert metrics["loss"] == pytest.approx(report["baselines"]["central"][site], rel=1e-5)
    # One row each in the eval-loss table and in the task-metrics table.
    rows = [line for line in stdout.splitlines() if line.strip("│ ").startswith(("local", "central"))]
    assert len(rows) == 4 and "task metrics per site" in stdout, stdout
    assert set(report["tasks"]) >= {"base", "local", "central"}


def test_attacker_sends_its_forged_update_and_median_resists(tmp_path, tiny_model, site_files, capsys):
    from fedtune.aggregate import aggregate_round
    from fedtune.artifacts import sha256_file
    from fedtune.config import load_federation
    from fedtune.simulate import simulate

    clean, attacked, median = tmp_path / "clean", tmp_path / "attacked", tmp_path / "median"
    simulate(_recipe_file(tmp_path, tiny_model, site_files, "clean"), clean)
    recipe = _recipe_file(tmp_path, tiny_model, site_files, "attacked", attacks={"dev": {"kind": "sign-flip", "factor": 10}})
    code, _, stderr = run_cli(["simulate", recipe, "--out", attacked], capsys)
    assert code == 0, stderr
    simulate(recipe, median, method="median")

    # The forged update is −10 × the honest one (training is seeded, so the clean run's dev is the
    # honest update), it is signed, and it is the update the round used.
    sent = attacked / "updates" / "round-0001" / "dev"
    manifest = json.loads((sent / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(sent / "adapter_model.safetensors")
    honest = _tensors(clean / "updates" / "round-0001" / "dev")
    forged = _tensors(sent)
    for key in honest:
        assert torch.allclose(forged[key], -10 * honest[key], rtol=1e-6, atol=0)
    version = json.loads((attacked / "registry" / "v0001" / "manifest.json").read_text())
    used = {c["site"]: c for c in version["contributors"]}
    assert used["dev"]["update_sha256"] == manifest["sha256"] and not version["rejected"]

    # fedavg is linear: the attacked version moved by p_dev × (s·forged − honest) = p_dev × (−10s − 1) × honest,
    # s being the clip the default norm bound (10 × the others' median norm) put on the forged update, if any.
    v0000 = _tensors(clean / "registry" / "v0000")
    fed_clean, fed_attacked = _tensors(clean / "registry" / "v0001"), _tensors(attacked / "registry" / "v0001")
    p_dev, scale = used["dev"]["weight"], used["dev"].get("clip_scale", 1.0)
    others = [c["norm"] for site, c in used.items() if site != "dev"]
    assert scale == pytest.approx(min(1.0, 10 * float(np.median(others)) / used["dev"]["norm"]), rel=1e-5)
    for key in honest:
        assert torch.allclose(fed_attacked[key] - fed_clean[key], (-10 * scale - 1) * p_dev * honest[key], atol=1e-6)

    # Coordinate-wise robust rules keep every coordinate inside the honest sites' range; fedavg leaves it.
    h1, h2 = (_tensors(clean / "updates" / "round-0001" / s) for s in ("clinic", "bank"))
    config = load_federation(attacked / "federation.yaml")
    trimmed_registry = tmp_path / "trimmed" / "registry"
    shutil.copytree(attacked / "registry" / "v0000", trimmed_registry / "v0000")
    (trimmed_registry / "LATEST").write_text("v0000\n")
    # The same registry as it stood after init: v0000's signed log line and the coordinator's key beside it.
    first_line = (attacked / "registry" / "log.jsonl").read_bytes().splitlines(keepends=True)[0]
    (trimmed_registry / "log.jsonl").write_bytes(first_line)
    shutil.copy(attacked / "coordinator.key", trimmed_registry.parent / "coordinator.key")
    aggregate_round(config, trimmed_registry, attacked / "updates" / "round-0001", method="trimmed-mean", trim=0.4)
    robust = {"median": _tensors(median / "registry" / "v0001"), "trimmed-mean": _tensors(trimmed_registry / "v0001")}
    assert json.loads((median / "registry" / "v0001" / "manifest.json").read_text())["method"] == "median"
    outside = 0
    for key in honest:
        low, high = torch.minimum(h1[key], h2[key]) - 1e-6, torch.maximum(h1[key], h2[key]) + 1e-6
        for name, tensors in robust.items():
            step = tensors[key] - v0000[key]
            assert bool(((step >= low) & (step <= high)).all()), (name, key)
        fed_step = fed_attacked[key] - v0000[key]
        outside += int(((fed_step < low) | (fed_step > high)).sum())
    assert outside > 0


def test_nan_attacker_is_rejected_and_the_round_proceeds(tmp_path, tiny_model, site_files, capsys):
    recipe = _recipe_file(tmp_path, tiny_model, site_files, rounds=2, attacks={"bank": {"kind": "nan"}})
    out = tmp_path / "run"
    code, _, stderr = run_cli(["simulate", recipe, "--out", out], capsys)
    assert code == 0, stderr
    assert "warning:" in stderr and "bank: rejected" in stderr and "NaN" in stderr
    for version in ("v0001", "v0002"):
        manifest = json.loads((out / "registry" / version / "manifest.json").read_text())
        assert [r["site"] for r in manifest["rejected"]] == ["bank"] and "NaN" in manifest["rejected"][0]["reason"]
        assert sorted(c["site"] for c in manifest["contributors"]) == ["clinic", "dev"]
    report = json.loads((out / "report.json").read_text())
    assert report["attackers"] == {"bank": {"kind": "nan", "factor": 10.0}}
    assert [r["rejected"][0]["site"] for r in report["rounds"]] == ["bank", "bank"]


def test_simulate_refuses_unknown_baseline_and_method(tmp_path, tiny_model, site_files, capsys):
    recipe = _recipe_file(tmp_path, tiny_model, site_files)
    for extra, message in ((["--baselines", "local,federated"], "--baselines: unknown baseline 'federated'"),
                           (["--method", "average"], "unknown method 'average'")):
        code, _, stderr = run_cli(["simulate", recipe, "--out", tmp_path / "run", *extra], capsys)
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
        assert not (tmp_path / "run").exists()


def test_simulate_with_central_dp_reports_epsilon_and_stops_at_the_budget(tmp_path, tiny_model, site_files):
    """Planned for 2 rounds at ε ≤ 4, a 3-round recipe runs 2, records ε per version and says why it stopped."""
    from fedtune.privacy.accountant import epsilon
    from fedtune.simulate import simulate

    recipe = _recipe_file(tmp_path, tiny_model, site_files, "private", rounds=3,
                          privacy={"mode": "central", "clip_norm": 0.05, "target_epsilon": 4.0, "rounds": 2})
    report = simulate(recipe, tmp_path / "run")
    assert [r["version"] for r in report["rounds"]] == ["v0001", "v0002"]
    z = json.loads((tmp_path / "run" / "registry" / "v0002" / "manifest.json").read_text())["privacy"]["noise_multiplier"]
    assert [r["epsilon"] for r in report["rounds"]] == pytest.approx([epsilon(z, 1.0, n, 1e-5) for n in (1, 2)])
    assert report["rounds"][-1]["epsilon"] <= 4.0
    assert "the privacy budget is spent — round 3 would take ε to" in report["stopped"]
    assert not (tmp_path / "run" / "updates" / "round-0003").exists()
    from fedtune.report import report_rows

    header, rows = report_rows(report)
    assert header[-1] == "ε" and [row[-1] for row in rows] == ["0"] + [f"{r['epsilon']:.3f}" for r in report["rounds"]]
    assert (tmp_path / "run" / "report.png").stat().st_size > 0


def test_the_private_recipe_runs_under_local_dp_and_stops_each_site_at_its_budget(tmp_path, tiny_model, site_files):
    """recipes/private's own privacy and canary settings, on the tiny model and its data: every version states the
    sites' ε (≤ 8, growing), each site keeps its ledger and canaries, and a fourth round stops at the sites' budget."""
    from fedtune.config import load_recipe
    from fedtune.simulate import simulate

    recipe, _ = load_recipe(ROOT / "recipes" / "private")
    assert recipe.privacy.mode == "local" and recipe.privacy.local.target_epsilon == 8.0
    path = _recipe_file(tmp_path, tiny_model, site_files, "private-tiny", rounds=recipe.privacy.rounds + 1,
                        privacy=recipe.privacy.model_dump(mode="json"),
                        canaries=recipe.canaries.model_dump(mode="json"))
    report = simulate(path, tmp_path / "run")
    spent = [r["epsilon"] for r in report["rounds"]]
    assert len(spent) == recipe.privacy.rounds and spent == sorted(spent) and 0 < spent[0] and spent[-1] <= 8.0
    assert "would take this site's record-level ε to" in report["stopped"]
    for site in site_files:
        prepared = tmp_path / "run" / "prepared" / site
        ledger = json.loads((prepared / "privacy_ledger.json").read_text())
        assert len(ledger["entries"]) == recipe.privacy.rounds
        assert json.loads((prepared / "canaries.json").read_text())["canaries"][0]["repeats"] == recipe.canaries.repeats


def test_simulate_draws_each_round_under_site_sampling(tmp_path, tiny_model, site_files):
    """With sample_rate q < 1 each round's sites come from the coordinator's signed draw, and only they train."""
    from fedtune.simulate import simulate

    path = _recipe_file(tmp_path, tiny_model, site_files, "sampled", rounds=3,
                        privacy={"mode": "central", "clip_norm": 0.05, "noise_multiplier": 1.0, "sample_rate": 0.5})
    report = simulate(path, tmp_path / "run")
    assert len(report["rounds"]) == 3
    for number in (1, 2, 3):
        round_dir = tmp_path / "run" / "updates" / f"round-{number:04d}"
        drawn = json.loads((round_dir / "sample.json").read_text())["sample"]["sites"]
        assert sorted(p.name for p in round_dir.iterdir() if p.is_dir()) == sorted(drawn)
        manifest = json.loads((tmp_path / "run" / "registry" / f"v{number:04d}" / "manifest.json").read_text())
        assert sorted(c["site"] for c in manifest["contributors"]) == sorted(drawn)
        assert manifest["privacy"]["sample_rate"] == 0.5


def test_simulate_drives_secure_aggregation_through_dropouts(tmp_path, tiny_model, site_files):
    """Masked rounds with distributed DP: simulate writes the unmask request, has the sites answer and completes
    each round — through a site that drops before sending (round 1) and one that drops before answering (round 2)."""
    from fedtune.simulate import simulate

    path = _recipe_file(tmp_path, tiny_model, site_files, "secure", rounds=2,
                        privacy={"mode": "distributed", "clip_norm": 0.05, "noise_multiplier": 0.5,
                                 "secure_aggregation": True})
    recipe = yaml.safe_load(path.read_text())
    for site in recipe["sites"]:
        if site["name"] == "dev":
            site["drop"] = {"stage": "before-sending", "rounds": [1]}
        if site["name"] == "bank":
            site["drop"] = {"stage": "before-unmasking", "rounds": [2]}
    path.write_text(yaml.safe_dump(recipe))
    report = simulate(path, tmp_path / "run")
    assert [r["version"] for r in report["rounds"]] == ["v0001", "v0002"]
    first, second = (json.loads((tmp_path / "run" / "registry" / v / "manifest.json").read_text())["secure_aggregation"]
                     for v in ("v0001", "v0002"))
    assert first["dropped"] == ["dev"] and first["survivors"] == ["bank", "clinic"]
    assert second["dropped"] == [] and second["unanswered"] == ["bank"] and second["responders"] == ["clinic", "dev"]
    assert not (tmp_path / "run" / "updates" / "round-0001" / "dev").exists()
    answer = json.loads((tmp_path / "run" / "updates" / "round-0001" / "_answers" / "clinic.json").read_text())
    assert set(answer["document"]["pairwise_seeds"]) == {"dev"}


def test_the_secure_recipe_runs_through_its_dropouts(tmp_path, tiny_model, site_files):
    """recipes/secure's own settings and dropouts, on the tiny model and its data."""
    from fedtune.config import load_recipe
    from fedtune.simulate import simulate

    recipe, _ = load_recipe(ROOT / "recipes" / "secure")
    assert recipe.privacy.secure_aggregation
    drops = {s.name: s.drop.model_dump() for s in recipe.sites if s.drop}
    path = _recipe_file(tmp_path, tiny_model, site_files, "secure-tiny", rounds=recipe.rounds.count,
                        privacy=recipe.privacy.model_dump(mode="json"),
                        aggregation=recipe.aggregation.model_dump(mode="json"))
    data = yaml.safe_load(path.read_text())
    names = {"software": "dev"}  # the tiny data's third site
    for site in data["sites"]:
        for name, drop in drops.items():
            if site["name"] == names.get(name, name):
                site["drop"] = drop
    path.write_text(yaml.safe_dump(data))
    report = simulate(path, tmp_path / "run")
    assert len(report["rounds"]) == recipe.rounds.count
    records = [json.loads((tmp_path / "run" / "registry" / r["version"] / "manifest.json").read_text())
               ["secure_aggregation"] for r in report["rounds"]]
    assert records[1]["dropped"] == ["dev"] and records[2]["unanswered"] == ["bank"]
    assert all(r["modulus_bits"] == 64 for r in records)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_straggler_is_recorded_late_in_sync_rounds_and_merged_stale_in_async_ones(tmp_path, tiny_model, site_files,
                                                                                  mode):
    """A recipe site with drop.stage late trains from the round's parent and sends after the round closed."""
    from fedtune.simulate import simulate

    recipe = write_recipe(tmp_path, site_files, rounds=2)
    recipe["model"] = str(tiny_model)
    late = recipe["sites"][-1]
    late["drop"] = {"stage": "late", "rounds": [1]}
    if mode == "async":
        recipe["aggregation"] = {"async": {"buffer": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    simulate(path, tmp_path / "run")
    versions = {v: json.loads((tmp_path / "run" / "registry" / v / "manifest.json").read_text()) for v in ("v0001", "v0002")}
    assert late["name"] not in {c["site"] for c in versions["v0001"]["contributors"]}
    assert (tmp_path / "run" / "updates" / "round-0001" / late["name"]).is_dir()  # it did send, after v0001
    second = {c["site"]: c for c in versions["v0002"]["contributors"]}
    sent_late = json.loads((tmp_path / "run" / "updates" / "round-0001" / late["name"] / "manifest.json").read_text())
    if mode == "sync":  # round 2 takes the site's fresh update only; its late one is recorded
        assert second[late["name"]]["update_sha256"] != sent_late["sha256"] and "staleness" not in second[late["name"]]
        assert any(r["site"] == f"round-0001/{late['name']}" and r["reason"].startswith("late:")
                   for r in versions["v0002"]["rejected"])
    else:
        assert second[late["name"]]["update_sha256"] == sent_late["sha256"]
        assert second[late["name"]]["staleness"] == 1 and second[late["name"]]["staleness_scale"] == pytest.approx(2 ** -0.5)
        assert len(second) == 2  # the buffer takes K = 2: the stale update first, then the oldest fresh one


def test_secure_rounds_with_a_seeded_sample_unmask_with_the_uncalled_site_as_dropped(tmp_path, tiny_model, site_files):
    """Under secure aggregation a site the draw left out is one that dropped before sending: the called sites
    reveal their pairwise seeds with it and the round unmasks."""
    from fedtune.simulate import simulate

    path = _recipe_file(tmp_path, tiny_model, site_files, "secure-sampled", rounds={"count": 2, "sites_per_round": 2},
                        privacy={"secure_aggregation": True}, aggregation={"clip_norm": 10.0, "quorum": 2})
    report = simulate(path, tmp_path / "run")
    for entry in report["rounds"]:
        manifest = json.loads((tmp_path / "run" / "registry" / entry["version"] / "manifest.json").read_text())
        called = manifest["participation"]["called"]
        assert len(called) == 2 and manifest["participation"]["draw"] == "seeded"
        assert manifest["secure_aggregation"]["survivors"] == called
        assert manifest["secure_aggregation"]["dropped"] == [s for s in site_files if s not in called]
