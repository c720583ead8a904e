"""`fedtune aggregate`: validate a round's updates and merge them, one tensor key at a time, into the
next global version.

Tensors are read key by key through memory-mapped `safe_open` handles: averaging rules hold one
tensor, coordinate-wise rules one tensor × sites, LoRA-aware rules one layer × sites, plus the
output adapter — never every update at once.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedtune.adapter import ADAPTER_FILE, CONFIG_FILE, tensor_layout
from fedtune.aggregate import make_method
from fedtune.aggregate.base import CoordinateMethod, LinearMethod, LoraMethod, Method
from fedtune.aggregate.lora import product_error
from fedtune.aggregate.mean import FFA, FedAvg
from fedtune.aggregate.server import STATE_FILE, ServerOptimizer
from fedtune.aggregate.updates import RoundReader, lora_layers, rank_slice
from fedtune.aggregate.validate import Rejected, Update, check_update
from fedtune.artifacts import atomic_folder, read_json, sha256_file, write_json_atomic
from fedtune.config import AggregationSettings, FederationConfig, parse_model
from fedtune.errors import BadInput
from fedtune.federation import global_manifest
from fedtune.registry import Registry, read_version_manifest, version_name

ROUND_RE = re.compile(r"^round-(\d{4,})$")


@dataclass
class RoundResult:
    version: str
    folder: Path
    contributors: list[dict]
    rejected: list[dict] = field(default_factory=list)
    reconstruction_error: dict | None = None


def _collect(round_dir: Path, config, parent, layout, max_bytes, b_only: bool) -> tuple[list[Update], list[dict]]:
    def check(folder: Path) -> Update | dict:
        try:
            update = check_update(folder, config, parent, layout, max_bytes)
            if b_only and update.trained != "B":
                raise Rejected("trained A as well, but ffa needs A frozen: set aggregation.method: ffa "
                               "in federation.yaml before the sites train")
            return update
        except Rejected as why:
            return {"site": folder.name, "reason": str(why)}

    folders = sorted(p for p in round_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    # Hashing and the finiteness pass release the GIL, so the updates are checked on every core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(folders), os.cpu_count() or 1))) as pool:
        checked = list(pool.map(check, folders))
    valid = [c for c in checked if isinstance(c, Update)]
    rejected = [c for c in checked if not isinstance(c, Update)]
    # Two updates claiming one site cannot both count, and picking one would be arbitrary.
    claims = Counter(u.site for u in valid)
    for update in [u for u in valid if claims[u.site] > 1]:
        valid.remove(update)
        rejected.append({"site": update.folder.name, "reason": f"site '{update.site}' sent more than one update this round"})
    return valid, rejected


def site_weights(counts: list[int], weighted: bool, cap: float | None) -> np.ndarray:
    """Normalized weights: num_examples (or equal), then no site above `cap` — the excess goes to the
    others in proportion, so a self-reported num_examples cannot dominate."""
    weights = np.asarray(counts, dtype=np.float64) if weighted else np.ones(len(counts))
    weights = weights / weights.sum()
    if cap is None or weights.max() <= cap:
        return weights
    if cap * len(weights) < 1 - 1e-12:
        raise BadInput(f"aggregation.max_weight {cap} is below 1/{len(weights)}: {len(weights)} sites cannot share "
                       f"the weight; raise it to at least {1 / len(weights):.4f}")
    capped = np.zeros(len(weights), dtype=bool)
    while True:
        over = (weights > cap + 1e-15) & ~capped
        if not over.any():
            return weights
        capped |= over
        free = 1 - cap * capped.sum()
        rest = weights[~capped]
        weights = np.where(capped, cap, weights * (free / rest.sum() if rest.sum() > 0 else 0))


def clip_factors(norms: list[float], clip_norm: float | None) -> np.ndarray:
    """Per-site scale min(1, C/‖δ‖) that clips each whole delta to norm C (1 when clipping is off)."""
    norms = np.asarray(norms, dtype=np.float64)
    if clip_norm is None:
        return np.ones(len(norms))
    return np.minimum(1.0, clip_norm / np.maximum(norms, 1e-30))


def aggregate_round(
    config: FederationConfig,
    registry_dir: Path,
    round_dir: Path,
    *,
    strict: bool = False,
    warn: Callable[[str], None] = lambda _msg: None,
    **overrides,
) -> RoundResult:
    """Merge the valid updates in `round_dir` into the next global version of `registry_dir`.

    Args:
        config: the federation.
        registry_dir: the registry; its LATEST is the parent of this round.
        round_dir: updates/round-NNNN holding one folder per site.
        strict: fail the round on any invalid update instead of leaving it out.
        warn: receives one line per rejected update.
        overrides: aggregation settings that replace the federation's (method, trim, quorum, …);
            None values are ignored.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(AggregationSettings.model_fields))
    if unknown:
        raise TypeError(f"aggregate_round: unknown settings {unknown}")
    settings = parse_model(AggregationSettings, {**config.aggregation.model_dump(), **given}, "aggregate")
    registry = Registry(registry_dir)
    parent_dir = registry.latest()
    parent = read_version_manifest(parent_dir)
    if parent["base_model"]["sha256"] != config.base_model.sha256:
        raise BadInput(f"{parent_dir}: built on another base model than {config.base_model.id}")
    if not round_dir.is_dir():
        raise BadInput(f"{round_dir}: updates folder not found")
    match = ROUND_RE.match(round_dir.name)
    number = parent["round"] + 1
    if not match or int(match.group(1)) != number:
        raise BadInput(f"{round_dir}: the registry's next round is {number}; give updates/round-{number:04d}")
    target = registry.path_of(version_name(number))
    if target.exists():
        raise BadInput(f"{target}: already exists but LATEST is {parent['version']}; remove it to redo the round")
    rule = make_method(settings.method, settings, seed=config.seed * 100_003 + number)
    optimizer = ServerOptimizer.from_settings(settings)
    if isinstance(rule, LoraMethod) and not optimizer.plain:
        raise BadInput(f"--server-opt/--server-lr: {rule.name} re-factors the adapter every round, so its factors "
                       "share no basis across rounds for a server optimizer; use fedavg, ffa or a robust rule with it")

    layout = tensor_layout(parent_dir / ADAPTER_FILE)
    max_bytes = 2 * (parent_dir / ADAPTER_FILE).stat().st_size + (1 << 20)
    valid, rejected = _collect(round_dir, config, parent, layout, max_bytes, b_only=isinstance(rule, FFA))
    if strict and rejected:
        # One error line (DESIGN §8): it names the first rejected update and counts the others.
        first = rejected[0]
        others = f"; {len(rejected) - 1} other update(s) also rejected" if len(rejected) > 1 else ""
        raise BadInput(f"{round_dir / first['site']}: {first['reason']} (--strict: the round is not aggregated{others})")
    for item in rejected:
        warn(f"warning: {round_dir / item['site']}: rejected: {item['reason']}")
    if len(valid) < settings.quorum:
        raise BadInput(
            f"{round_dir}: {len(valid)} valid update(s), below the quorum of {settings.quorum}; nothing written"
            + (f" ({len(rejected)} rejected)" if rejected else "")
        )
    rule.check(len(valid))

    weights = site_weights([u.num_examples for u in valid], rule.weighted, settings.max_weight)
    scale = clip_factors([u.norm for u in valid], settings.clip_norm)
    record: dict = {}
    merged, state, errors, out_rank = merge_updates(rule, valid, parent_dir, parent, config, settings, weights, scale,
                                                    record=record)
    # The rules that pick or re-weight whole updates (krum, geomedian, centered-clip) say what they chose.
    coefficients = record.get("coefficients")

    contributors = [
        {"site": u.site, "update_sha256": u.sha256, "weight": round(float(w), 8), "num_examples": u.num_examples,
         "rank": u.rank, "norm": round(u.norm, 6), **({"clip_scale": round(float(c), 6)} if c < 1 else {}),
         **({"coefficient": round(float(coefficients[i]), 8)} if coefficients is not None else {})}
        for i, (u, w, c) in enumerate(zip(valid, weights, scale))
    ]
    params = {**rule.params(), "clip_norm": settings.clip_norm, "max_weight": settings.max_weight, **optimizer.params()}
    error_summary = _summarize(errors)
    with atomic_folder(target) as tmp:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        sha = sha256_file(tmp / ADAPTER_FILE)
        adapter_config = read_json(parent_dir / CONFIG_FILE)
        adapter_config.update(r=out_rank, lora_alpha=config.lora.alpha * out_rank / config.lora.r)
        write_json_atomic(tmp / CONFIG_FILE, adapter_config)
        extra = {}
        if state:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / STATE_FILE))
            extra["server_state_sha256"] = sha256_file(tmp / STATE_FILE)
        manifest = global_manifest(
            config, number, sha, parent=parent["version"], method=rule.name, params=params,
            quorum=settings.quorum, rank=out_rank, contributors=contributors, rejected=rejected,
            reconstruction_error=error_summary, **extra,
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    registry.commit(target.name, sha, target / "manifest.json")
    return RoundResult(version=target.name, folder=target, contributors=contributors, rejected=rejected,
                       reconstruction_error=error_summary)


def merge_updates(
    rule: Method,
    valid: list[Update],
    parent_dir: Path,
    parent: dict,
    config: FederationConfig,
    settings: AggregationSettings,
    weights: np.ndarray,
    scale: np.ndarray,
    record: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float] | None, int]:
    """The streaming merge of validated updates: (new adapter tensors, server state, per-layer
    reconstruction errors or None, the new version's rank).

    `record`, when given, receives "coefficients": the weight each update finally had in the merged
    delta (clipping included), for the rules that merge whole updates linearly."""
    optimizer = ServerOptimizer.from_settings(settings)
    layout = tensor_layout(parent_dir / ADAPTER_FILE)
    rank = config.lora.r
    reader = RoundReader([u.folder / ADAPTER_FILE for u in valid], [u.keys for u in valid], scale, rank)
    with safe_open(str(parent_dir / ADAPTER_FILE), framework="pt") as base:
        if isinstance(rule, LoraMethod):
            out_rank = rule.output_rank(rank, [u.rank for u in valid])
            merged, errors = _merge_products(rule, reader, base, layout, valid, weights, config, out_rank)
            return merged, {}, errors, out_rank
        state = _server_state(parent_dir, parent, optimizer)
        merged = _merge_factors(rule, reader, base, layout, weights, optimizer, state, rank, record)
        errors = None
        if isinstance(rule, FedAvg) and optimizer.plain:
            cost = _averaging_error_cost(layout, valid, rank)
            if settings.report_error or (settings.report_error is None and cost <= ERROR_BUDGET_FLOPS):
                errors = _averaging_error(reader, base, layout, valid, weights, merged, config)
            else:
                errors = {"skipped": f"would cost {cost / 1e9:.0f} GFLOP; set aggregation.report_error: true to record it"}
        return merged, state, errors, rank


def _merge_factors(rule: Method, reader: RoundReader, base, layout, weights, optimizer, state, rank, record=None) -> dict:
    """Averaging and coordinate-wise rules: new = parent (at the federation's rank) + step(merged delta)."""
    weights_t = torch.from_numpy(weights)
    sums = None
    if isinstance(rule, LinearMethod):
        gram = reader.gram(layout) if rule.needs_gram else None
        reader.release()
        coefficients = rule.coefficients(weights, gram) * reader.scale
        if record is not None:
            record["coefficients"] = coefficients
        shapes = {key: tuple(rank_slice(torch.empty(layout[key][0], device="meta"), key, rank).shape) for key in layout}
        sums = reader.weighted_sum(coefficients, shapes)
    merged = {}
    for index, key in enumerate(layout):
        parent_tensor = rank_slice(base.get_tensor(key), key, rank)
        if sums is not None:
            delta = sums.pop(key)
        else:
            assert isinstance(rule, CoordinateMethod)
            delta = rule.combine(reader.stacked(key, tuple(parent_tensor.shape)), weights_t, index)
        step = optimizer.step(key, delta, state)
        merged[key] = (parent_tensor.to(torch.float32) + step).to(parent_tensor.dtype)
    return merged


def _local_factors(reader: RoundReader, base, layer, valid: list[Update], scaling: float):
    """Each site's whole local factors (B_k, s·A_k) of one layer: its start (the parent's first r_k
    components) plus its delta."""
    parent_a, parent_b = base.get_tensor(layer.a_key).double(), base.get_tensor(layer.b_key).double()
    bs, as_ = [], []
    for site, update in enumerate(valid):
        a = rank_slice(parent_a, layer.a_key, update.rank).clone()
        b = rank_slice(parent_b, layer.b_key, update.rank).clone()
        for start, key in ((a, layer.a_key), (b, layer.b_key)):
            delta = reader.delta(site, key, padded=False)
            if delta is not None:
                start += delta.double()
        bs.append(b)
        as_.append(scaling * a)
    return bs, as_


def _merge_products(rule: LoraMethod, reader, base, layout, valid, weights, config, out_rank):
    scaling = config.lora.alpha / config.lora.r
    weights_t = torch.from_numpy(weights)
    merged, errors = {}, {}
    layers = lora_layers(layout)
    for layer in layers:
        bs, as_ = _local_factors(reader, base, layer, valid, scaling)
        b_new, a_new, errors[layer.name] = rule.merge_layer(bs, as_, weights_t, out_rank)
        merged[layer.b_key] = (b_new / scaling).to(torch.float32)
        merged[layer.a_key] = a_new.to(torch.float32)
    paired = {k for layer in layers for k in (layer.a_key, layer.b_key)}
    for key in layout:
        if key not in paired:  # not a LoRA factor: plain weighted mean
            parent_tensor = base.get_tensor(key).to(torch.float32)
            delta = reader.stacked(key, tuple(parent_tensor.shape))
            merged[key] = parent_tensor + torch.tensordot(weights_t.to(torch.float32), delta, dims=1)
    return merged, errors


def _averaging_error(reader, base, layout, valid, weights, merged, config) -> dict[str, float]:
    """‖ΔW* − B′A′‖/‖ΔW*‖ per layer for factor averaging, ΔW* being the exact weighted mean of the
    sites' products."""
    scaling = config.lora.alpha / config.lora.r
    errors = {}
    for layer in lora_layers(layout):
        bs, as_ = _local_factors(reader, base, layer, valid, scaling)
        weighted = [float(w) * a for w, a in zip(weights, as_)]
        errors[layer.name] = product_error(bs, weighted, merged[layer.b_key].double(), scaling * merged[layer.a_key].double())
    return errors


# Past this, measuring fedavg's error would take longer than the merge itself (seconds on a laptop).
ERROR_BUDGET_FLOPS = 10e9


def _averaging_error_cost(layout, valid: list[Update], rank: int) -> float:
    """Flops of `_averaging_error`: two Gram matrices of the stacked factors per layer."""
    width = sum(u.rank for u in valid) + rank
    total = 0.0
    for layer in lora_layers(layout):
        d, n = layout[layer.b_key][0][0], layout[layer.a_key][0][1]
        total += 2.0 * width * width * (d + n)
    return total


def _summarize(errors: dict | None) -> dict | None:
    if errors is None or not errors:
        return None
    if "skipped" in errors:
        return errors
    values = list(errors.values())
    return {"max": max(values), "mean": sum(values) / len(values), "per_layer": errors}


def _server_state(parent_dir: Path, parent: dict, optimizer: ServerOptimizer) -> dict[str, torch.Tensor]:
    """The parent's server-optimizer moments when it was made with the same optimizer; else fresh."""
    if optimizer.name == "none":
        return {}
    path = parent_dir / STATE_FILE
    if parent.get("params", {}).get("server_opt") != optimizer.name or not path.is_file():
        return {}
    if sha256_file(path) != parent.get("server_state_sha256"):
        raise BadInput(f"{path}: does not match the sha256 in its manifest; restore the version from a backup")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}
