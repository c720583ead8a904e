"""The round's monitoring record: contributions, update drift, data drift and quality drift per site, measured
against what earlier versions along the parent chain recorded, and the alerts the thresholds raise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtune.monitor.contributions import cosines, loo_coefficients, loo_records
from fedtune.monitor.drift import norm_z, previous_cosine, profile_drift


@dataclass
class History:
    """What earlier versions (along the parent chain) recorded about each site."""

    norms: dict[str, list[float]] = field(default_factory=dict)  # oldest first
    evals: dict[str, list[float]] = field(default_factory=dict)  # parent eval losses the site reported, oldest first
    references: dict[str, dict] = field(default_factory=dict)  # site → {"version", "profile"}: its first profile
    previous: dict[str, tuple[int, str]] = field(default_factory=dict)  # site → (round, update sha256) last merged


def lineage_history(registry_root: Path, parent: dict, depth: int, coordinator_key: str | None = None) -> History:
    """Walk the parent chain from `parent` back: the sites' norms and eval reports over `depth` versions, their
    last merged update, and the first data profiles (carried forward in every monitored version, so the walk stops
    at the first version that has them)."""
    from fedtune.registry import VERSION_RE
    from fedtune.wire.version import read_version_manifest

    history = History()
    manifest, seen = parent, 0
    references_found = False
    while manifest is not None:
        monitor = manifest.get("monitor") or {}
        if seen < depth:
            for contributor in manifest.get("contributors", []):
                site = contributor["site"]
                if contributor.get("norm") is not None:
                    history.norms.setdefault(site, []).insert(0, float(contributor["norm"]))
                # an asynchronous version names the round each update was sent for: its folder's round
                history.previous.setdefault(site, (contributor.get("round") or manifest["round"],
                                                   contributor["update_sha256"]))
            for site, metrics in (monitor.get("sites") or {}).items():
                if metrics.get("eval_loss") is not None:
                    history.evals.setdefault(site, []).insert(0, float(metrics["eval_loss"]))
        if not references_found and monitor.get("references") is not None:
            for site, ref in monitor["references"].items():
                history.references.setdefault(site, ref)
            references_found = True
        seen += 1
        if (seen >= depth and references_found) or not manifest.get("parent"):
            break
        name = manifest["parent"]
        folder = Path(registry_root) / name
        if not VERSION_RE.match(name) or not (folder / "manifest.json").is_file():
            break
        manifest = read_version_manifest(folder, coordinator_key)
    return history


def _previous_update(round_dir: Path, site: str, previous: tuple[int, str] | None) -> Path | None:
    """The site's last merged update file, when its folder is still in the updates root beside this round's and its
    bytes are the ones merged (sha256 as the version recorded)."""
    from fedtune.artifacts import sha256_file
    from fedtune.registry import round_dir_name
    from fedtune.wire.tensors import ADAPTER_FILE

    if previous is None:
        return None
    path = round_dir.parent / round_dir_name(previous[0]) / site / ADAPTER_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        return path if sha256_file(path) == previous[1] else None
    except OSError:
        return None


def _alert(kind: str, site: str, metric: str, value: float, threshold: float, message: str) -> dict:
    return {"kind": kind, "site": site, "metric": metric, "value": round(float(value), 6),
            "threshold": float(threshold), "message": message[:500]}


def monitor_round(settings, rule, valid: list, weights: np.ndarray, gram: np.ndarray | None, history: History,
                  round_dir: Path, version: str, rank: int, refactors: bool) -> tuple[list[dict | None], dict]:
    """The round's contribution records (one per valid update, or None) and the version's `monitor` record.

    Args:
        settings: the federation's MonitorSettings.
        rule: the aggregation method.
        valid: the round's merged updates (fedtune.aggregate.validate.Update), in the merge's order.
        weights: their normalised weights.
        gram: [K, K] Gram matrix of the clipped deltas, or None (not computed: no contribution and no cosines).
        history: what earlier versions recorded (lineage_history).
        round_dir: this round's folder (the previous round's updates are looked for beside it).
        version: the name of the version being made.
        rank: the federation's LoRA rank.
        refactors: the rule re-factors the adapter each round (factor deltas of two rounds share no basis).
    """
    sites: dict[str, dict[str, float]] = {}
    alerts: list[dict] = []
    contributions: list[dict | None] = [None] * len(valid)
    basis = None
    if gram is not None and len(valid) > 1:
        full, without, basis = loo_coefficients(rule, weights, gram)
        if settings.contributions:
            contributions = loo_records(gram, full, without)
        to_merged, pair, twin = cosines(gram, full)
    for index, update in enumerate(valid):
        site = update.site
        metrics: dict[str, float] = {}
        if update.norm is not None:
            metrics["norm"] = float(update.norm)
            z = norm_z(update.norm, history.norms.get(site, [])[-settings.history:], settings.norm_spread)
            if z is not None and len(history.norms.get(site, [])) >= settings.min_history:
                metrics["norm_z"] = z
                if abs(z) > settings.update_norm_z:
                    alerts.append(_alert("update", site, "norm_z", z, settings.update_norm_z,
                                         f"update norm {update.norm:.4g} is {z:+.1f} spreads from its mean over "
                                         f"the site's last {len(history.norms[site][-settings.history:])} "
                                         "version(s)"))
        if basis is not None:
            if math.isfinite(to_merged[index]):
                metrics["cos_merged"] = float(to_merged[index])
            if math.isfinite(pair[index]):
                other = valid[int(twin[index])].site
                metrics["max_pair_cosine"] = float(pair[index])
                if pair[index] > settings.sybil_cosine:
                    alerts.append(_alert("update", site, "max_pair_cosine", pair[index], settings.sybil_cosine,
                                         f"near-identical to {other}'s update (cosine {pair[index]:.4f}): "
                                         "a Sybil pair, or one site's data sent twice"))
        if settings.previous_cosine and not refactors:
            previous = _previous_update(round_dir, site, history.previous.get(site))
            if previous is not None:
                cosine = previous_cosine(update.tensors, previous, rank)
                if cosine is not None:
                    metrics["cos_previous"] = cosine
        profile = (update.manifest or {}).get("data_profile")
        if profile is not None:
            reference = history.references.get(site)
            if reference is not None:
                drift = profile_drift(reference["profile"], profile)
                metrics.update(drift)
                for metric, limit in (("length_psi", settings.data_psi), ("length_js", settings.data_js),
                                      ("language_js", settings.data_js)):
                    if drift[metric] > limit:
                        alerts.append(_alert("data", site, metric, drift[metric], limit,
                                             f"{metric} {drift[metric]:.3f} against its first profile "
                                             f"({reference['version']})"))
                for metric, limit in (("pii_rate_change", settings.pii_rate), ("drop_rate_change",
                                                                                settings.drop_rate)):
                    if abs(drift[metric]) > limit:
                        alerts.append(_alert("data", site, metric, drift[metric], limit,
                                             f"{metric} {drift[metric]:+.3f} per kept record against its first "
                                             f"profile ({reference['version']})"))
            else:
                history.references[site] = {"version": version, "profile": profile}
        report = (update.manifest or {}).get("eval")
        if report is not None:
            loss = float(report["parent_loss"])
            metrics["eval_loss"] = loss
            earlier = history.evals.get(site, [])
            if earlier:
                metrics["eval_loss_change"] = loss - earlier[-1]
                rise = loss - min(earlier)
                metrics["eval_loss_over_best"] = rise
                if rise > settings.quality_rise:
                    alerts.append(_alert("quality", site, "eval_loss_over_best", rise, settings.quality_rise,
                                         f"the parent version's eval loss {loss:.4f} on the site's eval split is "
                                         f"{rise:.3f} above the lowest it reported ({min(earlier):.4f})"))
        sites[site] = {k: round(float(v), 8) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    record = {"sites": sites, "alerts": alerts, "references": history.references}
    if basis is not None and settings.contributions:
        record["contribution_basis"] = basis
    return contributions, record
