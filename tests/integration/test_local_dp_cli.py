"""privacy.mode local end to end: train-local runs DP-SGD and each update states its site's record-level ε from the
site's ledger; aggregate checks that claim against the federation and records every site's ε in the version; an
update claiming less protection than the federation requires is rejected even when its site signed it."""

from __future__ import annotations

import json
import stat

import pyarrow.parquet as pq
import pytest
import torch

import fedkit
import forge
from conftest import run_cli
from fedtune.aggregate import aggregate_round
from fedtune.privacy.accountant import epsilon
from fedtune.privacy.local import LEDGER_FILE, sample_rate
from fedtune.train import compute_update

SITES = ("bank", "clinic", "dev")
PRIVACY = {"mode": "local", "local": {"noise_multiplier": 1.0, "example_clip_norm": 0.5, "target_epsilon": 40.0}}


@pytest.fixture(scope="module")
def private(tiny_model, tmp_path_factory):
    """Three signing sites that trained round 1 under local DP (z 1.0, C 0.5)."""
    return fedkit.build_world(tmp_path_factory.mktemp("local-dp"), tiny_model, overrides={"privacy": PRIVACY},
                              keys=True)


def _spent(world, site: str, rounds: int) -> tuple[float, float]:
    """(q, ε) of `rounds` rounds of the federation's steps for `site`, by the accountant directly."""
    card = json.loads((world.prepared(site) / "data_card.json").read_text())
    assert card["packing_mode"] == "whole-records"
    batch = world.config.training.batch_size * world.config.training.grad_accum
    q = sample_rate(pq.read_metadata(world.prepared(site) / "train.parquet").num_rows, batch)
    return q, epsilon(1.0, q, world.config.training.steps * rounds, 1e-5)


def test_train_local_states_each_sites_epsilon_and_the_version_records_them(private, tmp_path, capsys):
    world = fedkit.clone_world(private, tmp_path / "w")
    reported = {}
    for site in SITES:
        record = fedkit.read_manifest(world.round1 / site)["privacy"]
        q, spent = _spent(world, site, 1)
        assert record == {"mechanism": "local", "example_clip_norm": 0.5, "noise_multiplier": 1.0, "sample_rate": q,
                          "steps": world.config.training.steps, "rounds": 1, "delta": 1e-5, "accountant": "rdp",
                          "epsilon": pytest.approx(spent, rel=1e-9)}
        reported[site] = record["epsilon"]
        ledger = world.prepared(site) / LEDGER_FILE
        assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
        assert len(json.loads(ledger.read_text())["entries"]) == 1

    result = aggregate_round(world.config, world.registry, world.round1)
    assert result.rejected == [] and sorted(c["site"] for c in result.contributors) == list(SITES)
    privacy = fedkit.read_manifest(result.folder)["privacy"]
    assert privacy["mode"] == "local" and privacy["site_epsilon"] == reported
    assert privacy["epsilon"] == max(reported.values()) and privacy["clip_norm"] == 0.5
    assert privacy["target_epsilon"] == 40.0 and privacy["delta"] == 1e-5

    # Round 2 from the CLI without bank: the ledgers of clinic and dev hold two runs, and v0002 still states bank's
    # ε, since its records shaped v0001 and so v0002.
    for site in ("clinic", "dev"):
        code, out, err = run_cli(["train-local", "--config", world.config_path, "--site", site, "--data",
                                  world.prepared(site), "--global", world.registry, "--out", world.updates,
                                  "--key", world.root / "keys" / f"{site}.key", "--json"], capsys)
        assert code == 0, err
        record = json.loads(out)["privacy"]
        assert record["rounds"] == 2 and record["epsilon"] == pytest.approx(_spent(world, site, 2)[1], rel=1e-9)
        reported[site] = record["epsilon"]
    code, _, err = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry, "--updates",
                            world.updates / "round-0002"], capsys)
    assert code == 0, err
    privacy = fedkit.read_manifest(world.registry / "v0002")["privacy"]
    assert privacy["site_epsilon"] == reported and privacy["epsilon"] == max(reported.values())
    code, _, err = run_cli(["verify", "--registry", world.registry, "--updates", world.updates], capsys)
    assert code == 0, err
    # The log states ε per version: 0 before any training, then the largest site ε of each version.
    code, out, err = run_cli(["log", "--registry", world.registry, "--json"], capsys)
    assert code == 0, err
    spent = {row["version"]: row["privacy"]["epsilon"] for row in json.loads(out)["entries"] if row["event"] == "version"}
    assert spent["v0000"] == 0.0 and spent["v0002"] == max(reported.values())
    code, out, err = run_cli(["log", "--registry", world.registry], capsys)
    assert code == 0, err
    assert f"ε {max(reported.values()):.3f}" in out.replace("\n", " ")


@pytest.mark.parametrize("claim, fragment", [
    ({"noise_multiplier": 0.5}, "noise_multiplier ≥ 1.0"),
    ({"example_clip_norm": 5.0}, "example_clip_norm ≤ 0.5"),
    ({"delta": 1e-3}, "at δ ≤ 1e-05"),
    ({"epsilon": 0.01}, "below the"),
    ({"epsilon": 41.0}, "past privacy.local.target_epsilon 40.0"),
    ({"mechanism": None}, "needs DP-SGD"),
])
def test_an_update_claiming_less_protection_is_rejected(private, tmp_path, claim, fragment):
    world = fedkit.clone_world(private, tmp_path / "w")
    folder = world.round1 / "dev"
    record = {**forge.manifest_of(folder)["privacy"], **claim}
    # Signed by dev's own key: only the claim is wrong.
    forge.resign(folder, forge.key_of(world.root, "dev"), privacy=record)
    result = aggregate_round(world.config, world.registry, world.round1)
    assert [r["site"] for r in result.rejected] == ["dev"]
    assert fragment in result.rejected[0]["reason"]
    assert sorted(c["site"] for c in result.contributors) == ["bank", "clinic"]


def test_the_noise_is_not_fixed_by_the_seed(private, tmp_path):
    """Non-private training is seeded and reruns identically; under local DP two runs from the same seed and data
    differ (noise and sample come from the OS), and each run is entered in the ledger."""
    world = fedkit.clone_world(private, tmp_path / "w")
    first, second = (compute_update(world.config, "dev", world.prepared("dev"), world.registry) for _ in range(2))
    assert first.tensors.keys() == second.tensors.keys()
    assert all(not torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    assert len(json.loads((world.prepared("dev") / LEDGER_FILE).read_text())["entries"]) == 3


def test_a_spent_budget_stops_train_local_with_one_line(private, tmp_path, capsys):
    world = fedkit.clone_world(private, tmp_path / "w")
    _, one_round = _spent(world, "dev", 1)
    text = world.config_path.read_text()
    assert "target_epsilon: 40.0" in text
    world.config_path.write_text(text.replace("target_epsilon: 40.0", f"target_epsilon: {one_round * 1.01:.6f}"))
    ledger = (world.prepared("dev") / LEDGER_FILE).read_bytes()
    outbox = tmp_path / "outbox"
    code, out, err = run_cli(["train-local", "--config", world.config_path, "--site", "dev", "--data",
                              world.prepared("dev"), "--global", world.registry, "--out", outbox, "--key",
                              world.root / "keys" / "dev.key"], capsys)
    assert code == 2 and out == ""
    line = err.rstrip().splitlines()[-1]  # after the model's loading progress
    assert line.startswith(f"error: {world.prepared('dev') / LEDGER_FILE}: round 1 would take this site's "
                           "record-level ε to") and "past privacy.local.target_epsilon" in line
    assert (world.prepared("dev") / LEDGER_FILE).read_bytes() == ledger
    assert not (outbox / "round-0001" / "dev").exists()
