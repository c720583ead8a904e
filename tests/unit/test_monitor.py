"""fedtune.monitor: PSI / Jensen–Shannon against scipy and hand values, leave-one-out contribution records against a
direct computation on materialised tensors, and the drift alerts a shifted site, a scaled update, a free-rider and a
Sybil pair raise."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedkit
from fedtune.monitor import (
    History,
    contribution_totals,
    data_profile,
    js_distance,
    loo_eval_records,
    monitor_round,
    norm_z,
    profile_drift,
    psi,
)

# --- distances between distributions ---------------------------------------------------------------------------


def test_psi_matches_hand_computation():
    expected = {"a": 50, "b": 30, "c": 20}
    actual = {"a": 20, "b": 30, "c": 50}
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    assert psi(expected, actual) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    # 0.3·ln(0.4) − 0.3·ln(2.5)... by hand: (−0.3)(ln 0.4) + 0 + 0.3·ln 2.5 = 0.5497
    assert psi(expected, actual) == pytest.approx(0.3 * math.log(2.5) - 0.3 * math.log(0.4), abs=1e-12)
    assert psi(expected, expected) == 0.0
    # scale does not matter, only proportions; a bin missing on one side is floored, not infinite
    assert psi({"a": 5, "b": 3, "c": 2}, {"a": 200, "b": 300, "c": 500}) == pytest.approx(psi(expected, actual))
    assert math.isfinite(psi({"a": 10}, {"b": 10}))
    assert psi({}, {"a": 1}) == 0.0


def test_js_distance_matches_scipy():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    for _ in range(20):
        size = int(rng.integers(2, 9))
        p, q = rng.random(size), rng.random(size)
        p[rng.integers(size)] = 0.0  # empty bins on one side
        bins = [f"b{i}" for i in range(size)]
        got = js_distance(dict(zip(bins, p)), dict(zip(bins, q)))
        assert got == pytest.approx(float(jensenshannon(p, q, base=2)), abs=1e-12)
    assert js_distance({"en": 10}, {"de": 10}) == pytest.approx(1.0)  # disjoint: the maximum, base 2
    assert js_distance({"en": 3, "de": 1}, {"en": 30, "de": 10}) == pytest.approx(0.0, abs=1e-12)


def test_data_profile_keeps_counts_only():
    card = {"records": {"read": 12, "kept": 10, "train": 8, "eval": 2}, "dropped": {"near_duplicate": 2},
            "pii_replaced": {"EMAIL": 1}, "languages": {"kept": {"en": 10}, "dropped": {"de": 1}},
            "token_lengths": {"histogram": {"1-16": 4, "17-32": 6}, "mean": 15.0, "max": 30},
            "sources": [{"name": "secret-file-name.jsonl", "sha256": "0" * 64}]}
    profile = data_profile(card)
    assert profile == {"records": 10, "token_lengths": {"1-16": 4, "17-32": 6}, "languages": {"en": 10},
                       "pii": {"EMAIL": 1}, "dropped": {"near_duplicate": 2}}
    drift = profile_drift(profile, profile)
    assert all(value == pytest.approx(0.0) for value in drift.values())


def test_norm_z_floors_the_spread():
    assert norm_z(1.0, [], 0.25) is None
    # a steady history (std 0) does not turn a 10% change into a huge score: spread = 0.25 × mean
    assert norm_z(1.1, [1.0, 1.0], 0.25) == pytest.approx(0.4)
    assert norm_z(10.0, [1.0, 1.0], 0.25) == pytest.approx(36.0)


def test_loo_eval_records():
    full = {"clinic": 2.0, "bank": 3.0}
    without = {"clinic": {"clinic": 2.6, "bank": 3.0}, "bank": {"clinic": 2.0, "bank": 2.9}}
    records = loo_eval_records(full, without)
    assert records["clinic"]["loo_eval_loss"] == pytest.approx(0.3)  # leaving clinic out hurts: it helped
    assert records["bank"]["loo_eval_loss"] == pytest.approx(-0.05)  # leaving bank out helps the mean


# --- a real round on the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    return fedkit.build_world(tmp_path_factory.mktemp("monitor-world"), tiny_model, keys=True)


def _flat(folder: Path) -> torch.Tensor:
    tensors = fedkit.load_tensors(folder)
    return torch.cat([tensors[k].double().reshape(-1) for k in sorted(tensors)])


def _direct(deltas: list[torch.Tensor], full: np.ndarray, without: list[np.ndarray]) -> list[dict]:
    """The LOO records from materialised tensors: Δ and every Δ₋ₖ built, then compared."""
    stack = torch.stack(deltas)
    merged = torch.from_numpy(full) @ stack
    out = []
    for c in without:
        rest = torch.from_numpy(c) @ stack
        gap = float(torch.linalg.vector_norm(merged - rest))
        out.append({"loo_cosine": float(merged @ rest / (merged.norm() * rest.norm())), "loo_distance": gap,
                    "loo_relative": gap / float(merged.norm())})
    return out


def _renormalised(weights: np.ndarray, k: int) -> np.ndarray:
    c = weights.copy()
    c[k] = 0
    return c / c.sum()


def _aggregate(world, tmp_path, **overrides):
    from fedtune.aggregate import aggregate_round

    clone = fedkit.clone_world(world, tmp_path / "w")
    result = aggregate_round(clone.config, clone.registry, clone.round1, key=clone.root / "fed" / "coordinator.key",
                             **overrides)
    return clone, fedkit.read_manifest(result.folder)


@pytest.mark.parametrize("method", ["fedavg", "median"])
def test_loo_records_match_materialised_tensors(world, tmp_path, method):
    clone, manifest = _aggregate(world, tmp_path, method=method)
    contributors = manifest["contributors"]
    sites = [c["site"] for c in contributors]
    deltas = [_flat(clone.round1 / site) for site in sites]
    weights = np.array([c["weight"] for c in contributors])
    # fedavg: Δ₋ₖ is fedavg without k; median is not a fixed linear combination, so the record is the weighted
    # mean's, and the version says so.
    assert manifest["monitor"]["contribution_basis"] == ("rule" if method == "fedavg" else "linear")
    direct = _direct(deltas, weights, [_renormalised(weights, k) for k in range(len(sites))])
    for contributor, expected in zip(contributors, direct):
        for key, value in expected.items():
            assert contributor["contribution"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (method, key)
    assert len(contributors) == 3


def test_loo_of_a_gram_rule_reruns_the_rule(world, tmp_path):
    from fedtune.aggregate import make_method
    from fedtune.config import AggregationSettings

    clone, manifest = _aggregate(world, tmp_path, method="geomedian")
    contributors = manifest["contributors"]
    deltas = [_flat(clone.round1 / c["site"]) for c in contributors]
    stack = torch.stack(deltas)
    gram = (stack @ stack.T).numpy()
    rule = make_method("geomedian", AggregationSettings(method="geomedian"), seed=0)
    weights = np.array([c["weight"] for c in contributors])
    full = rule.coefficients(weights, gram)
    without = []
    for k in range(3):
        keep = [j for j in range(3) if j != k]
        c = np.zeros(3)
        c[keep] = rule.coefficients(_renormalised(weights, k)[keep], gram[np.ix_(keep, keep)])
        without.append(c)
    assert manifest["monitor"]["contribution_basis"] == "rule"
    for contributor, expected in zip(contributors, _direct(deltas, full, without)):
        for key, value in expected.items():
            assert contributor["contribution"][key] == pytest.approx(value, rel=1e-4, abs=1e-7)


def _fake_updates(deltas: dict[str, torch.Tensor], folder: Path, profiles: dict | None = None) -> list:
    """Updates as the engine hands them to the monitor, their tensors written as safetensors."""
    from safetensors.torch import save_file

    updates = []
    for site, delta in deltas.items():
        path = folder / f"{site}.safetensors"
        save_file({"base_model.model.layers.0.self_attn.q_proj.lora_B.weight": delta.float().reshape(4, 4)}, str(path))
        manifest = {"data_profile": (profiles or {}).get(site)} if profiles and site in profiles else {}
        updates.append(SimpleNamespace(site=site, norm=float(delta.norm()), manifest=manifest, tensors=path))
    return updates


def _round(updates, history=None, weights=None, folder=None, **settings):
    from fedtune.aggregate import make_method
    from fedtune.config import AggregationSettings, MonitorSettings

    from safetensors.torch import load_file

    stack = torch.stack([torch.cat([t.double().reshape(-1) for t in load_file(str(u.tensors)).values()])
                         for u in updates])
    gram = (stack @ stack.T).numpy()
    count = len(updates)
    weights = np.full(count, 1.0 / count) if weights is None else weights
    rule = make_method("fedavg", AggregationSettings(), seed=0)
    return monitor_round(MonitorSettings(**settings), rule, updates, weights, gram, history or History(),
                         folder or Path("/nonexistent/round-0002"), "v0002", 4, False)


def test_free_rider_scores_zero(tmp_path):
    generator = torch.Generator().manual_seed(1)
    honest = {site: torch.randn(16, generator=generator) for site in ("a", "b", "c")}
    # one sends nothing (a zero delta); one copies what the others agree on (their mean)
    deltas = {**honest, "zero": torch.zeros(16)}
    contributions, _ = _round(_fake_updates(deltas, tmp_path))
    by_site = dict(zip(deltas, contributions))
    assert 1 - by_site["zero"]["loo_cosine"] == pytest.approx(0.0, abs=1e-9)
    assert min(1 - by_site[s]["loo_cosine"] for s in honest) > 1e-3
    copier = {**honest, "copier": torch.stack(list(honest.values())).mean(0)}
    contributions, _ = _round(_fake_updates(copier, tmp_path))
    record = dict(zip(copier, contributions))["copier"]
    assert record["loo_distance"] == pytest.approx(0.0, abs=1e-6)
    assert record["loo_relative"] == pytest.approx(0.0, abs=1e-6)
    manifest = {"contributors": [{"site": s, "contribution": c} for s, c in zip(copier, contributions)]}
    rows = contribution_totals([manifest])
    assert {r["site"]: r["loo_distance_sum"] for r in rows}["copier"] == pytest.approx(0.0, abs=1e-6)


def test_sybil_pair_is_flagged(tmp_path):
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(16, generator=generator)
    deltas = {"a": torch.randn(16, generator=generator), "b": torch.randn(16, generator=generator),
              "sybil1": base, "sybil2": base + 1e-4 * torch.randn(16, generator=generator)}
    contributions, record = _round(_fake_updates(deltas, tmp_path))
    flagged = {a["site"] for a in record["alerts"] if a["metric"] == "max_pair_cosine"}
    assert flagged == {"sybil1", "sybil2"}
    assert all(a["kind"] == "update" for a in record["alerts"])
    # what leave-one-out misses: each twin alone barely changes the merge, the other still carries it
    by_site = dict(zip(deltas, contributions))
    assert by_site["sybil1"]["loo_relative"] < by_site["a"]["loo_relative"]


def test_scaled_update_raises_update_alert(tmp_path):
    generator = torch.Generator().manual_seed(3)
    deltas = {site: torch.randn(16, generator=generator) for site in ("a", "b", "c")}
    history = History(norms={site: [float(d.norm()) * 1.05, float(d.norm()) * 0.95] for site, d in deltas.items()})
    _, quiet = _round(_fake_updates(deltas, tmp_path), history=History(norms=dict(history.norms)))
    assert quiet["alerts"] == []
    deltas["c"] = deltas["c"] * 10
    _, record = _round(_fake_updates(deltas, tmp_path), history=history)
    assert [(a["kind"], a["site"], a["metric"]) for a in record["alerts"]] == [("update", "c", "norm_z")]
    assert record["sites"]["c"]["norm_z"] > 30


def test_shifted_data_raises_data_alert(tmp_path):
    generator = torch.Generator().manual_seed(4)
    deltas = {site: torch.randn(16, generator=generator) for site in ("a", "b")}
    first = {"records": 100, "token_lengths": {"1-16": 10, "17-32": 80, "33-64": 10}, "languages": {"en": 100},
             "pii": {}, "dropped": {}}
    history = History(references={"a": {"version": "v0001", "profile": first},
                                  "b": {"version": "v0001", "profile": first}})
    longer = {**first, "token_lengths": {"17-32": 10, "33-64": 30, "65-128": 60}}
    german = {**first, "languages": {"de": 90, "en": 10}}
    _, record = _round(_fake_updates(deltas, tmp_path, {"a": longer, "b": german}), history=history)
    alerts = {(a["site"], a["metric"]) for a in record["alerts"]}
    assert ("a", "length_psi") in alerts and ("a", "length_js") in alerts
    assert ("b", "language_js") in alerts
    assert all(a["kind"] == "data" for a in record["alerts"])
    # the same profile again: no drift, no alert; a site's first profile becomes its reference
    _, record = _round(_fake_updates(deltas, tmp_path, {"a": first, "b": first}), history=history)
    assert record["alerts"] == []
    _, record = _round(_fake_updates(deltas, tmp_path, {"a": longer, "b": german}))
    assert record["alerts"] == [] and record["references"]["a"] == {"version": "v0002", "profile": longer}


def test_quality_rise_raises_quality_alert(tmp_path):
    generator = torch.Generator().manual_seed(5)
    deltas = {site: torch.randn(16, generator=generator) for site in ("a", "b")}
    updates = _fake_updates(deltas, tmp_path)
    updates[0].manifest = {"eval": {"parent_loss": 3.0, "tokens": 100}}
    updates[1].manifest = {"eval": {"parent_loss": 2.1, "tokens": 100}}
    _, record = _round(updates, history=History(evals={"a": [2.5, 2.2], "b": [2.5, 2.2]}))
    assert [(a["kind"], a["site"]) for a in record["alerts"]] == [("quality", "a")]
    assert record["sites"]["a"]["eval_loss_over_best"] == pytest.approx(0.8)
    assert record["sites"]["b"]["eval_loss_change"] == pytest.approx(-0.1)


def test_eval_and_profile_refused_under_dp():
    from fedtune.config import MonitorSettings, PrivacySettings, TrainingPlan
    from pydantic import ValidationError

    for monitor in ({"report_eval": True}, {"data_profile": True}):
        with pytest.raises(ValidationError, match="outside the ε"):
            TrainingPlan(privacy={"mode": "central", "noise_multiplier": 1.0}, monitor=monitor)
    # by default a DP federation sends no data profile; one without DP does
    assert not MonitorSettings().profiles(PrivacySettings(mode="central", clip_norm=1.0, noise_multiplier=1.0))
    assert MonitorSettings().profiles(PrivacySettings())
