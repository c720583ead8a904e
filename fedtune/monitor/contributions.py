"""Contribution records: the leave-one-out (LOO) change of the merged delta, from the K×K Gram matrix of the
round's deltas (for Δ = Σ c_j δ_j and Δ₋ₖ = Σ c'_j δ_j every inner product is cᵀGc'); the LOO change in mean eval
loss of candidates merged without each site (simulate, monitor.loo_eval); and their sums across versions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

def _quad(gram: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ gram @ b)


def loo_records(gram: np.ndarray, full: np.ndarray, without: list[np.ndarray]) -> list[dict | None]:
    """Each site's leave-one-out record from the Gram matrix of the (clipped) deltas.

    Args:
        gram: [K, K] inner products of the deltas as merged.
        full: [K] coefficients of the merged delta Δ = Σ c_j δ_j.
        without: for each site k, the [K] coefficients of Δ₋ₖ (0 at k).

    Returns:
        {"loo_cosine", "loo_distance", "loo_relative"} per site; None where a cosine is undefined (Δ or Δ₋ₖ is 0).
    """
    norm2 = max(_quad(gram, full, full), 0.0)
    out: list[dict | None] = []
    for other in without:
        rest2 = max(_quad(gram, other, other), 0.0)
        gap = full - other
        distance = math.sqrt(max(_quad(gram, gap, gap), 0.0))
        if norm2 <= 0 or rest2 <= 0:
            out.append(None)
            continue
        cosine = _quad(gram, full, other) / math.sqrt(norm2 * rest2)
        out.append({"loo_cosine": round(min(1.0, max(-1.0, cosine)), 8), "loo_distance": round(distance, 8),
                    "loo_relative": round(distance / math.sqrt(norm2), 8)})
    return out


def loo_coefficients(rule, weights: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], str]:
    """The coefficients of Δ and of each Δ₋ₖ, and what they are (the basis the records state).

    A rule that merges whole updates linearly (fedavg, ffa, krum, multi-krum, geomedian, centered-clip) is re-run
    without site k on the others' renormalised weights and their part of the Gram matrix: "rule". Every other rule
    (coordinate-wise: median, trimmed mean, ties, dare; re-factoring: svd, stack), and a linear one that cannot run
    on K − 1 updates, is not a fixed linear combination of the deltas: its records are those of the weighted mean
    Σ p_j δ_j, renormalised without k — "linear".
    """
    from fedtune.aggregate.base import LinearMethod
    from fedtune.errors import BadInput

    count = len(weights)
    weights = np.asarray(weights, dtype=np.float64)

    def renormalised(k: int) -> np.ndarray:
        c = weights.copy()
        c[k] = 0.0
        total = c.sum()
        return c / total if total > 0 else c

    if isinstance(rule, LinearMethod) and count > 1:
        try:
            rule.check(count - 1)
            full = np.asarray(rule.coefficients(weights, gram), dtype=np.float64)
            without = []
            for k in range(count):
                keep = [j for j in range(count) if j != k]
                c = np.zeros(count)
                c[keep] = rule.coefficients(renormalised(k)[keep], gram[np.ix_(keep, keep)])
                without.append(c)
            return full, without, "rule"
        except BadInput:
            pass
    return weights, [renormalised(k) for k in range(count)], "linear"


def cosines(gram: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each update's cosine to Δ, its highest cosine to another update, the index of that update)."""
    diag = np.maximum(np.diag(gram), 0.0)
    norms = np.sqrt(diag)
    merged = math.sqrt(max(_quad(gram, full, full), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        to_merged = np.where(norms * merged > 0, (gram @ full) / (norms * merged), np.nan)
        pair = np.where(np.outer(norms, norms) > 0, gram / np.outer(norms, norms), np.nan)
    np.fill_diagonal(pair, -np.inf)
    count = len(diag)
    if count < 2:
        return to_merged, np.full(count, np.nan), np.zeros(count, dtype=int)
    pair = np.where(np.isnan(pair), -np.inf, pair)
    twin = np.argmax(pair, axis=1)
    best = pair[np.arange(count), twin]
    return to_merged, np.where(np.isfinite(best), best, np.nan), twin


# --- the leave-one-out change in eval loss ---------------------------------------------------------------------


def loo_eval_records(full: dict[str, float], without: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Each site's leave-one-out change in mean eval loss.

    Args:
        full: eval loss of the version made from every update, by evaluating site.
        without: for each left-out site k, the eval losses (by evaluating site) of the candidate Δ₋ₖ: the same
            round merged without k.

    Returns:
        {k: {"loss_without": mean loss of Δ₋ₖ, "loss_with": mean loss of Δ, "loo_eval_loss": their difference}}: a
        positive value means leaving k out raises the mean loss, so k helped. The mean is over the sites that
        evaluated both candidates.
    """
    out = {}
    for site, losses in without.items():
        common = sorted(set(losses) & set(full))
        if not common:
            continue
        with_k = float(np.mean([full[s] for s in common]))
        without_k = float(np.mean([losses[s] for s in common]))
        out[site] = {"loss_with": round(with_k, 6), "loss_without": round(without_k, 6),
                     "loo_eval_loss": round(without_k - with_k, 6)}
    return out


def snapshot_registry(registry_root: Path, work: Path) -> Path:
    """A scratch copy of the registry as it is (LATEST the round's parent), for loo_candidate_losses: taken before
    the round's own merge, used after it."""
    import shutil

    target = work / "registry"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(registry_root, target, ignore=shutil.ignore_patterns(".lock", ".*.tmp", ".*.work"))
    return target


def loo_candidate_losses(config, snapshot: Path, round_dir: Path, key: Path, score, log=lambda _msg: None
                         ) -> dict[str, dict[str, float]]:
    """Merge the round once without each site, through the same aggregate stage, and score each candidate.

    Each candidate is made in a copy of `snapshot` (snapshot_registry: LATEST still the round's parent) from a copy
    of the round folder without that site's update; `score(folder)` returns its eval loss by evaluating site. A
    left-out site whose absence drops the round below its quorum gets no candidate. The snapshot is removed after.

    Returns:
        {left-out site: {evaluating site: loss}}, for loo_eval_records.
    """
    import shutil

    from fedtune.aggregate.engine import aggregate_round
    from fedtune.errors import BadInput

    sites = sorted(p.name for p in round_dir.iterdir() if p.is_dir() and (p / "manifest.json").is_file())
    out: dict[str, dict[str, float]] = {}
    try:
        for left_out in sites:
            scratch = snapshot.parent / f"without-{left_out}"
            registry = scratch / "registry"
            shutil.copytree(snapshot, registry)
            folder = scratch / "updates" / round_dir.name
            folder.mkdir(parents=True)
            for site in sites:
                if site != left_out:
                    shutil.copytree(round_dir / site, folder / site)
            try:
                result = aggregate_round(config, registry, folder, key=key, closed=True)
                out[left_out] = score(result.folder)
            except BadInput as err:  # e.g. below the quorum without this site
                log(f"leave-one-out without {left_out}: not merged ({err})")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        shutil.rmtree(snapshot.parent, ignore_errors=True)
    return out


# --- sums across rounds (`fedtune log --contributions`) --------------------------------------------------------


def contribution_totals(manifests: list[dict]) -> list[dict]:
    """Per site, across versions: rounds merged, rounds with a contribution record, Σ(1 − loo_cosine), Σ loo_distance,
    mean loo_relative and the alerts raised. Rows sorted by site."""
    rows: dict[str, dict] = {}
    for manifest in manifests:
        for contributor in manifest.get("contributors", []):
            row = rows.setdefault(contributor["site"], {"site": contributor["site"], "rounds": 0, "recorded": 0,
                                                        "direction": 0.0, "distance": 0.0, "relative": 0.0,
                                                        "alerts": 0})
            row["rounds"] += 1
            record = contributor.get("contribution")
            if record:
                row["recorded"] += 1
                row["direction"] += 1.0 - record["loo_cosine"]
                row["distance"] += record["loo_distance"]
                row["relative"] += record["loo_relative"]
        for alert in (manifest.get("monitor") or {}).get("alerts", []):
            if alert["site"] in rows:
                rows[alert["site"]]["alerts"] += 1
    out = []
    for site in sorted(rows):
        row = rows[site]
        recorded = row["recorded"]
        out.append({"site": site, "rounds": row["rounds"], "recorded": recorded,
                    "loo_direction_sum": round(row["direction"], 8), "loo_distance_sum": round(row["distance"], 8),
                    "loo_relative_mean": round(row["relative"] / recorded, 8) if recorded else None,
                    "alerts": row["alerts"]})
    return out
