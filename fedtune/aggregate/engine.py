"""`fedtune aggregate`: decide which updates a round takes (participation), validate them, merge them one tensor
key at a time (merge) into the next global version, and publish it signed into the registry.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from fedtune.aggregate import make_method, merge_workers
from fedtune.aggregate.base import Method
# site_weights and check_merged are used from here by callers that weigh a round the way aggregate does
from fedtune.aggregate.bounds import check_merged, clip_factors, outlier_factors, site_weights  # noqa: F401
from fedtune.aggregate.linear import (
    applies as linear_merge_applies, averaging_error, averaging_error_plan, merge_linear,
)
from fedtune.aggregate.publish import RoundResult, publish_version
from fedtune.aggregate.server import ServerOptimizer
from fedtune.aggregate.updates import file_layout
from fedtune.aggregate.validate import RoundChecks, collect_round
from fedtune.config import AggregationSettings, FederationConfig, parse_model
from fedtune.errors import BadInput
from fedtune.registry import ROUND_DIR_RE, Registry, coordinator_signer, version_name
from fedtune.wire.codec import WireError
from fedtune.privacy.dp_fedavg import GaussianNoise, next_round
from fedtune.privacy.sampling import expected_sites
from fedtune.wire.tensors import ADAPTER_FILE
from fedtune.wire.version import read_version_manifest

ROUND_RE = ROUND_DIR_RE


def aggregate_round(
    config: FederationConfig,
    registry_dir: Path,
    round_dir: Path,
    *,
    strict: bool = False,
    warn: Callable[[str], None] = lambda _msg: None,
    key: Path | None = None,
    force_new_round: bool = False,
    config_path: Path | str = "federation.yaml",
    closed: bool = False,
    deadline: str | None = None,
    hold_on_alert: bool = False,
    **overrides,
) -> RoundResult:
    """Merge the valid updates in `round_dir` into the next global version of `registry_dir`.

    Args:
        config: the federation.
        registry_dir: the registry; its LATEST is the parent of this round.
        round_dir: updates/round-NNNN holding one folder per site.
        strict: fail the round on any invalid update instead of leaving it out.
        warn: receives one line per rejected update.
        key: the coordinator's private key (default: coordinator.key beside the registry).
        force_new_round: aggregate `round_dir` as the next round even when its name is an earlier round's.
        config_path: where `config` was read from (named in the roster check's errors).
        closed: the caller's wait is over (a live round's deadline passed, or every called site replied): merge
            what arrived without waiting for the round's deadline.
        deadline: when the round closes (`aggregate --deadline`: a duration from its opening, an ISO time, or
            now), instead of rounds.deadline. Before it, the round waits (Waiting) while a called site has not sent.
        hold_on_alert: a version whose round raised monitoring alerts is published but not committed: LATEST
            stays, until `fedtune promote` commits it (or `fedtune promote --reject` sets it aside).
        overrides: aggregation settings that replace the federation's (method, trim, quorum, …);
            None values are ignored.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(AggregationSettings.model_fields))
    if unknown:
        raise TypeError(f"aggregate_round: unknown settings {unknown}")
    settings = parse_model(AggregationSettings, {**config.aggregation.model_dump(), **given}, "aggregate")
    registry = Registry(registry_dir, coordinator_signer(config, Path(registry_dir), key))
    # An asynchronous round may find its whole buffer in earlier rounds' folders.
    if not round_dir.is_dir() and not (settings.asynchronous is not None and round_dir.parent.is_dir()):
        raise BadInput(f"{round_dir}: updates folder not found")
    with registry.lock("aggregate"):
        registry.check_roster(config, config_path)
        held = registry.held()
        if held:  # the round it holds is decided first: promoted, or set aside and merged again
            name, alerts = held[0]["version"], held[0]["alerts"]
            raise BadInput(f"{registry.root / name}: held on {len(alerts)} alert(s) ({_first_alert(alerts)}); "
                           f"`fedtune promote {name} --registry {registry.root}` makes it LATEST, `--reject` sets it "
                           "aside so the round can be merged again")
        parent_dir = registry.latest()
        parent = read_version_manifest(parent_dir, config.coordinator_key)
        if parent["base_model"]["sha256"] != config.base_model.sha256:
            raise BadInput(f"{parent_dir}: built on another base model than {config.base_model.id}")
        number = parent["round"] + 1
        match = ROUND_RE.match(round_dir.name)
        if match and int(match.group(1)) < number and not force_new_round:
            done = version_name(int(match.group(1)))
            raise BadInput(f"{round_dir}: round {int(match.group(1))} is already committed as {done} (LATEST is "
                           f"{parent['version']}); the next round is updates/round-{number:04d} "
                           "(--force-new-round merges this folder as that round)")
        if (not match or int(match.group(1)) != number) and not force_new_round:
            raise BadInput(f"{round_dir}: the registry's next round is {number}; give updates/round-{number:04d}")
        work = registry.root / f".round-{number:04d}.{os.getpid()}.work"
        work.mkdir(mode=0o700)
        try:
            return _aggregate(config, registry, parent_dir, parent, round_dir, settings, work, strict, warn,
                              closed, deadline, hold_on_alert)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _first_alert(alerts: list[dict]) -> str:
    return f"{alerts[0]['site']}: {alerts[0]['message']}" if alerts else "no alert recorded"


def _aggregate(config, registry: Registry, parent_dir: Path, parent: dict, round_dir: Path, settings, work: Path,
               strict: bool, warn, closed: bool = False, deadline: str | None = None,
               hold_on_alert: bool = False) -> RoundResult:
    from fedtune.aggregate.participation import close_round, collect_buffer, late_updates

    number = parent["round"] + 1
    rule = make_method(settings.method, settings, seed=config.seed * 100_003 + number)
    optimizer = ServerOptimizer.from_settings(settings)
    if rule.refactors and not optimizer.plain:
        raise BadInput(f"--server-opt/--server-lr: {rule.name} re-factors the adapter every round, so its factors "
                       "share no basis across rounds for a server optimizer; use fedavg, ffa or a robust rule with it")
    privacy = next_round(config, parent, str(round_dir))  # a spent budget stops the round before any reading
    layout = _layout(parent_dir)
    nonces, hashes = registry.accepted()
    checks = RoundChecks(config, parent, layout, max_bytes=2 * (parent_dir / ADAPTER_FILE).stat().st_size + (1 << 20),
                         trains=rule.trains, work=work, accepted_nonces=nonces, accepted_hashes=hashes)
    staleness: dict[str, tuple[int, int, float]] = {}  # nonce → (round sent for, τ, s(τ)) in async rounds
    if settings.asynchronous is not None:
        if rule.refactors:
            raise BadInput(f"aggregation.async: {rule.name} re-factors the adapter each version, so a stale update "
                           "shares no basis with it; use a method that merges factors")
        buffer, rejected, equivocations = collect_buffer(round_dir, checks, registry, settings.asynchronous, warn)
        valid = [item.update for item in buffer]
        staleness = {item.update.nonce: (item.round, item.staleness, settings.asynchronous.scale(item.staleness))
                     for item in buffer}
        participation, poisson = None, False
    else:
        state = close_round(config, round_dir, parent, closed=closed, deadline=deadline)  # may wait (exit 3)
        participation = state.record()
        if config.privacy.secure_aggregation:
            return _aggregate_secure(config, registry, parent_dir, parent, round_dir, settings, checks, privacy, rule,
                                     optimizer, warn, strict, participation, hold_on_alert)
        called = set(state.called.sites) if state.called.draw != "all" else None
        valid, rejected, equivocations = collect_round(round_dir, checks)
        if called is not None:
            for update in [u for u in valid if u.site not in called]:
                valid.remove(update)
                rejected.append({"site": update.folder.name,
                                 "reason": f"site {update.site} was not drawn in round {number}'s sample"})
        poisson = state.called.draw == "poisson"  # sampled central DP: a fixed denominator, no quorum
    if strict and rejected:
        # One error line (DESIGN §8): it names the first rejected update and counts the others.
        first = rejected[0]
        others = f"; {len(rejected) - 1} other update(s) also rejected" if len(rejected) > 1 else ""
        raise BadInput(f"{_where(round_dir, first)}: {first['reason']} (--strict: the round is not aggregated{others})")
    if settings.asynchronous is None:
        rejected += late_updates(round_dir, checks, registry)  # an earlier round's, recorded: not this round's fault
    for item in rejected:
        warn(f"warning: {_where(round_dir, item)}: rejected: {item['reason']}")
    # Sampled central DP releases every round whoever answered (its denominator is fixed), so no quorum holds it.
    if len(valid) < settings.quorum and not poisson and settings.asynchronous is None:
        raise BadInput(
            f"{round_dir}: {len(valid)} valid update(s), below the quorum of {settings.quorum}; nothing written"
            + (f" ({len(rejected)} rejected)" if rejected else "")
        )
    if valid:
        rule.check(len(valid))

    noise = None
    if config.privacy.mode == "central":
        # DP-FedAvg: fixed weights 1/n over the expected number of sites and every delta clipped to C bound one
        # site's influence.
        expected = expected_sites(config)
        weights = np.full(len(valid), 1.0 / expected)
        scale = clip_factors([u.norm for u in valid], config.privacy.clip_norm)
        noise = GaussianNoise(config.privacy.noise_multiplier * config.privacy.clip_norm / expected)
    elif config.privacy.mode == "distributed":
        # The sites clipped and noised their own deltas (checked below): the coordinator only averages.
        weights, scale = np.full(len(valid), 1.0 / len(config.sites)), np.ones(len(valid))
    else:
        counts = [u.num_tokens if settings.weighting == "tokens" else u.num_examples for u in valid]
        weights = site_weights(counts, rule.weighted and settings.weighting != "uniform", settings.max_weight)
        scale = clip_factors([u.norm for u in valid], settings.clip_norm) * outlier_factors(
            [u.norm for u in valid], settings.norm_bound)
    clipped = scale
    if staleness:  # FedBuff: a stale update counts for less, s(τ) = (1 + τ)^−a
        scale = scale * np.array([staleness[u.nonce][2] for u in valid])
    for update, factor in zip(valid, scale):
        if factor < 1:
            warn(f"warning: {round_dir / update.folder.name}: norm {update.norm:.4g} clipped by {factor:.3g}")
    if config.privacy.mode == "local":
        from fedtune.privacy.local import version_record

        # Each site's DP-SGD protects its own records: the version states the ε its accepted updates reported.
        privacy = version_record(config, privacy, parent, valid)
    record: dict = {}
    # Contribution records describe one site's update: not released beside a site-level DP guarantee.
    describe_sites = config.monitor.contributions and config.privacy.mode in ("none", "local") and len(valid) > 1
    merged, state, errors, out_rank = merge_tensors(rule, valid, parent_dir, parent, config, settings, layout, weights,
                                                    scale, record, noise, describe_sites)
    check_merged(merged, parent_dir, config, record.get("parent_norm"))
    contributions, monitor = _monitor(config, registry, parent, rule, valid, weights, record.get("gram"), round_dir)
    # Nothing reads the private copies after this: they are removed while the version is written.
    sweeper = threading.Thread(target=_remove_copies, args=(valid,), daemon=True)
    sweeper.start()
    # The rules that pick or re-weight whole updates (krum, geomedian, centered-clip) say what they chose.
    coefficients = record.get("coefficients")
    contributors = [
        {"site": u.site, "update_sha256": u.sha256, "nonce": u.nonce, "weight": round(float(w), 8),
         "num_examples": u.num_examples, "num_tokens": u.num_tokens, "rank": u.rank, "norm": round(u.norm, 6),
         **({"clip_scale": round(float(c), 6)} if c < 1 else {}),
         **({"coefficient": round(float(coefficients[i]), 8)} if coefficients is not None else {}),
         **({"round": staleness[u.nonce][0], "staleness": staleness[u.nonce][1],
             "staleness_scale": round(staleness[u.nonce][2], 8)} if staleness else {}),
         **({"contribution": contributions[i]} if contributions[i] is not None else {})}
        for i, (u, w, c) in enumerate(zip(valid, weights, clipped))
    ]
    params = {**rule.params(), "weighting": settings.weighting, "clip_norm": settings.clip_norm,
              "max_weight": settings.max_weight, "norm_bound": settings.norm_bound, **optimizer.params(),
              **({"async": settings.asynchronous.model_dump()} if settings.asynchronous is not None else {})}
    error_summary = _summarize(errors)
    fields = dict(method=rule.name, privacy=privacy, params=params, quorum=settings.quorum, rank=out_rank,
                  contributors=contributors, rejected=rejected, equivocations=equivocations,
                  reconstruction_error=error_summary,
                  **({"participation": participation} if participation is not None else {}),
                  **({"monitor": monitor} if monitor is not None else {}))
    try:
        return publish_version(config, registry, parent_dir, parent, merged, state, out_rank, fields, hold_on_alert)
    finally:
        sweeper.join()


def _remove_copies(valid: list) -> None:
    for update in valid:
        try:
            update.tensors.unlink()
        except OSError:
            pass  # the work folder is removed at the end of the round whatever happens here


def merge_tensors(rule: Method, valid: list, parent_dir: Path, parent: dict, config, settings, layout, weights,
                  scale, record: dict, noise, gram: bool):
    """(merged tensors, server state, reconstruction errors, rank): the linear rules' numpy merge when it applies,
    else the torch merge (which the coordinator then imports)."""
    if not linear_merge_applies(rule, ServerOptimizer.from_settings(settings).plain, noise, layout):
        from fedtune.aggregate.merge import merge_updates

        return merge_updates(rule, valid, parent_dir, parent, config, settings, weights, scale, record=record,
                             noise=noise, gram=gram)
    rank = config.lora.r
    merged = merge_linear(rule, valid, parent_dir, layout, weights, scale, rank, record, gram, merge_workers())
    errors = averaging_error_plan(settings, layout, valid, rank) if rule.sum_only else None
    if rule.sum_only and errors is None:
        errors = averaging_error(valid, parent_dir, layout, weights, scale, merged, config.lora)
    return merged, {}, errors, rank


def _layout(parent_dir: Path):
    try:
        return file_layout(parent_dir / ADAPTER_FILE)
    except (OSError, WireError) as err:
        raise BadInput(f"{parent_dir / ADAPTER_FILE}: not a readable safetensors file ({err}); restore the version "
                       "from a backup") from None


def _summarize(errors: dict | None) -> dict | None:
    if errors is None or not errors:
        return None
    if "skipped" in errors:
        return errors
    values = list(errors.values())
    return {"max": max(values), "mean": sum(values) / len(values), "per_layer": errors}


def _monitor(config, registry: Registry, parent: dict, rule: Method, valid: list, weights, gram, round_dir: Path):
    """The round's contribution records (one per update, or None) and the version's monitor record (or None when
    no update was merged)."""
    from fedtune.monitor import lineage_history, monitor_round

    if not valid:
        return [], None
    history = lineage_history(registry.root, parent, config.monitor.history, config.coordinator_key)
    return monitor_round(config.monitor, rule, valid, np.asarray(weights, dtype=np.float64), gram, history,
                         round_dir, version_name(parent["round"] + 1), config.lora.r, rule.refactors)


def _where(round_dir: Path, item: dict) -> Path:
    """The folder a rejected record names: in this round's folder, or (round-NNNN/site) in an earlier round's."""
    return round_dir.parent / item["site"] if "/" in item["site"] else round_dir / item["site"]


def _aggregate_secure(config, registry: Registry, parent_dir: Path, parent: dict, round_dir: Path, settings, checks,
                      privacy: dict, rule: Method, optimizer: ServerOptimizer, warn, strict: bool,
                      participation: dict | None = None, hold_on_alert: bool = False) -> RoundResult:
    """A masked round: unmask the survivors' sum (or write the unmask request, or wait for answers), then step."""
    from safetensors import safe_open

    from fedtune.aggregate import round_torch
    from fedtune.aggregate.merge import _server_state
    from fedtune.aggregate.secure import secure_sum
    from fedtune.wire.tensors import rank_slice

    torch = round_torch()
    outcome = secure_sum(config, registry.key, round_dir, parent, checks, settings.quorum, warn, strict)
    if config.privacy.mode == "local":
        from fedtune.privacy.local import version_record

        privacy = version_record(config, privacy, parent, outcome.valid)
    rank = config.lora.r
    state = _server_state(parent_dir, parent, optimizer)
    merged = {}
    with safe_open(str(parent_dir / ADAPTER_FILE), framework="pt") as base:
        for key in _layout(parent_dir):
            parent_tensor = rank_slice(base.get_tensor(key), key, rank)
            delta = outcome.mean.get(key)
            if delta is None:  # ffa's frozen A
                delta = torch.zeros(parent_tensor.shape, dtype=torch.float32)
            merged[key] = (parent_tensor.to(torch.float32) + optimizer.step(key, delta, state)).to(parent_tensor.dtype)
    check_merged(merged, parent_dir, config)
    # What the coordinator saw of each site: that it sent, and which update; never its weight, size or norm.
    contributors = [{"site": u.site, "update_sha256": u.sha256, "nonce": u.nonce, "weight": None,
                     "num_examples": None, "num_tokens": None, "rank": u.rank, "norm": None} for u in outcome.valid]
    params = {**rule.params(), "weighting": "uniform" if config.privacy.mode == "distributed" else settings.weighting,
              "secagg_max_count": config.privacy.secagg_max_count, **optimizer.params()}
    fields = dict(method=rule.name, privacy=privacy, params=params, quorum=settings.quorum, rank=rank,
                  contributors=contributors, rejected=outcome.rejected, equivocations=outcome.equivocations,
                  reconstruction_error={"skipped": "not measured under secure aggregation"},
                  secure_aggregation=outcome.record,
                  **({"participation": participation} if participation is not None else {}))
    return publish_version(config, registry, parent_dir, parent, merged, state, rank, fields, hold_on_alert)
