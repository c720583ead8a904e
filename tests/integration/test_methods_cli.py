"""Every aggregation method through `fedtune aggregate` on five real trained updates, checked against
its public reference implementation (Flower, scipy, geom_median, peft's merge_utils)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from geom_median.numpy import compute_geometric_median
from peft.utils import merge_utils
from scipy.stats import trim_mean

import fedkit
from conftest import run_cli

SITES = ["bank", "clinic", "dev", "east", "west"]


@pytest.fixture(scope="module")
def world5(tiny_model, tmp_path_factory):
    return fedkit.build_world(tmp_path_factory.mktemp("methods5"), tiny_model,
                              extra_sites={"east": ("bank", 25), "west": ("clinic", 31)})


@pytest.fixture
def world(world5, tmp_path):
    return fedkit.clone_world(world5, tmp_path / "w")


def _round(world):
    """(keys, parent arrays, [(site arrays, num_examples)]) as a Flower server would hold the deltas."""
    parent = fedkit.load_tensors(world.registry / "v0000")
    keys = sorted(parent)
    results = []
    for site in SITES:
        delta = fedkit.load_tensors(world.round1 / site)
        results.append(([delta[k].numpy().astype(np.float64) for k in keys],
                        fedkit.read_manifest(world.round1 / site)["num_examples"]))
    return keys, [parent[k].numpy().astype(np.float64) for k in keys], results


def _aggregate_cli(world, capsys, *options) -> tuple[dict, dict]:
    code, out, err = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                              "--updates", world.round1, "--json", *options], capsys)
    assert code == 0, err
    merged = fedkit.load_tensors(world.registry / "v0001")
    return json.loads(out), merged


def _assert_merged(merged, keys, parent, expected_deltas, rtol=1e-5):
    for key, base, delta in zip(keys, parent, expected_deltas):
        got = merged[key].numpy().astype(np.float64) - base
        scale = max(np.abs(delta).max(), 1e-12)
        np.testing.assert_allclose(got, delta, rtol=0, atol=rtol * scale, err_msg=key)


def _weights(results):
    counts = np.array([n for _, n in results], dtype=np.float64)
    return counts / counts.sum()


def test_fedavg_matches_flower_aggregate(world, capsys):
    keys, parent, results = _round(world)
    _, merged = _aggregate_cli(world, capsys, "--method", "fedavg")
    _assert_merged(merged, keys, parent, aggregate(results))


def test_trimmed_mean_matches_flower_and_scipy(world, capsys):
    keys, parent, results = _round(world)
    _, merged = _aggregate_cli(world, capsys, "--method", "trimmed-mean", "--trim", "0.2")
    flower = aggregate_trimmed_avg(results, 0.2)
    scipy = [trim_mean(np.stack([r[0][i] for r in results]), 0.2, axis=0) for i in range(len(keys))]
    _assert_merged(merged, keys, parent, flower)
    _assert_merged(merged, keys, parent, scipy)


def test_weighted_trimmed_mean_equals_trim_mean_on_repeated_rows(world, capsys):
    counts = {"bank": 10, "clinic": 20, "dev": 30, "east": 25, "west": 15}  # 100 rows: trim 0.2 cuts 20 per tail
    for site, count in counts.items():
        fedkit.forge_update(world.round1 / site, num_examples=count)
    keys, parent, results = _round(world)
    _, merged = _aggregate_cli(world, capsys, "--method", "weighted-trimmed-mean", "--trim", "0.2")
    expected = [trim_mean(np.repeat(np.stack([r[0][i] for r in results]), [n for _, n in results], axis=0), 0.2, axis=0)
                for i in range(len(keys))]
    _assert_merged(merged, keys, parent, expected)


def test_median_matches_flower(world, capsys):
    keys, parent, results = _round(world)
    _, merged = _aggregate_cli(world, capsys, "--method", "median")
    _assert_merged(merged, keys, parent, aggregate_median(results))


def test_krum_and_multi_krum_match_flower(world, tmp_path, capsys):
    keys, parent, results = _round(world)
    other = fedkit.clone_world(world, tmp_path / "other")
    _, merged = _aggregate_cli(world, capsys, "--method", "krum", "--byzantine", "1")
    _assert_merged(merged, keys, parent, aggregate_krum([(list(w), n) for w, n in results], 1, 0))
    _, merged = _aggregate_cli(other, capsys, "--method", "multi-krum", "--byzantine", "1", "--keep", "3")
    _assert_merged(merged, keys, parent, aggregate_krum([(list(w), n) for w, n in results], 1, 3))


def test_krum_refuses_too_few_updates(world, capsys):
    code, _, err = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                            "--updates", world.round1, "--method", "krum", "--byzantine", "2"], capsys)
    assert code == 2 and err.startswith("error: ") and "krum" in err
    assert not (world.registry / "v0001").exists()


def test_geomedian_matches_geom_median(world, capsys):
    keys, parent, results = _round(world)
    _, merged = _aggregate_cli(world, capsys, "--method", "geomedian")
    reference = compute_geometric_median([w for w, _ in results], weights=_weights(results))
    _assert_merged(merged, keys, parent, reference.median, rtol=1e-4)


def test_centered_clip_follows_its_definition(world, capsys):
    keys, parent, results = _round(world)
    summary, merged = _aggregate_cli(world, capsys, "--method", "centered-clip")
    flat = np.stack([np.concatenate([a.ravel() for a in w]) for w, _ in results])
    tau = np.median(np.linalg.norm(flat, axis=1))
    v = np.zeros(flat.shape[1])
    for _ in range(3):
        diff = flat - v
        norms = np.linalg.norm(diff, axis=1)
        v = v + (diff * np.minimum(1, tau / norms)[:, None]).mean(axis=0)
    sizes = np.cumsum([0] + [a.size for a in results[0][0]])
    expected = [v[sizes[i]:sizes[i + 1]].reshape(results[0][0][i].shape) for i in range(len(keys))]
    _assert_merged(merged, keys, parent, expected)


@pytest.mark.parametrize("method", ["ties", "dare", "dare-ties"])
def test_merging_rules_match_peft_merge_utils(world, capsys, method):
    keys, parent, results = _round(world)
    summary, merged = _aggregate_cli(world, capsys, "--method", method, "--density", "0.5")
    manifest = fedkit.read_manifest(world.registry / "v0001")
    weights = torch.tensor(_weights(results), dtype=torch.float32)
    seed = manifest["params"].get("seed")
    expected = []
    for index, key in enumerate(keys):
        stacked = torch.stack([torch.from_numpy(r[0][index]).float() for r in results])
        if method == "ties":
            expected.append(merge_utils.ties(stacked, weights, 0.5, "total").double().numpy())
            continue
        torch.manual_seed(seed * 1_000_003 + index)
        merge = merge_utils.dare_linear if method == "dare" else merge_utils.dare_ties
        expected.append(merge(stacked, weights, 0.5).double().numpy())
    _assert_merged(merged, keys, parent, expected)


def test_help_lists_every_method_with_one_line(capsys):
    from fedtune.aggregate import METHODS

    code, out, _ = run_cli(["aggregate", "--help"], capsys)
    assert code == 0
    for name in METHODS:
        assert f"{name}:" in out


def test_krum_manifest_says_which_update_it_chose(world, capsys):
    summary, _ = _aggregate_cli(world, capsys, "--method", "krum", "--byzantine", "1")
    coefficients = {c["site"]: c["coefficient"] for c in summary["contributors"]}
    assert sorted(coefficients.values()) == [0, 0, 0, 0, 1]
    by_site = {c["site"]: c for c in fedkit.read_manifest(world.registry / "v0001")["contributors"]}
    assert {s: c["coefficient"] for s, c in by_site.items()} == coefficients
