"""fedtune.aggregate: FedAvg and trimmed mean against hand computation and scipy, the global version's
manifest and lineage, plain-peft loading, and every way an update is rejected."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import trim_mean

import fedkit
from conftest import tree_digest
from fedtune.aggregate import aggregate_round, make_method
from fedtune.aggregate.engine import site_weights
from fedtune.aggregate.mean import FedAvg
from fedtune.aggregate.robust import TrimmedMean
from fedtune.config import AggregationSettings
from fedtune.errors import BadInput, VerifyFailed
from fedtune.registry import Registry
from fedtune.verify import verify_registry

ADAPTER = fedkit.ADAPTER


# ---------------------------------------------------------------- worlds built once per module

@pytest.fixture(scope="module")
def world3(tiny_model, tmp_path_factory):
    """clinic, bank, dev trained for round 1 (what round_one gives), built once and cloned per test."""
    return fedkit.build_world(tmp_path_factory.mktemp("world3"), tiny_model)


@pytest.fixture(scope="module")
def world5(tiny_model, tmp_path_factory):
    """Five sites on the roster, five real trained updates (east and west on data of their own)."""
    return fedkit.build_world(tmp_path_factory.mktemp("world5"), tiny_model,
                              extra_sites={"east": ("bank", 25), "west": ("clinic", 31)})


@pytest.fixture
def world(world3, tmp_path):
    return fedkit.clone_world(world3, tmp_path / "w")


def _deltas(round_dir, sites):
    return [load_file(str(round_dir / s / ADAPTER)) for s in sites]


def _fedavg_expected(parent, round_dir, sites, max_weight=0.5):
    """Example-weighted mean of the deltas, no site above the default weight cap (0.5; the excess goes to the
    others in proportion)."""
    counts = [fedkit.read_manifest(round_dir / s)["num_examples"] for s in sites]
    weights = site_weights(counts, True, max_weight)
    deltas = _deltas(round_dir, sites)
    return {k: parent[k].double() + sum(float(w) * d[k].double() for w, d in zip(weights, deltas)) for k in parent}


def _assert_tensors_close(got, expected, atol=1e-6):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key].double(), expected[key].double(), atol=atol, rtol=0, msg=key)


# ---------------------------------------------------------------- FedAvg

def test_fedavg_is_the_example_weighted_mean_of_the_deltas(federation, round_one):
    config, folder = federation
    registry = folder / "registry"
    parent = load_file(str(registry / "v0000" / ADAPTER))
    sites = ["bank", "clinic", "dev"]
    counts = [fedkit.read_manifest(round_one / s)["num_examples"] for s in sites]
    assert len(set(counts)) > 1, "the sites' sizes should differ so the weighting matters"

    result = aggregate_round(config, registry, round_one)

    assert result.version == "v0001" and result.rejected == []
    got = load_file(str(registry / "v0001" / ADAPTER))
    expected = _fedavg_expected(parent, round_one, sites)
    _assert_tensors_close(got, expected)
    # The weighting matters: the plain mean is measurably different.
    deltas = _deltas(round_one, sites)
    key = fedkit.first_key(round_one / "dev")
    plain = parent[key] + sum(d[key] for d in deltas) / 3
    assert (got[key] - plain).abs().max() > 1e-5
    # lora_B moved away from v0000 (all zeros) and lora_A moved too.
    assert all(got[k].abs().max() > 0 for k in got if "lora_B" in k)
    assert parent[key].abs().max() == 0
    by_site = {c["site"]: c for c in result.contributors}
    total = sum(counts)
    for site, n in zip(sites, counts):
        assert by_site[site]["num_examples"] == n
        assert by_site[site]["weight"] == pytest.approx(n / total, abs=1e-8)
        assert by_site[site]["update_sha256"] == fedkit.sha256(round_one / site / ADAPTER)


def test_fedavg_is_weighted_and_trimmed_mean_is_not():
    assert FedAvg().weighted is True
    assert make_method("trimmed-mean", AggregationSettings(trim=0.2)).weighted is False
    assert make_method("fedavg").name == "fedavg"


# ---------------------------------------------------------------- trimmed mean

def test_trimmed_mean_of_five_updates_matches_scipy(world5, tmp_path):
    world = fedkit.clone_world(world5, tmp_path / "w")
    sites = ["bank", "clinic", "dev", "east", "west"]
    assert sorted(p.name for p in world.round1.iterdir()) == sites
    parent = load_file(str(world.registry / "v0000" / ADAPTER))

    result = aggregate_round(world.config, world.registry, world.round1, method="trimmed-mean", trim=0.2)

    got = load_file(str(world.registry / "v0001" / ADAPTER))
    deltas = _deltas(world.round1, sites)
    moved_from_mean = 0.0
    for key in parent:
        stacked = np.stack([d[key].numpy().astype(np.float64) for d in deltas])
        expected = trim_mean(stacked, 0.2, axis=0) + parent[key].numpy()
        np.testing.assert_allclose(got[key].numpy(), expected, atol=1e-6, rtol=0, err_msg=key)
        moved_from_mean = max(moved_from_mean, float(np.abs(expected - (stacked.mean(0) + parent[key].numpy())).max()))
    assert moved_from_mean > 1e-5, "trimming one value per tail should change the result"
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert manifest["method"] == "trimmed-mean" and manifest["params"]["trim"] == 0.2
    assert [c["weight"] for c in result.contributors] == [0.2] * 5  # unweighted
    assert sorted(c["site"] for c in manifest["contributors"]) == sites


@pytest.mark.parametrize("count,trim", [(5, 0.2), (7, 0.2), (10, 0.25), (10, 0.1), (9, 0.45), (4, 0.2), (3, 0.0)])
def test_trimmed_mean_combine_matches_scipy_with_outliers(count, trim):
    generator = torch.Generator().manual_seed(count)
    stacked = torch.randn(count, 6, 5, generator=generator)
    stacked[0, 0] = 1e6  # a hostile site pushing one row up
    stacked[-1, :, 0] = -1e6  # another pushing one column down
    stacked[count // 2, 2, 2] = float(count)  # a tie-free moderate value
    got = TrimmedMean(trim=trim).combine(stacked, torch.full((count,), 1.0 / count))
    expected = trim_mean(stacked.double().numpy(), trim, axis=0)
    # float32 sums: allow the rounding of the values summed (visible only where ±1e6 are kept, trim·K < 1).
    bound = 1e-5 + 2e-7 * stacked.double().abs().sum(0).numpy()
    assert (np.abs(got.double().numpy() - expected) <= bound).all(), np.abs(got.double().numpy() - expected).max()
    if int(trim * count) >= 1:
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-5)
        assert np.abs(got.numpy()).max() < 10  # the ±1e6 outliers were cut


def test_trimmed_mean_ignores_one_outlier_per_coordinate():
    honest = torch.tensor([[1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0]])
    stacked = torch.cat([honest, torch.tensor([[1e9, -1e9]])])
    got = TrimmedMean(trim=0.2).combine(stacked, torch.full((5,), 0.2, dtype=torch.float64), 0)
    # Column 0 drops 1 and 1e9 → mean(2, 3, 4); column 1 drops -1e9 and 5 → mean(2, 3, 4).
    torch.testing.assert_close(got, torch.tensor([3.0, 3.0]))
    # The mean is wrecked by the same outlier.
    assert stacked.mean(0).abs().min() > 1e7


def test_trim_that_cuts_nothing_is_the_mean():
    stacked = torch.arange(12, dtype=torch.float32).reshape(4, 3) ** 2
    weights = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(TrimmedMean(trim=0.2).combine(stacked, weights, 0), stacked.mean(0))
    torch.testing.assert_close(TrimmedMean(trim=0.0).combine(stacked, weights, 0), stacked.mean(0))


@pytest.mark.parametrize("name,trim,fragment", [("krum-ish", 0.2, "unknown method"), ("trimmed-mean", 0.5, "trim:"),
                                                ("trimmed-mean", -0.1, "trim:")])
def test_aggregate_rejects_bad_choices(world, name, trim, fragment):
    with pytest.raises(BadInput, match=fragment):
        aggregate_round(world.config, world.registry, world.round1, method=name, trim=trim)
    assert not (world.registry / "v0001").exists()


# ---------------------------------------------------------------- the new global version

def test_new_version_manifest_latest_and_log(world):
    registry = Registry(world.registry)
    assert registry.latest_name() == "v0000"

    result = aggregate_round(world.config, world.registry, world.round1)

    version = world.registry / "v0001"
    assert result.folder == version
    assert registry.latest_name() == "v0001"
    assert (world.registry / "LATEST").read_text() == "v0001\n"
    manifest = fedkit.read_manifest(version)
    assert manifest["format"] == "fedtune.global/2"
    assert manifest["version"] == "v0001" and manifest["round"] == 1 and manifest["parent"] == "v0000"
    assert manifest["method"] == "fedavg" and manifest["rejected"] == []
    assert manifest["adapter_sha256"] == fedkit.sha256(version / ADAPTER)
    assert manifest["base_model"]["sha256"] == world.config.base_model.sha256
    weights = [c["weight"] for c in manifest["contributors"]]
    assert len(weights) == 3 and all(0 < w < 1 for w in weights)
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-6)
    assert {c["site"]: c["update_sha256"] for c in manifest["contributors"]} == {
        s: fedkit.read_manifest(world.round1 / s)["sha256"] for s in ("bank", "clinic", "dev")}
    assert json.loads((version / "adapter_config.json").read_text())["r"] == world.config.lora.r

    assert verify_registry(world.registry, world.config)["latest"] == "v0001"
    entries = registry.entries()
    assert [e["version"] for e in entries] == ["v0000", "v0001"]
    assert entries[1]["adapter_sha256"] == manifest["adapter_sha256"]
    assert entries[1]["manifest_sha256"] == fedkit.sha256(version / "manifest.json")
    # No temporary folders are left behind.
    assert sorted(p.name for p in world.registry.iterdir()) == [".lock", "LATEST", "log.jsonl", "v0000", "v0001"]


def test_log_verification_catches_an_edited_line(world):
    aggregate_round(world.config, world.registry, world.round1)
    log = world.registry / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["adapter_sha256"] = "0" * 64
    lines[0] = json.dumps(first, sort_keys=True) + "\n"
    log.write_text("".join(lines))
    with pytest.raises(VerifyFailed, match="line 1"):
        verify_registry(world.registry, world.config)


def _merged_base(tiny_model, adapter_dir, scaling):
    """The base model with ΔW = scaling · B @ A added to each targeted weight by hand (no peft)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tensors = load_file(str(adapter_dir / ADAPTER))
    merged = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = model.get_submodule(key.removeprefix("base_model.model.").split(".lora_A.")[0])
            module.weight += scaling * (b @ a)
            merged += 1
    assert merged == 2 * model.config.num_hidden_layers  # q_proj and v_proj of every layer
    return model


def test_version_loads_with_plain_peft_and_gives_the_merged_logits(world, tiny_model):
    """The 'same logits' test: plain peft, a hand merge and fedtune's evaluate agree on v0001."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.data.prepared import read_prepared
    from fedtune.evaluate import evaluate

    aggregate_round(world.config, world.registry, world.round1)
    version = world.registry / "v0001"
    _card, ids, labels = read_prepared(world.prepared("clinic"), world.config, "eval")
    x = torch.from_numpy(ids)

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        base_logits = base(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), version).eval()
        peft_logits = peft_model(input_ids=x).logits
        merged = _merged_base(tiny_model, version, scaling=world.config.lora.alpha / world.config.lora.r)
        merged_logits = merged(input_ids=x).logits

    assert (peft_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-5, rtol=0)

    # fedtune's own loading path (evaluate) gives the loss of the hand-merged model.
    y = torch.from_numpy(labels).long()
    with torch.no_grad():
        logits = merged(input_ids=x).logits[:, :-1]
        target = y[:, 1:]
        manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
    count = int((target != -100).sum())
    got = evaluate(world.config, version, [world.prepared("clinic")])["sites"]["clinic"]
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(manual / count, abs=1e-5)


# ---------------------------------------------------------------- rejections

def _snapshot(folder):
    return tree_digest(folder), fedkit.tree_entries(folder)


@pytest.mark.parametrize("corruption", list(fedkit.CORRUPTIONS))
def test_invalid_update_is_left_out_with_a_warning_and_a_reason(world, corruption):
    folder, fragment = fedkit.CORRUPTIONS[corruption](world.round1)
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    warnings = []

    result = aggregate_round(world.config, world.registry, world.round1, quorum=2, warn=warnings.append)

    assert result.version == "v0001"
    assert len(result.rejected) == 1
    assert result.rejected[0]["site"] == folder
    assert fragment in result.rejected[0]["reason"]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: ") and str(world.round1 / folder) in warnings[0]
    assert fragment in warnings[0]
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert manifest["rejected"] == result.rejected
    assert sorted(c["site"] for c in manifest["contributors"]) == ["bank", "clinic"]
    assert math.isclose(sum(c["weight"] for c in manifest["contributors"]), 1.0, abs_tol=1e-6)
    # The rejected update never changes the result: it is FedAvg of the two valid ones.
    got = load_file(str(world.registry / "v0001" / ADAPTER))
    _assert_tensors_close(got, _fedavg_expected(parent, world.round1, ["bank", "clinic"]))
    assert Registry(world.registry).latest_name() == "v0001"


@pytest.mark.parametrize("corruption", list(fedkit.CORRUPTIONS))
def test_strict_round_with_an_invalid_update_writes_nothing(world, corruption):
    folder, fragment = fedkit.CORRUPTIONS[corruption](world.round1)
    before = _snapshot(world.registry)
    warnings = []
    with pytest.raises(BadInput) as failure:
        aggregate_round(world.config, world.registry, world.round1, strict=True, warn=warnings.append)
    message = str(failure.value)
    assert str(world.round1 / folder) in message and fragment in message and "--strict" in message
    assert "\n" not in message
    assert warnings == [], "under --strict the error line alone reports the rejection"
    assert _snapshot(world.registry) == before


@pytest.mark.parametrize("corruption", ["nan-tensor", "wrong-base-model", "site-not-on-roster", "tampered-file"])
def test_rejections_that_break_the_quorum_write_nothing(world, corruption):
    fedkit.CORRUPTIONS[corruption](world.round1)
    before = _snapshot(world.registry)
    with pytest.raises(BadInput, match=r"2 valid update\(s\), below the quorum of 3; nothing written \(1 rejected\)"):
        aggregate_round(world.config, world.registry, world.round1, quorum=3)
    assert _snapshot(world.registry) == before


def test_update_trained_from_the_previous_version_is_rejected_in_round_two(world):
    from fedtune.train import train_local

    aggregate_round(world.config, world.registry, world.round1)
    for site in ("clinic", "bank"):
        train_local(world.config, site, world.prepared(site), world.registry, world.updates)
    round2 = world.updates / "round-0002"
    # dev sends its round-1 update again, relabelled for round 2: its parent is still v0000.
    shutil.copytree(world.round1 / "dev", round2 / "dev")
    fedkit.forge_update(round2 / "dev", round=2)
    assert fedkit.read_manifest(round2 / "dev")["parent"]["version"] == "v0000"
    before = _snapshot(world.registry)

    replayed = "replayed: its nonce belongs to an update already merged in an earlier round"
    with pytest.raises(BadInput, match=replayed):
        aggregate_round(world.config, world.registry, round2, strict=True)
    assert _snapshot(world.registry) == before

    warnings = []
    result = aggregate_round(world.config, world.registry, round2, warn=warnings.append)
    assert result.version == "v0002"
    assert result.rejected == [{"site": "dev", "reason": replayed}]
    assert len(warnings) == 1 and str(round2 / "dev") in warnings[0]
    manifest = fedkit.read_manifest(world.registry / "v0002")
    assert manifest["parent"] == "v0001" and manifest["round"] == 2
    assert sorted(c["site"] for c in manifest["contributors"]) == ["bank", "clinic"]
    parent = load_file(str(world.registry / "v0001" / ADAPTER))
    _assert_tensors_close(load_file(str(world.registry / "v0002" / ADAPTER)),
                          _fedavg_expected(parent, round2, ["bank", "clinic"]))
    assert verify_registry(world.registry, world.config)["latest"] == "v0002"
    assert [e["version"] for e in Registry(world.registry).entries()] == ["v0000", "v0001", "v0002"]


def test_quorum_not_met_writes_nothing(world):
    before = _snapshot(world.registry)
    with pytest.raises(BadInput, match=r"3 valid update\(s\), below the quorum of 4; nothing written$"):
        aggregate_round(world.config, world.registry, world.round1, quorum=4)
    assert _snapshot(world.registry) == before
    with pytest.raises(BadInput, match="quorum: Input should be greater than or equal to 1"):
        aggregate_round(world.config, world.registry, world.round1, quorum=0)
    assert _snapshot(world.registry) == before


def test_default_quorum_comes_from_the_federation(world):
    for site in ("bank", "dev"):
        shutil.rmtree(world.round1 / site)
    assert world.config.aggregation.quorum == 2
    before = _snapshot(world.registry)
    with pytest.raises(BadInput, match=r"1 valid update\(s\), below the quorum of 2"):
        aggregate_round(world.config, world.registry, world.round1)
    assert _snapshot(world.registry) == before
    assert aggregate_round(world.config, world.registry, world.round1, quorum=1).version == "v0001"


@pytest.mark.parametrize("name", ["round-0002", "round-0000", "round1", "updates"])
def test_updates_folder_for_another_round_is_refused(world, name):
    other = world.updates / name
    shutil.copytree(world.round1, other)
    before = _snapshot(world.registry)
    message = ("round 0 is already committed as v0000" if name == "round-0000"
               else "the registry's next round is 1; give updates/round-0001")
    with pytest.raises(BadInput, match=message):
        aggregate_round(world.config, world.registry, other)
    assert _snapshot(world.registry) == before


def test_missing_updates_folder_and_leftover_version_are_refused(world):
    before = _snapshot(world.registry)
    with pytest.raises(BadInput, match="updates folder not found"):
        aggregate_round(world.config, world.registry, world.updates / "round-0009")
    assert _snapshot(world.registry) == before
    # A v0001 folder that is not a finished version (here: empty) is set aside, never merged into nor deleted.
    (world.registry / "v0001").mkdir()
    (world.registry / "v0001" / "notes.txt").write_text("someone's file")
    assert aggregate_round(world.config, world.registry, world.round1).version == "v0001"
    aside = [p for p in world.registry.iterdir() if p.name.startswith("v0001.dropped-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "someone's file"
    assert (world.registry / "v0001" / "manifest.json").is_file()


def test_stray_files_and_hidden_folders_in_the_round_are_ignored(world):
    (world.round1 / "README.txt").write_text("notes")
    shutil.copytree(world.round1 / "dev", world.round1 / ".dev.tmp")
    result = aggregate_round(world.config, world.registry, world.round1)
    assert result.rejected == [] and len(result.contributors) == 3
