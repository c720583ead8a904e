"""Monitoring through the real command line on the tiny model: contribution records and `log --contributions`, an
update scaled by its site and a site whose data shifts raise alerts, `aggregate --hold-on-alert` holds the version
out of LATEST, `promote` refuses what it must (forged, unknown, not held) and commits the held one, and `verify`
passes throughout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import fedkit
from conftest import site_records, write_jsonl
from fedkit import run_fedtune as fedtune


def ok(*args) -> str:
    code, out, err = fedtune(*args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def rounds(tiny_model, tmp_path_factory):
    """A signed federation (one earlier norm is enough history here; sites report the parent's eval loss) with
    v0001 committed and round 2 trained from it by every site."""
    from fedtune.train import train_local

    world = fedkit.build_world(tmp_path_factory.mktemp("monitor-cli"), tiny_model, keys=True,
                               overrides={"monitor": {"min_history": 1, "report_eval": True}})
    ok("aggregate", "--config", world.config_path, "--registry", world.registry, "--updates", world.round1)
    for site in world.site_data:
        train_local(world.config, site, world.prepared(site), world.registry, world.updates,
                    key=world.root / "keys" / f"{site}.key")
    return world


def _clone(world, tmp_path):
    return fedkit.clone_world(world, tmp_path / "w")


def _args(world):
    return ["--config", world.config_path, "--registry", world.registry]


def test_contributions_recorded_and_summed(rounds, tmp_path):
    world = _clone(rounds, tmp_path)
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert {c["site"] for c in manifest["contributors"] if "contribution" in c} == {"clinic", "bank", "dev"}
    assert manifest["monitor"]["alerts"] == []  # an ordinary round stays quiet
    assert set(manifest["monitor"]["references"]) == {"clinic", "bank", "dev"}  # first data profiles, kept
    ok("aggregate", *_args(world), "--updates", world.updates / "round-0002")
    second = fedkit.read_manifest(world.registry / "v0002")
    assert second["monitor"]["alerts"] == []
    # the previous round's updates are still beside this one: each site's cosine to its last update is recorded
    assert all("cos_previous" in second["monitor"]["sites"][s] and "norm_z" in second["monitor"]["sites"][s]
               for s in ("clinic", "bank", "dev"))
    # quality: each site reported v0000's loss with round 1 and v0001's with round 2; training lowered it
    for site in ("clinic", "bank", "dev"):
        first, now = manifest["monitor"]["sites"][site], second["monitor"]["sites"][site]
        assert now["eval_loss_change"] == pytest.approx(now["eval_loss"] - first["eval_loss"], abs=1e-6)
        assert now["eval_loss"] < first["eval_loss"]
        sent = json.loads((world.updates / "round-0002" / site / "manifest.json").read_text())
        assert sent["eval"]["parent_loss"] == pytest.approx(now["eval_loss"]) and sent["eval"]["tokens"] > 0
    data = json.loads(ok("log", "--registry", world.registry, "--contributions", "--json"))
    rows = {r["site"]: r for r in data["sites"]}
    assert set(rows) == {"clinic", "bank", "dev"}
    for site, row in rows.items():
        records = [c["contribution"] for m in (manifest, second) for c in m["contributors"] if c["site"] == site]
        assert row["rounds"] == row["recorded"] == 2
        assert row["loo_direction_sum"] == pytest.approx(sum(1 - r["loo_cosine"] for r in records), abs=1e-6)
        assert row["loo_distance_sum"] == pytest.approx(sum(r["loo_distance"] for r in records), abs=1e-6)
    table = ok("log", "--registry", world.registry, "--contributions")
    assert "Σ(1 − cos)" in table and "clinic" in table
    only = json.loads(ok("log", "--registry", world.registry, "--contributions", "--site", "bank", "--json"))
    assert [r["site"] for r in only["sites"]] == ["bank"]


def _scale(world, site: str, factor: float = 10.0) -> None:
    from fedtune.config import Attack
    from fedtune.simulate import forge_update

    forge_update(world.updates / "round-0002" / site, Attack(kind="scale", factor=factor),
                 world.root / "keys" / f"{site}.key")


def test_hold_on_alert_then_promote(rounds, tmp_path):
    from fedtune.registry import Registry

    world = _clone(rounds, tmp_path)
    _scale(world, "bank")
    code, out, err = fedtune("aggregate", *_args(world), "--updates", world.updates / "round-0002",
                             "--hold-on-alert")
    assert code == 0, err
    assert "held on" in out and "alert: update: bank:" in err
    registry = Registry(world.registry)
    assert registry.latest_name() == "v0001"
    assert [h["version"] for h in registry.held()] == ["v0002"]
    manifest = fedkit.read_manifest(world.registry / "v0002")
    assert manifest["monitor"]["held"] is True
    alerts = manifest["monitor"]["alerts"]
    assert {(a["kind"], a["site"], a["metric"]) for a in alerts} == {("update", "bank", "norm_z")}
    status = json.loads(ok("status", "--registry", world.registry, "--json"))
    assert status["latest"]["version"] == "v0001" and status["held"][0]["version"] == "v0002"
    ok("verify", "--registry", world.registry, "--updates", world.updates)
    log = json.loads(ok("log", "--registry", world.registry, "--json"))["entries"]
    assert log[-1]["event"] == "held" and log[-1]["alerts"][0]["site"] == "bank"
    # sites keep training from LATEST; nothing else moves while the version is held
    assert json.loads(ok("verify", "--registry", world.registry, "--json"))["latest"] == "v0001"
    code, _, err = fedtune("aggregate", *_args(world), "--updates", world.updates / "round-0002")
    assert code == 2 and "held on 1 alert(s)" in err
    ok("promote", "v0002", *_args(world), "--reason", "bank confirmed a larger learning rate")
    assert registry.latest_name() == "v0002" and registry.held() == []
    line = registry.versions()[-1]
    assert line["version"] == "v0002" and line["held"]["alerts"] == 1
    ok("verify", "--registry", world.registry, "--updates", world.updates)
    # a site trains the next round from the promoted version as from any other
    from fedtune.train import train_local

    sent = train_local(world.config, "dev", world.prepared("dev"), world.registry, world.updates,
                       key=world.root / "keys" / "dev.key")
    assert fedkit.read_manifest(sent)["parent"]["version"] == "v0002"
    row = json.loads(ok("log", "--registry", world.registry, "--json"))["entries"][-1]
    assert row["version"] == "v0002" and row["held"]["reason"] == "bank confirmed a larger learning rate"
    assert [a["site"] for a in row["alerts"]] == ["bank"]
    assert "HELD" not in ok("log", "--registry", world.registry)
    # rollback still works after a promotion
    ok("rollback", "--registry", world.registry, "--to", "v0001", "--reason", "undo the promotion")
    assert registry.latest_name() == "v0003"
    ok("verify", "--registry", world.registry, "--updates", world.updates)


def test_promote_refuses_forged_unknown_and_unheld(rounds, tmp_path):
    from fedtune.registry import Registry

    world = _clone(rounds, tmp_path)
    _scale(world, "dev", 20.0)
    ok("aggregate", *_args(world), "--updates", world.updates / "round-0002", "--hold-on-alert")
    code, _, err = fedtune("promote", "v0009", *_args(world))
    assert code == 2 and "no such version" in err
    code, _, err = fedtune("promote", "v0001", *_args(world))
    assert code == 2 and "already committed" in err
    # a forger edits the held manifest (e.g. to drop the alert): the coordinator's signature no longer holds
    held = world.registry / "v0002"
    original = (held / "manifest.json").read_bytes()
    manifest = json.loads(original)
    manifest["monitor"]["alerts"] = []
    fedkit.write_manifest(held, manifest)
    code, _, err = fedtune("promote", "v0002", *_args(world))
    assert code == 2 and "signature" in err
    assert Registry(world.registry).latest_name() == "v0001"
    # signed with another key than the coordinator's: refused too
    from fedtune.wire.keys import SigningKey

    SigningKey.generate().write(tmp_path / "other.key", tmp_path / "other.pub")
    fedkit.sign_version(held, tmp_path / "other.key")
    code, _, err = fedtune("promote", "v0002", *_args(world))
    assert code == 2 and "signature" in err
    # a version not made under --hold-on-alert, published but uncommitted, re-signed by the real coordinator, is
    # not held: the next command commits it as an interrupted commit, and promote finds nothing held
    (held / "manifest.json").write_bytes(original)
    fedkit.sign_version(held, world.root / "fed" / "coordinator.key")
    manifest = json.loads(original)
    del manifest["monitor"]["held"]
    fedkit.write_manifest(held, manifest)
    fedkit.sign_version(held, world.root / "fed" / "coordinator.key")
    code, _, err = fedtune("promote", "v0002", *_args(world))
    assert code == 2 and "already committed" in err


def test_reject_sets_held_version_aside(rounds, tmp_path):
    from fedtune.registry import Registry

    world = _clone(rounds, tmp_path)
    _scale(world, "clinic")
    ok("aggregate", *_args(world), "--updates", world.updates / "round-0002", "--hold-on-alert")
    code, _, err = fedtune("promote", "v0002", *_args(world), "--reject")
    assert code == 2 and "--reason" in err
    ok("promote", "v0002", *_args(world), "--reject", "--reason", "clinic's update is ten times its usual size")
    assert not (world.registry / "v0002").exists()
    assert len(list(world.registry.glob("v0002.rejected-*"))) == 1
    assert Registry(world.registry).latest_name() == "v0001"
    ok("verify", "--registry", world.registry)
    # the round is redone without the scaled update
    shutil.rmtree(world.updates / "round-0002" / "clinic")
    ok("aggregate", *_args(world), "--updates", world.updates / "round-0002", "--hold-on-alert")
    assert Registry(world.registry).latest_name() == "v0002"
    ok("verify", "--registry", world.registry, "--updates", world.updates)


def test_shifted_data_raises_data_alert(rounds, tmp_path):
    from fedtune.data import prepare_site
    from fedtune.train import train_local

    world = _clone(rounds, tmp_path)
    # the bank's records become several times longer: same site, same roster, other data
    longer = [{"instruction": r["instruction"] + " " + r["output"], "output": " ".join([r["output"]] * 4)}
              for r in site_records("bank", 40)]
    raw = write_jsonl(tmp_path / "raw" / "bank-long.jsonl", longer)
    shutil.rmtree(world.prepared("bank"))
    prepare_site(world.config, "bank", [raw], world.prepared("bank"))
    shutil.rmtree(world.updates / "round-0002" / "bank")
    train_local(world.config, "bank", world.prepared("bank"), world.registry, world.updates,
                key=world.root / "keys" / "bank.key")
    data = json.loads(ok("aggregate", *_args(world), "--updates", world.updates / "round-0002", "--json"))
    kinds = {(a["kind"], a["site"]) for a in data["alerts"]}
    assert ("data", "bank") in kinds and not data["held"]
    assert {a["site"] for a in data["alerts"] if a["kind"] == "data"} == {"bank"}
    metrics = fedkit.read_manifest(world.registry / "v0002")["monitor"]["sites"]["bank"]
    assert metrics["length_psi"] > 0.25 and metrics["length_js"] > 0.3


@pytest.mark.slow
def test_simulate_records_loo_eval_loss(tmp_path, tiny_model, site_files, capsys):
    """monitor.loo_eval: each round is also merged without each site (same aggregate stage, scratch registry) and
    evaluated; the report holds the change in mean eval loss, and the real registry holds nothing of it."""
    import yaml

    from conftest import run_cli
    from fedtune.config import load_federation
    from fedtune.evaluate import evaluate

    recipe = {"name": "tiny", "model": str(tiny_model), "rounds": 1, "seq_len": 32, "lora": {"r": 4, "alpha": 8},
              "training": {"steps": 3, "batch_size": 4, "lr": 0.01}, "data": {"eval_fraction": 0.2},
              "monitor": {"loo_eval": True},
              "sites": [{"name": site, "inputs": [str(path)]} for site, path in site_files.items()]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    code, _, stderr = run_cli(["simulate", tmp_path / "recipe.yaml", "--out", out], capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    records = report["rounds"][0]["loo_eval"]
    assert set(records) == set(site_files)
    assert sorted(p.name for p in (out / "registry").iterdir() if p.name.startswith("v")) == ["v0000", "v0001"]
    assert not (out / ".loo-eval").exists()
    # recompute one candidate by hand: the round merged without the bank, evaluated on every site
    from fedtune.aggregate import aggregate_round

    config = load_federation(out / "federation.yaml")
    scratch = tmp_path / "by-hand"
    shutil.copytree(out / "registry", scratch / "registry")
    (scratch / "registry" / "LATEST").write_text("v0000\n")
    lines = (scratch / "registry" / "log.jsonl").read_bytes().splitlines(keepends=True)
    (scratch / "registry" / "log.jsonl").write_bytes(lines[0])
    shutil.rmtree(scratch / "registry" / "v0001")
    for site in ("clinic", "dev"):
        shutil.copytree(out / "updates" / "round-0001" / site, scratch / "updates" / "round-0001" / site)
    result = aggregate_round(config, scratch / "registry", scratch / "updates" / "round-0001",
                             key=out / "coordinator.key", closed=True)
    losses = evaluate(config, result.folder, [out / "prepared" / s for s in site_files])["sites"]
    without = float(np.mean([losses[s]["loss"] for s in site_files]))
    assert records["bank"]["loss_without"] == pytest.approx(without, rel=1e-5)
    full = float(np.mean([report["rounds"][0]["eval"][s] for s in site_files]))
    assert records["bank"]["loo_eval_loss"] == pytest.approx(without - full, abs=1e-5)
