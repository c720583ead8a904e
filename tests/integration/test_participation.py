"""Who a round takes: a seeded sample of sites, a deadline with a straggler and a site that never sends, and
asynchronous (FedBuff) rounds that merge a stale update scaled by (1 + τ)^−a where synchronous rounds reject it."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fedkit
from conftest import run_cli
from fedtune.aggregate import aggregate_round
from fedtune.config import FederationConfig, load_federation, parse_model
from fedtune.errors import BadInput, Waiting
from fedtune.rounds import open_round, seeded_draw
from fedtune.train import train_local

ADAPTER = "adapter_model.safetensors"
SITES = ("bank", "clinic", "dev")


@pytest.fixture(scope="module")
def untrained(tiny_model, tmp_path_factory):
    """A signed federation of bank, clinic and dev on the tiny model; nothing trained yet."""
    return fedkit.build_world(tmp_path_factory.mktemp("participation"), tiny_model, train=False, keys=True)


def _with(world, tmp_path, settings: dict):
    """A private copy of the world whose federation.yaml has `settings` merged in."""
    copy = fedkit.clone_world(world, tmp_path / "w")
    data = yaml.safe_load(copy.config_path.read_text())
    for section, values in settings.items():
        data[section] = {**(data.get(section) or {}), **values}
    copy.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    copy.config = load_federation(copy.config_path)
    return copy


def _train(world, site, parent=None):
    return train_local(world.config, site, world.prepared(site), parent or world.registry, world.updates,
                       key=world.root / "keys" / f"{site}.key")


def _manifest(world, version):
    return fedkit.read_manifest(world.registry / version)


def test_a_seeded_sample_calls_k_sites_anyone_can_redraw_and_the_version_records_it(untrained, tmp_path):
    world = _with(untrained, tmp_path, {"rounds": {"sites_per_round": 2}})
    call = open_round(world.config, world.registry, world.updates)
    assert len(call.sites) == 2 and call.draw == "seeded"
    sample = json.loads((world.round1 / "sample.json").read_text())["sample"]
    assert sample["sites"] == call.sites and sample["seed"] == call.seed
    # the draw is the documented one: redo it from the seed alone
    assert sorted(random.Random(int(call.seed, 16)).sample(sorted(SITES), 2)) == call.sites
    left_out = next(s for s in SITES if s not in call.sites)
    with pytest.raises(BadInput, match=f"site {left_out} was not drawn"):
        _train(world, left_out)
    for site in call.sites:
        _train(world, site)
    result = aggregate_round(world.config, world.registry, world.round1)
    participation = _manifest(world, result.version)["participation"]
    assert participation == {"called": call.sites, "sent": call.sites, "missing": [], "draw": "seeded",
                             "seed": call.seed, "deadline": None, "closed": "all-sent"}
    # the next round's draw depends on its parent: a new seed, recomputed the same way by every party
    nxt, seed = seeded_draw(world.config, _manifest(world, "v0001"))
    assert seed != call.seed and open_round(world.config, world.registry, world.updates).sites == nxt


def test_a_sample_that_disagrees_with_the_seeded_draw_is_refused(untrained, tmp_path):
    world = _with(untrained, tmp_path, {"rounds": {"sites_per_round": 2}})
    call = open_round(world.config, world.registry, world.updates)
    sample = json.loads((world.round1 / "sample.json").read_text())["sample"]
    sample["sites"] = sorted([call.sites[0]] + [s for s in SITES if s not in call.sites])
    # the coordinator signs a different draw: still refused, the seeded draw is checkable by everyone
    from fedtune.wire import SigningKey
    from fedtune.wire.sample import write_sample

    (world.round1 / "sample.json").unlink()
    write_sample(world.round1, sample, SigningKey.load(world.fed / "coordinator.key"))
    with pytest.raises(BadInput, match="does not hold the seeded draw"):
        _train(world, call.sites[0])


def test_a_round_with_a_deadline_waits_for_a_straggler_then_closes_and_records_it_late(untrained, tmp_path, capsys):
    world = _with(untrained, tmp_path, {"rounds": {"deadline": 3600}})
    _train(world, "bank")
    _train(world, "clinic")
    with pytest.raises(Waiting, match="waiting for dev until the round closes"):
        aggregate_round(world.config, world.registry, world.round1)
    code, stdout, _ = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                               "--updates", world.round1], capsys)
    assert code == 3 and stdout.startswith("waiting:") and not (world.registry / "v0001").exists()
    # the coordinator closes the round now: the two that sent make v0001, dev is recorded missing
    code, stdout, stderr = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                                    "--updates", world.round1, "--deadline", "now"], capsys)
    assert code == 0, stderr
    first = _manifest(world, "v0001")
    assert sorted(c["site"] for c in first["contributors"]) == ["bank", "clinic"]
    assert first["participation"]["missing"] == ["dev"] and first["participation"]["closed"] == "deadline"
    # the straggler finishes training from v0000 after the round closed: its update lands in round-0001
    straggler = _train(world, "dev", parent=world.registry / "v0000")
    assert straggler.parent == world.round1
    for site in ("bank", "clinic"):
        _train(world, site)
    second = aggregate_round(world.config, world.registry, world.updates / "round-0002", closed=True)
    assert sorted(c["site"] for c in second.contributors) == ["bank", "clinic"]
    late = [r for r in second.rejected if r["site"] == "round-0001/dev"]
    assert len(late) == 1 and late[0]["reason"].startswith("late: sent for round 1 after it closed")
    # sent into the current round's folder, the stale update is rejected for its parent
    shutil.copytree(straggler, world.updates / "round-0003" / "dev")  # the signed bytes, unchanged
    for site in ("bank", "clinic"):
        _train(world, site)
    third = aggregate_round(world.config, world.registry, world.updates / "round-0003", closed=True)
    reason = next(r["reason"] for r in third.rejected if r["site"] == "dev")
    assert "update is for round 1, this round is 3 (late: only aggregation.async merges" in reason


def test_a_site_that_never_sends_closes_the_round_at_its_deadline_or_fails_below_quorum(untrained, tmp_path):
    world = _with(untrained, tmp_path, {"rounds": {"deadline": 0.001}, "aggregation": {"quorum": 2}})
    _train(world, "bank")
    _train(world, "clinic")
    result = aggregate_round(world.config, world.registry, world.round1)  # the deadline has passed
    record = _manifest(world, result.version)["participation"]
    assert record["closed"] == "deadline" and record["missing"] == ["dev"] and record["deadline"] is not None
    # round 2: only bank sends before the deadline; below the quorum nothing is written
    _train(world, "bank")
    with pytest.raises(BadInput, match="below the quorum of 2; nothing written"):
        aggregate_round(world.config, world.registry, world.updates / "round-0002")
    assert not (world.registry / "v0002").exists()


def _delta(folder):
    return load_file(str(folder / ADAPTER))


def test_async_rounds_merge_a_stale_update_scaled_by_its_staleness(untrained, tmp_path):
    world = _with(untrained, tmp_path, {"aggregation": {"async": {"buffer": 2, "exponent": 0.5},
                                                        "max_weight": None, "norm_bound": None}})
    assert world.config.aggregation.asynchronous.buffer == 2
    assert yaml.safe_load(world.config_path.read_text())["aggregation"]["async"]["buffer"] == 2
    _train(world, "bank")
    with pytest.raises(Waiting, match="buffer holds 1 of 2"):
        aggregate_round(world.config, world.registry, world.round1)
    _train(world, "clinic")
    first = aggregate_round(world.config, world.registry, world.round1)
    assert [c["staleness"] for c in first.contributors] == [0, 0]
    # dev trained from v0000 too, and sends after v0001 exists; bank trains from v0001
    stale = _train(world, "dev", parent=world.registry / "v0000")
    fresh = _train(world, "bank")
    second = aggregate_round(world.config, world.registry, world.updates / "round-0002")
    by_site = {c["site"]: c for c in second.contributors}
    assert by_site["dev"]["staleness"] == 1 and by_site["dev"]["round"] == 1
    assert by_site["dev"]["staleness_scale"] == pytest.approx(2 ** -0.5)
    assert by_site["bank"]["staleness"] == 0 and by_site["bank"]["staleness_scale"] == 1.0
    # the version is v0001 + Σ w_k s(τ_k) Δ_k, each delta taken from its own parent
    parent, merged = _delta(world.registry / "v0001"), _delta(world.registry / "v0002")
    deltas = {"dev": _delta(stale), "bank": _delta(fresh)}
    for key in merged:
        want = parent[key].double() + sum(by_site[s]["weight"] * by_site[s]["staleness_scale"] * deltas[s][key].double()
                                          for s in deltas)
        assert torch.allclose(merged[key].double(), want, atol=1e-6), key
    assert fedkit.read_manifest(world.registry / "v0002")["params"]["async"]["buffer"] == 2
    # both are merged now: nothing is buffered, so the next run waits
    with pytest.raises(Waiting, match="buffer holds 0 of 2"):
        aggregate_round(world.config, world.registry, world.updates / "round-0003")


def test_async_max_staleness_rejects_an_update_too_far_behind(untrained, tmp_path):
    world = _with(untrained, tmp_path, {"aggregation": {"async": {"buffer": 1, "max_staleness": 0}}})
    _train(world, "bank")
    aggregate_round(world.config, world.registry, world.round1)
    late = _train(world, "dev", parent=world.registry / "v0000")
    _train(world, "clinic")
    result = aggregate_round(world.config, world.registry, world.updates / "round-0002")
    assert [c["site"] for c in result.contributors] == ["clinic"]
    assert any(r["site"] == f"round-0001/{late.name}" and r["reason"].startswith("stale:") for r in result.rejected)


@pytest.mark.parametrize("settings, message", [
    ({"aggregation": {"method": "svd", "async": {"buffer": 2}}}, "re-factors the adapter"),
    ({"aggregation": {"async": {"buffer": 2}}, "rounds": {"deadline": 60}}, "close when their buffer is full"),
    ({"rounds": {"sites_per_round": 1}, "aggregation": {"quorum": 2}}, "below aggregation.quorum"),
    ({"rounds": {"sites_per_round": 2}, "privacy": {"mode": "central", "noise_multiplier": 1.0, "sample_rate": 0.5}},
     "both sample sites"),
    ({"aggregation": {"async": {"buffer": 2}}, "privacy": {"mode": "distributed", "noise_multiplier": 1.0}},
     "scale its share of the DP noise"),
])
def test_participation_settings_that_cannot_make_a_round_are_refused(settings, message):
    data = {"sites": [{"name": s} for s in SITES], **settings}
    with pytest.raises(BadInput, match=message):
        parse_model(FederationConfig, data, "federation.yaml")


def test_a_recipe_takes_a_round_count_or_the_rounds_section():
    from fedtune.config import Recipe

    sites = [{"name": s, "inputs": [f"{s}.jsonl"]} for s in SITES]
    assert parse_model(Recipe, {"rounds": 4, "sites": sites}, "r").rounds.count == 4
    recipe = parse_model(Recipe, {"rounds": {"count": 2, "sites_per_round": 2, "deadline": 30}, "sites": sites}, "r")
    assert recipe.rounds.count == 2 and recipe.plan()["rounds"] == {"sites_per_round": 2, "deadline": 30.0}


def test_sample_status_and_log_show_who_a_round_called_and_when_it_closes(untrained, tmp_path, capsys):
    world = _with(untrained, tmp_path, {"rounds": {"sites_per_round": 2, "deadline": 600}})
    args = ["--config", world.config_path, "--registry", world.registry, "--updates", world.updates]
    code, stdout, stderr = run_cli(["sample", *args, "--json"], capsys)
    assert code == 0, stderr
    opened = json.loads(stdout)
    assert opened["draw"] == "seeded" and len(opened["sites"]) == 2 and opened["closes_at"]
    code, _, stderr = run_cli(["sample", *args], capsys)
    assert code == 2 and "already drawn" in stderr
    code, stdout, _ = run_cli(["status", *args], capsys)
    assert code == 0 and f"called this round: {', '.join(opened['sites'])}" in stdout
    assert f"the round closes at {opened['closes_at']}" in stdout
    code, stdout, _ = run_cli(["status", *args, "--json"], capsys)
    assert json.loads(stdout)["waiting"]["missing"] == opened["sites"]
    _train(world, opened["sites"][0])
    code, stdout, _ = run_cli(["aggregate", *args[:4], "--updates", world.round1], capsys)
    assert code == 3 and opened["sites"][1] in stdout  # waits for the called site that has not sent
    code, _, stderr = run_cli(["aggregate", *args[:4], "--updates", world.round1, "--deadline", "now",
                               "--quorum", "1"], capsys)
    assert code == 0, stderr
    code, stdout, _ = run_cli(["log", "--registry", world.registry, "--json"], capsys)
    record = json.loads(stdout)["entries"][-1]["participation"]
    assert record["missing"] == opened["sites"][1:] and record["closed"] == "deadline"
    from fedtune.cli.trust import _history_cells

    notes = _history_cells(json.loads(stdout)["entries"][-1])[-1]
    assert f"called 2 (seeded), missing {opened['sites'][1]} when the deadline passed" in notes
