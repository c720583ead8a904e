"""Poisson sampling of sites under central DP (privacy.sample_rate q < 1): the coordinator's signed draw decides
who trains and whose update counts, the released average divides by the expected count q·n whoever answered,
and the accountant is charged with q."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
from safetensors.torch import load_file

import fedkit
from conftest import run_cli
from fedtune.aggregate import aggregate_round
from fedtune.config import FederationConfig, parse_model
from fedtune.errors import BadInput
from fedtune.privacy.accountant import epsilon
from fedtune.privacy.sampling import draw_sample
from fedtune.train import compute_update, train_local
from fedtune.wire import SigningKey
from fedtune.wire.sample import SAMPLE_FILE, write_sample
from fedtune.wire.update import encode_update, write_update

ADAPTER = "adapter_model.safetensors"
SITES = ("bank", "clinic", "dev")
Q = 0.5


@pytest.fixture(scope="module")
def sampled(tiny_model, tmp_path_factory):
    """A central-DP federation that samples sites with q = 0.5; nothing trained yet."""
    return fedkit.build_world(tmp_path_factory.mktemp("sampled"), tiny_model, train=False, keys=True, overrides={
        "privacy": {"mode": "central", "clip_norm": 0.02, "noise_multiplier": 1e-6, "sample_rate": Q}})


def _coordinator(world) -> SigningKey:
    return SigningKey.load(world.fed / "coordinator.key")


def _sample(world, sites, signer: SigningKey | None = None) -> None:
    """The coordinator's draw for round 1, with the sites chosen by the test."""
    parent = fedkit.read_manifest(world.registry / "v0000")
    write_sample(world.round1, {
        "format": "fedtune.sample/1", "federation": world.config.name, "round": 1,
        "parent": {"version": "v0000", "sha256": parent["adapter_sha256"]}, "sample_rate": Q, "roster": len(SITES),
        "sites": list(sites), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }, signer or _coordinator(world))


def _train(world, site):
    return train_local(world.config, site, world.prepared(site), world.registry, world.updates,
                       key=world.root / "keys" / f"{site}.key")


def _clipped_mean(world, sites, clip, expected_count):
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    total = {k: v.double().clone() for k, v in parent.items()}
    for site in sites:
        delta = fedkit.load_tensors(world.round1 / site)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values())))
        for key, tensor in delta.items():
            total[key] += min(1.0, clip / norm) / expected_count * tensor.double()
    return total


def test_only_drawn_sites_train_and_count_with_weights_over_the_expected_count(sampled, tmp_path):
    world = fedkit.clone_world(sampled, tmp_path / "w")
    _sample(world, ["bank", "dev"])
    for site in ("bank", "dev"):
        _train(world, site)
    with pytest.raises(BadInput, match="clinic was not drawn for round 1"):
        _train(world, "clinic")
    # A site left out of the draw that trains and signs an update anyway (without train-local's check) does not count.
    update = compute_update(world.config, "clinic", world.prepared("clinic"), world.registry)
    write_update(world.round1 / "clinic", encode_update(update.tensors, update.fields, update.adapter_config,
                                                         SigningKey.load(world.root / "keys" / "clinic.key")))
    result = aggregate_round(world.config, world.registry, world.round1)
    assert sorted(c["site"] for c in result.contributors) == ["bank", "dev"]
    assert any("was not drawn" in r["reason"] for r in result.rejected)
    assert all(c["weight"] == pytest.approx(1 / (Q * len(SITES))) for c in result.contributors)
    merged = load_file(str(result.folder / ADAPTER))
    expected = _clipped_mean(world, ["bank", "dev"], 0.02, Q * len(SITES))
    for key in expected:
        torch.testing.assert_close(merged[key].double(), expected[key], atol=1e-5, rtol=0)
    privacy = fedkit.read_manifest(result.folder)["privacy"]
    assert privacy["sample_rate"] == Q
    assert privacy["epsilon"] == pytest.approx(epsilon(1e-6, Q, 1, 1e-5, "rdp"))


def test_an_empty_draw_still_releases_a_noisy_version(tiny_model, tmp_path):
    """Nobody was called: the round releases the parent plus noise of std zC/(q·n) — skipping it would make whether
    a round happened depend on the draw the accountant counts as secret."""
    world = fedkit.build_world(tmp_path, tiny_model, train=False, keys=True, overrides={
        "lora": {"r": 32, "alpha": 64, "target_modules": "all-linear"},
        "privacy": {"mode": "central", "clip_norm": 0.05, "noise_multiplier": 2.0, "sample_rate": Q}})
    _sample(world, [])
    result = aggregate_round(world.config, world.registry, world.round1)
    assert result.contributors == []
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    merged = load_file(str(result.folder / ADAPTER))
    noise = torch.cat([(merged[k].double() - parent[k].double()).flatten() for k in parent])
    assert noise.numel() > 20_000
    assert float(noise.std()) == pytest.approx(2.0 * 0.05 / (Q * len(SITES)), rel=0.05)


def test_a_sample_not_signed_by_the_coordinator_is_refused(sampled, tmp_path):
    world = fedkit.clone_world(sampled, tmp_path / "w")
    _sample(world, ["bank", "clinic", "dev"], signer=SigningKey.generate())
    with pytest.raises(BadInput, match="signature is not the coordinator's"):
        _train(world, "bank")
    with pytest.raises(BadInput, match="signature is not the coordinator's"):
        aggregate_round(world.config, world.registry, world.round1)


def test_a_sample_edited_after_signing_is_refused(sampled, tmp_path):
    world = fedkit.clone_world(sampled, tmp_path / "w")
    _sample(world, ["bank"])
    _train(world, "bank")
    path = world.round1 / SAMPLE_FILE
    document = json.loads(path.read_text())
    document["sample"]["sites"].append("dev")  # the coordinator's operator adds a site after the draw
    path.write_text(json.dumps(document))
    with pytest.raises(BadInput, match="signature is not the coordinator's"):
        aggregate_round(world.config, world.registry, world.round1)


def test_a_round_without_a_draw_is_refused(sampled, tmp_path):
    world = fedkit.clone_world(sampled, tmp_path / "w")
    with pytest.raises(BadInput, match="sample.json: not found"):
        _train(world, "bank")


def test_draws_are_poisson_with_rate_q_and_drawn_once(sampled, tmp_path, capsys):
    world = fedkit.clone_world(sampled, tmp_path / "w")
    code, out, err = run_cli(["sample", "--config", world.config_path, "--registry", world.registry,
                              "--updates", world.updates, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["round"] == 1
    code, _out, err = run_cli(["sample", "--config", world.config_path, "--registry", world.registry,
                               "--updates", world.updates], capsys)
    assert code == 2 and "already drawn" in err
    counts = {site: 0 for site in SITES}
    draws = 300
    for index in range(draws):
        for site in draw_sample(world.config, world.registry, tmp_path / f"u{index}")["sites"]:
            counts[site] += 1
    bound = 4 * (draws * Q * (1 - Q)) ** 0.5  # four standard deviations of a binomial count
    for site, count in counts.items():
        assert abs(count - draws * Q) < bound, (site, count)


def test_sampling_is_accounted_only_in_central_mode():
    for mode in ("distributed", "local"):
        with pytest.raises(BadInput, match="site sampling is accounted for in mode central only"):
            parse_model(FederationConfig, {"sites": [{"name": "a"}], "privacy": {
                "mode": mode, "noise_multiplier": 1.0, "sample_rate": 0.5,
                "local": {"noise_multiplier": 1.0}}}, "federation.yaml")
