"""Every robust, distance-based and merging rule against an independent reference implementation.

Oracles: Flower's aggregate_* functions, scipy's trim_mean, numpy's median, geom_median's Weiszfeld,
peft's merge_utils (loaded from its file: `import peft` pulls in transformers and takes seconds),
and brute-force numpy where no library has the rule.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg
from geom_median.numpy import compute_geometric_median

from fedtune.aggregate import robust
from fedtune.aggregate.distance import CenteredClip, GeoMedian, Krum, MultiKrum
from fedtune.aggregate.merging import SEED_STRIDE, Dare, DareTies, Ties
from fedtune.aggregate.robust import Median, TrimmedMean, WeightedTrimmedMean, band_network, sorting_network
from fedtune.errors import BadInput

_peft = Path(importlib.util.find_spec("peft").origin).parent / "utils" / "merge_utils.py"
_spec = importlib.util.spec_from_file_location("peft_merge_utils", _peft)
merge_utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_utils)

pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater")  # peft, at density 1

SHAPES = {"bias": (37,), "lora_A": (6, 11)}  # a 1-D and a 2-D key
COUNTS = (3, 5, 8, 16, 17)


def updates(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal((count, *shape)).astype(np.float32) for key, shape in SHAPES.items()}


def examples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(10, 1000, count)


def flower(keys: dict[str, np.ndarray], num_examples: np.ndarray) -> list:
    return [([keys[key][k] for key in SHAPES], int(n)) for k, n in enumerate(num_examples)]


def gram(keys: dict[str, np.ndarray]) -> np.ndarray:
    """As the engine builds it: every key of a site flattened together, in float64."""
    flat = np.concatenate([keys[key].reshape(len(keys[key]), -1) for key in SHAPES], axis=1).astype(np.float64)
    return flat @ flat.T


def apply(c: np.ndarray, keys: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.tensordot(c, keys[key].astype(np.float64), axes=1) for key in SHAPES]


def per_key(method, keys: dict[str, np.ndarray], weights: np.ndarray) -> list[np.ndarray]:
    w = torch.tensor(weights, dtype=torch.float64)
    return [method.combine(torch.from_numpy(keys[key]), w, index).numpy() for index, key in enumerate(SHAPES)]


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=[robust.CHUNK, 16], ids=["chunk-default", "chunk-16"])
def chunk(request, monkeypatch):
    # 16 columns: several chunks per key and a partial last one.
    monkeypatch.setattr(robust, "CHUNK", request.param)


# --- sorting networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", range(1, 18))
def test_networks_sort_and_keep_the_band(count):
    rng = np.random.default_rng(count)
    x = rng.standard_normal((count, 200))
    if count <= 10:  # 0-1 principle: sorting every 0/1 input proves the network sorts
        x = np.array(list(itertools.product((0.0, 1.0), repeat=count))).T + 0.0
    wires = list(x)
    for a, b in sorting_network(count):
        wires[a], wires[b] = np.minimum(wires[a], wires[b]), np.maximum(wires[a], wires[b])
    np.testing.assert_array_equal(np.array(wires), np.sort(x, axis=0))
    for lo, hi in {(int(0.2 * count), count - int(0.2 * count)), ((count - 1) // 2, count // 2 + 1)}:
        wires = list(x)
        for a, b in band_network(count, lo, hi):
            wires[a], wires[b] = np.minimum(wires[a], wires[b]), np.maximum(wires[a], wires[b])
        np.testing.assert_allclose(np.sort(np.array(wires)[lo:hi], axis=0), np.sort(x, axis=0)[lo:hi])


# --- coordinate-wise robust rules ---------------------------------------------------------------


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("trim", [0.0, 0.1, 0.2, 0.3, 0.45])
def test_trimmed_mean_matches_scipy_and_flower(count, trim, chunk):
    keys = updates(count, seed=count)
    got = per_key(TrimmedMean(trim=trim), keys, np.full(count, 1 / count))
    assert_same(got, [scipy.stats.trim_mean(keys[key], trim, axis=0) for key in SHAPES])
    assert_same(got, aggregate_trimmed_avg(flower(keys, examples(count, count)), trim))


@pytest.mark.parametrize("count", (1, 2, 4) + COUNTS)
def test_median_matches_numpy_and_flower(count, chunk):
    keys = updates(count, seed=count)
    got = per_key(Median(), keys, np.full(count, 1 / count))
    assert_same(got, [np.median(keys[key], axis=0) for key in SHAPES])
    assert_same(got, aggregate_median(flower(keys, examples(count, count))))


@pytest.mark.parametrize(
    ("counts", "trim"), [([1, 2, 3, 4], 0.2), ([3, 1, 1, 2, 5, 1, 2, 5], 0.1), ([2] * 16 + [4], 0.25), ([7, 1, 1], 0.0)]
)
def test_weighted_trimmed_mean_is_trim_mean_of_repeated_rows(counts, trim, chunk):
    counts = np.array(counts)
    assert float(trim * counts.sum()).is_integer()
    keys = updates(len(counts), seed=len(counts))
    got = per_key(WeightedTrimmedMean(trim=trim), keys, counts / counts.sum())
    assert_same(got, [scipy.stats.trim_mean(np.repeat(keys[key], counts, axis=0), trim, axis=0) for key in SHAPES])


def weighted_trim_bruteforce(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """(1/(1−2t)) ∫_t^{1−t} Q(u) du with Q the weighted quantile step function, column by column."""
    weights = weights / weights.sum()
    flat = values.reshape(len(values), -1).astype(np.float64)
    out = np.empty(flat.shape[1])
    for j, column in enumerate(flat.T):
        order = np.argsort(column, kind="stable")
        edges = np.cumsum(weights[order])
        cuts = np.unique(np.clip(np.concatenate([[trim, 1 - trim], edges]), trim, 1 - trim))
        middle = (cuts[:-1] + cuts[1:]) / 2
        picked = column[order][np.minimum(np.searchsorted(edges, middle), len(column) - 1)]
        out[j] = (picked * np.diff(cuts)).sum() / (1 - 2 * trim)
    return out.reshape(values.shape[1:])


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("trim", [0.05, 0.2, 0.33, 0.49])
def test_weighted_trimmed_mean_straddling_matches_bruteforce(count, trim, chunk):
    keys = updates(count, seed=count + 100)
    weights = np.random.default_rng(count).uniform(0.1, 1.0, count)
    weights /= weights.sum()
    got = per_key(WeightedTrimmedMean(trim=trim), keys, weights)
    assert_same(got, [weighted_trim_bruteforce(keys[key], weights, trim) for key in SHAPES])


# --- Gram-based rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "byzantine"), [(5, 1), (8, 2), (16, 3), (17, 7), (9, 0)])
def test_krum_and_multi_krum_match_flower(count, byzantine):
    keys, num_examples = updates(count, seed=count), examples(count, count)
    weights, g = num_examples / num_examples.sum(), gram(keys)
    c = Krum(byzantine=byzantine).coefficients(np.full(count, 1 / count), g)
    assert sorted(c) == [0.0] * (count - 1) + [1.0]
    assert_same(apply(c, keys), aggregate_krum(flower(keys, num_examples), byzantine, 0))
    for keep in (None, 1, 2, count):
        to_keep = count - byzantine if keep is None else keep
        c = MultiKrum(byzantine=byzantine, keep=keep).coefficients(weights, g)
        assert_same(apply(c, keys), aggregate_krum(flower(keys, num_examples), byzantine, to_keep))


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize(("eps", "maxiter"), [(1e-6, 100), (1e-6, 0), (1e-6, 1), (1e-6, 3), (50.0, 5)])
def test_geomedian_matches_geom_median(count, eps, maxiter):
    # Few iterations too: the converged point would hide a wrong start or step.
    keys, num_examples = updates(count, seed=count), examples(count, count)
    weights = num_examples / num_examples.sum()
    c = GeoMedian(eps=eps, maxiter=maxiter).coefficients(weights, gram(keys))
    points = [[keys[key][k] for key in SHAPES] for k in range(count)]
    want = compute_geometric_median(points, weights=num_examples.astype(float), eps=eps, maxiter=maxiter)
    assert_same(apply(c, keys), want.median)


def centered_clip_reference(flat: np.ndarray, radius: float | None, iterations: int) -> np.ndarray:
    tau = np.median(np.linalg.norm(flat, axis=1)) if radius is None else radius
    v = np.zeros(flat.shape[1])
    for _ in range(iterations):
        pulls = flat - v
        norms = np.linalg.norm(pulls, axis=1)
        v = v + (pulls * np.minimum(1.0, tau / np.maximum(norms, 1e-300))[:, None]).mean(axis=0)
    return v


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize(("radius", "iterations"), [(None, 3), (2.0, 1), (5.0, 10), (1e6, 2)])
def test_centered_clip_matches_formula(count, radius, iterations):
    keys = updates(count, seed=count)
    flat = np.concatenate([keys[key].reshape(count, -1) for key in SHAPES], axis=1).astype(np.float64)
    c = CenteredClip(radius=radius, iterations=iterations).coefficients(np.full(count, 1 / count), gram(keys))
    want = centered_clip_reference(flat, radius, iterations)
    np.testing.assert_allclose(np.concatenate([m.ravel() for m in apply(c, keys)]), want, rtol=1e-5, atol=1e-9)


# --- merging rules ------------------------------------------------------------------------------


def peft_per_key(fn, keys: dict[str, np.ndarray], weights: np.ndarray, seed: int | None, **kwargs) -> list[np.ndarray]:
    out = []
    for index, key in enumerate(SHAPES):
        if seed is not None:
            torch.manual_seed(seed * SEED_STRIDE + index)
        tensors = list(torch.from_numpy(keys[key]))
        out.append(fn(tensors, torch.tensor(weights, dtype=torch.float64), **kwargs).numpy())
    return out


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_peft(count, density, sign):
    keys, num_examples = updates(count, seed=count), examples(count, count)
    weights = num_examples / num_examples.sum()
    got = per_key(Ties(density=density, majority_sign_method=sign), keys, weights)
    assert_same(got, peft_per_key(merge_utils.ties, keys, weights, None, density=density, majority_sign_method=sign))


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize(("density", "seed"), [(0.3, 0), (0.5, 7), (0.9, 123), (1.0, 1)])
def test_dare_and_dare_ties_match_peft(count, density, seed):
    keys, num_examples = updates(count, seed=count), examples(count, count)
    weights = num_examples / num_examples.sum()
    got = per_key(Dare(density=density, seed=seed), keys, weights)
    assert_same(got, peft_per_key(merge_utils.dare_linear, keys, weights, seed, density=density))
    for sign in ("total", "frequency"):
        got = per_key(DareTies(density=density, seed=seed, majority_sign_method=sign), keys, weights)
        want = peft_per_key(merge_utils.dare_ties, keys, weights, seed, density=density, majority_sign_method=sign)
        assert_same(got, want)
    # The masks really are random per key and per seed, not all-ones.
    if density < 1:
        again = per_key(Dare(density=density, seed=seed + 1), keys, weights)
        assert not np.allclose(again[1], got[1])


# --- adversarial updates and input checks -------------------------------------------------------


ROBUST = [TrimmedMean(0.2), WeightedTrimmedMean(0.2), Median(), Krum(1), MultiKrum(1), GeoMedian(), CenteredClip()]


@pytest.mark.parametrize("method", ROBUST, ids=lambda m: m.name)
def test_one_scaled_site_barely_moves_robust_rules(method):
    count = 8
    rng = np.random.default_rng(3)
    honest = rng.standard_normal(SHAPES["lora_A"]).astype(np.float32)
    stacked = honest + 0.01 * rng.standard_normal((count, *SHAPES["lora_A"])).astype(np.float32)
    stacked[5] *= 1000.0
    keys = {"bias": np.zeros((count, 37), np.float32), "lora_A": stacked}
    weights = np.full(count, 1 / count)
    if hasattr(method, "coefficients"):
        result = apply(method.coefficients(weights, gram(keys)), keys)[1]
    else:
        result = per_key(method, keys, weights)[1]
    scale = np.linalg.norm(honest)
    assert np.linalg.norm(stacked.mean(axis=0) - honest) > 10 * scale  # the plain mean is dragged off
    assert np.linalg.norm(result - honest) < 0.5 * scale


def test_check_refuses_too_few_updates():
    with pytest.raises(BadInput, match=r"krum: needs more than 2·byzantine\+2 = 4 valid updates, got 3"):
        Krum(byzantine=1).check(3)
    Krum(byzantine=1).check(5)
    with pytest.raises(BadInput, match="multi-krum: needs more than 2·byzantine\\+2 = 6 valid updates, got 6"):
        MultiKrum(byzantine=2).check(6)
    with pytest.raises(BadInput, match="keep = 9"):
        MultiKrum(byzantine=1, keep=9).check(8)
    with pytest.raises(BadInput, match="median: needs at least 1"):
        Median().check(0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: TrimmedMean(trim=0.5),
        lambda: WeightedTrimmedMean(trim=-0.1),
        lambda: Krum(byzantine=-1),
        lambda: MultiKrum(keep=0),
        lambda: GeoMedian(eps=0.0),
        lambda: GeoMedian(maxiter=-1),
        lambda: CenteredClip(radius=0.0),
        lambda: CenteredClip(iterations=0),
        lambda: Dare(seed=-1),
        lambda: Ties(density=0.0),
        lambda: Dare(density=1.5),
        lambda: DareTies(majority_sign_method="mode"),
    ],
)
def test_bad_parameters_are_refused(build):
    with pytest.raises(BadInput, match=r"^(aggregation\.\w+|geomedian|majority_sign_method|seed): "):
        build()


def test_params_are_the_constructor_fields():
    assert MultiKrum(byzantine=2, keep=3).params() == {"byzantine": 2, "keep": 3}
    assert DareTies().params() == {"density": 0.5, "seed": 0, "majority_sign_method": "total"}
    assert Median().params() == {}
