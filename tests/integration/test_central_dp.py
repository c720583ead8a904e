"""Central site-level DP-FedAvg: the noise on the released average has the stated std, clipping bounds every
site's contribution, ε is recorded per version as the accountant computes it, and the budget stops rounds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedkit
from conftest import run_cli
from fedtune.aggregate import aggregate_round
from fedtune.config import FederationConfig, parse_model
from fedtune.errors import BadInput
from fedtune.privacy.accountant import epsilon

ADAPTER = "adapter_model.safetensors"
SITES = ("bank", "clinic", "dev")


def _world(tiny_model, root, lora: dict | None = None, **privacy):
    extra = {"lora": lora} if lora else {}
    return fedkit.build_world(root, tiny_model, overrides={"privacy": {"mode": "central", **privacy}, **extra})


@pytest.fixture(scope="module")
def noisy(tiny_model, tmp_path_factory):
    """Rank 32 on every linear layer, so each version has tens of thousands of noisy coordinates."""
    return _world(tiny_model, tmp_path_factory.mktemp("dp"), lora={"r": 32, "alpha": 64, "target_modules": "all-linear"},
                  clip_norm=0.05, noise_multiplier=2.0)


def _expected_mean(world, clip: float) -> dict[str, torch.Tensor]:
    """parent + Σ_k (1/n) · min(1, C/‖δ_k‖) · δ_k over the roster's n sites: the average before its noise."""
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    total = {k: v.double().clone() for k, v in parent.items()}
    for site in SITES:
        delta = fedkit.load_tensors(world.round1 / site)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values())))
        scale = min(1.0, clip / norm) / len(SITES)
        for key, tensor in delta.items():
            total[key] += scale * tensor.double()
    return total


def test_noise_on_the_average_has_std_z_c_over_n(noisy, tmp_path):
    """The version minus the noiseless clipped average is pure noise: its per-coordinate std is zC/n (2 %)."""
    expected = _expected_mean(noisy, 0.05)
    residuals = []
    for trial in range(8):  # fresh noise each time, pooled
        world = fedkit.clone_world(noisy, tmp_path / f"t{trial}")
        version = aggregate_round(world.config, world.registry, world.round1).folder
        merged = load_file(str(version / ADAPTER))
        residuals += [(merged[k].double() - expected[k]).flatten() for k in expected]
    noise = torch.cat(residuals)
    assert noise.numel() > 200_000  # the std's own sampling error is then under 0.2 %
    target = 2.0 * 0.05 / len(SITES)
    assert float(noise.std()) == pytest.approx(target, rel=0.02)
    assert abs(float(noise.mean())) < 4 * target / noise.numel() ** 0.5


def test_clipping_bounds_each_sites_contribution(tiny_model, tmp_path):
    """With noise negligible, the version is exactly parent + Σ (1/n)·clip_C(δ_k): a site that inflates its update
    ×1000 moves the version by at most C/n."""
    world = _world(tiny_model, tmp_path, clip_norm=0.02, noise_multiplier=1e-6)
    big = {k: v * 1000 for k, v in fedkit.load_tensors(world.round1 / "dev").items()}
    fedkit.forge_update(world.round1 / "dev", tensors=big)
    result = aggregate_round(world.config, world.registry, world.round1)
    merged = load_file(str(result.folder / ADAPTER))
    expected = _expected_mean(world, 0.02)
    for key in expected:
        torch.testing.assert_close(merged[key].double(), expected[key], atol=1e-5, rtol=0)
    by_site = {c["site"]: c for c in result.contributors}
    assert all(c["weight"] == pytest.approx(1 / 3) for c in by_site.values())
    dev = by_site["dev"]
    assert dev["clip_scale"] < 1e-3 and dev["clip_scale"] == pytest.approx(0.02 / dev["norm"], abs=1e-6)  # 6 decimals


def test_epsilon_is_recorded_per_version_and_the_budget_stops_rounds(tiny_model, tmp_path, capsys):
    world = _world(tiny_model, tmp_path, clip_norm=0.05, target_epsilon=3.0, rounds=1)
    z = world.config.privacy.noise_multiplier
    assert z is not None and epsilon(z, 1.0, 1, 1e-5) <= 3.0  # init calibrated the noise for one round
    v0 = fedkit.read_manifest(world.registry / "v0000")["privacy"]
    assert v0["mode"] == "central" and v0["rounds_accounted"] == 0 and v0["epsilon"] == 0.0

    result = aggregate_round(world.config, world.registry, world.round1)
    spent = fedkit.read_manifest(result.folder)["privacy"]
    assert spent["rounds_accounted"] == 1 and spent["noise_multiplier"] == z
    assert spent["epsilon"] == pytest.approx(epsilon(z, 1.0, 1, 1e-5)) and spent["epsilon"] <= 3.0
    code, out, _ = run_cli(["log", "--registry", world.registry, "--json"], capsys)
    assert code == 0 and [r["privacy"].get("epsilon") for r in json.loads(out)["entries"]] == [
        0.0, spent["epsilon"]]

    # Round 2 would spend past the target: train-local refuses to train for it, aggregate writes nothing.
    from fedtune.train import train_local

    with pytest.raises(BadInput, match="the privacy budget is spent — round 2 would take ε to"):
        train_local(world.config, "dev", world.prepared("dev"), world.registry, world.updates)
    round2 = world.updates / "round-0002"
    shutil.copytree(world.round1, round2)
    before = sorted(p.name for p in world.registry.iterdir())
    code, _, err = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                            "--updates", round2], capsys)
    assert code == 2 and "the privacy budget is spent" in err and "v0001 stays the federation's last version" in err
    assert sorted(p.name for p in world.registry.iterdir()) == before


@pytest.mark.parametrize("method", ["median", "krum", "svd", "trimmed-mean"])
def test_dp_refuses_methods_that_break_the_sensitivity_bound(method):
    with pytest.raises(BadInput, match=f"aggregation.method {method} would break the sensitivity bound"):
        parse_model(FederationConfig, {"sites": [{"name": "a"}], "aggregation": {"method": method},
                                       "privacy": {"mode": "central", "noise_multiplier": 1.0}}, "federation.yaml")


def test_dp_needs_noise_or_a_budget():
    with pytest.raises(BadInput, match="give noise_multiplier, or target_epsilon"):
        parse_model(FederationConfig, {"sites": [{"name": "a"}], "privacy": {"mode": "central"}}, "federation.yaml")
    config = parse_model(FederationConfig, {"sites": [{"name": "a"}], "aggregation": {"method": "ffa"},
                                            "privacy": {"mode": "central", "noise_multiplier": 1.0}}, "f")
    assert config.privacy.mode == "central"


def test_ffa_under_dp_leaves_the_frozen_factor_untouched(tiny_model, tmp_path):
    world = fedkit.build_world(tmp_path, tiny_model, overrides={
        "aggregation": {"method": "ffa"}, "privacy": {"mode": "central", "clip_norm": 0.05, "noise_multiplier": 1.0}})
    result = aggregate_round(world.config, world.registry, world.round1)
    parent, merged = load_file(str(world.registry / "v0000" / ADAPTER)), load_file(str(result.folder / ADAPTER))
    a_keys = [k for k in parent if "lora_A" in k]
    assert a_keys and all(torch.equal(merged[k], parent[k]) for k in a_keys)
    assert any(not torch.equal(merged[k], parent[k]) for k in parent if "lora_B" in k)
    assert np.isfinite(fedkit.read_manifest(result.folder)["privacy"]["epsilon"])


def test_distributed_dp_each_site_clips_and_adds_its_share_of_the_noise(tiny_model, tmp_path):
    """Training is seeded, so a site's update in a federation without DP is the same delta before clipping and
    noise: the distributed update minus the clipped plain one is the site's noise, of std zC/√quorum."""
    plain = fedkit.build_world(tmp_path / "plain", tiny_model,
                               overrides={"lora": {"r": 32, "alpha": 64, "target_modules": "all-linear"}})
    private = fedkit.build_world(tmp_path / "private", tiny_model, overrides={
        "lora": {"r": 32, "alpha": 64, "target_modules": "all-linear"},
        "privacy": {"mode": "distributed", "clip_norm": 0.05, "noise_multiplier": 2.0}})
    quorum = private.config.aggregation.quorum
    residuals = []
    for site in SITES:
        before = fedkit.load_tensors(plain.round1 / site)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in before.values())))
        clipped = {k: v.double() * min(1.0, 0.05 / norm) for k, v in before.items()}
        sent = fedkit.load_tensors(private.round1 / site)
        residuals += [(sent[k].double() - clipped[k]).flatten() for k in clipped]
        record = fedkit.read_manifest(private.round1 / site)["privacy"]
        assert record == {"mechanism": "distributed", "clip_norm": 0.05, "noise_std": pytest.approx(2.0 * 0.05 / quorum ** 0.5)}
    noise = torch.cat(residuals)
    assert noise.numel() > 50_000
    assert float(noise.std()) == pytest.approx(2.0 * 0.05 / quorum ** 0.5, rel=0.02)

    # The coordinator only averages (fixed 1/n), and records the ε of z for the round.
    result = aggregate_round(private.config, private.registry, private.round1)
    parent = load_file(str(private.registry / "v0000" / ADAPTER))
    merged = load_file(str(result.folder / ADAPTER))
    sums = {k: parent[k].double() + sum(fedkit.load_tensors(private.round1 / s)[k].double() for s in SITES) / 3
            for k in parent}
    for key in parent:
        torch.testing.assert_close(merged[key].double(), sums[key], atol=1e-6, rtol=0)
    assert fedkit.read_manifest(result.folder)["privacy"]["epsilon"] == pytest.approx(epsilon(2.0, 1.0, 1, 1e-5))


def test_distributed_dp_rejects_an_update_sent_without_its_noise(tiny_model, tmp_path):
    world = fedkit.build_world(tmp_path, tiny_model, overrides={
        "privacy": {"mode": "distributed", "clip_norm": 0.05, "noise_multiplier": 1.0}})
    fedkit.forge_update(world.round1 / "dev", privacy={"mechanism": None})
    result = aggregate_round(world.config, world.registry, world.round1)
    assert [r["site"] for r in result.rejected] == ["dev"]
    assert "this federation's distributed DP needs each update clipped to 0.05" in result.rejected[0]["reason"]
