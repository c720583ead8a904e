"""The streaming merge of a round's validated updates into the next version's tensors, and the per-site factors
(weights, clipping) it applies. Tensors are read key by key through memory-mapped handles: averaging rules hold
one tensor, coordinate-wise rules one tensor × sites, LoRA-aware rules one layer × sites, plus the output adapter.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fedtune.adapter import tensor_layout
from fedtune.aggregate.base import CoordinateMethod, LinearMethod, LoraMethod, Method
from fedtune.aggregate.lora import product_error
from fedtune.aggregate.server import STATE_FILE, ServerOptimizer
from fedtune.aggregate.updates import RoundReader
from fedtune.aggregate.validate import Update
from fedtune.artifacts import sha256_file
from fedtune.config import AggregationSettings, FederationConfig
from fedtune.errors import BadInput
from fedtune.privacy.dp_fedavg import GaussianNoise
from fedtune.wire.tensors import ADAPTER_FILE, factor_of, lora_layers, rank_slice


def site_weights(counts: list[int], weighted: bool, cap: float | None) -> np.ndarray:
    """Normalized weights: the counts (or equal), then no site above `cap` — the excess goes to the others in
    proportion, so a self-reported count cannot take the round. A cap below 1/K is raised to 1/K."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = counts if weighted and counts.sum() > 0 else np.ones(len(counts))
    weights = weights / weights.sum()
    if cap is None:
        return weights
    cap = max(cap, 1.0 / len(weights))
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


def outlier_factors(norms: list[float], bound: float | None) -> np.ndarray:
    """Per-site scale that clips an update to `bound` × the median norm of the round's other updates."""
    norms = np.asarray(norms, dtype=np.float64)
    scale = np.ones(len(norms))
    if bound is None or len(norms) < 2:
        return scale
    for site, norm in enumerate(norms):
        limit = bound * float(np.median(np.delete(norms, site)))
        if norm > limit > 0:
            scale[site] = limit / norm
    return scale


def check_merged(merged: dict[str, torch.Tensor], parent_dir: Path, config: FederationConfig) -> None:
    """The new version must be finite and within reach of its parent before it is published."""
    square = 0.0
    for key, tensor in merged.items():
        part = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
        if not math.isfinite(part) or not bool(torch.isfinite(tensor).all()):
            raise BadInput(f"aggregate: the merged tensor {key} is not finite; nothing written (use a robust method, "
                           "or lower aggregation.norm_bound)")
        square += part * part
    with safe_open(str(parent_dir / ADAPTER_FILE), framework="pt") as handle:
        parent_norm = math.sqrt(sum(float(torch.linalg.vector_norm(handle.get_tensor(k), dtype=torch.float64)) ** 2
                                    for k in handle.keys()))
    limit = parent_norm + 10 * config.security.max_update_norm
    if math.sqrt(square) > limit:
        raise BadInput(f"aggregate: the merged version's norm {math.sqrt(square):.4g} is beyond {limit:.4g} (its "
                       "parent's plus 10 × security.max_update_norm); nothing written")


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
    noise: GaussianNoise | None = None,
    gram: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float] | None, int]:
    """The streaming merge of validated updates: (new adapter tensors, server state, per-layer
    reconstruction errors or None, the new version's rank).

    `record`, when given, receives "coefficients": the weight each update finally had in the merged
    delta (clipping included), for the rules that merge whole updates linearly; and with `gram`, "gram": the
    [K, K] Gram matrix of the clipped deltas (for contribution records), whatever the rule. Coordinate-wise and
    re-factoring rules build it in their own pass over the keys; a rule that needs it anyway shares it; fedavg
    and ffa, which read site by site, take one more pass for it."""
    record = record if record is not None else {}
    optimizer = ServerOptimizer.from_settings(settings)
    layout = tensor_layout(parent_dir / ADAPTER_FILE)
    rank = config.lora.r
    reader = RoundReader([u.tensors for u in valid], [u.keys for u in valid], scale, rank)
    with safe_open(str(parent_dir / ADAPTER_FILE), framework="pt") as base:
        if rule.refactors:
            assert isinstance(rule, LoraMethod)
            out_rank = rule.output_rank(rank, [u.rank for u in valid])
            merged, errors = _merge_products(rule, reader, base, layout, valid, weights, config, out_rank,
                                             record if gram else None)
            return merged, {}, errors, out_rank
        state = _server_state(parent_dir, parent, optimizer)
        merged = _merge_factors(rule, reader, base, layout, weights, optimizer, state, rank, record, noise, gram)
        errors = None
        if noise is not None:
            errors = {"skipped": "not measured under differential privacy"}
        elif rule.sum_only and optimizer.plain:
            cost = _averaging_error_cost(layout, valid, rank)
            if settings.report_error or (settings.report_error is None and cost <= ERROR_BUDGET_FLOPS):
                errors = _averaging_error(reader, base, layout, valid, weights, merged, config)
            else:
                errors = {"skipped": f"would cost {cost / 1e9:.0f} GFLOP; set aggregation.report_error: true to record it"}
        return merged, state, errors, rank


def _merge_factors(rule: Method, reader: RoundReader, base, layout, weights, optimizer, state, rank, record=None,
                   noise: GaussianNoise | None = None, want_gram: bool = False) -> dict:
    """Averaging and coordinate-wise rules: new = parent (at the federation's rank) + step(merged delta)."""
    weights_t = torch.from_numpy(weights)
    sums = None
    gram_sum = torch.zeros((len(reader), len(reader)), dtype=torch.float64) if want_gram else None
    if isinstance(rule, LinearMethod):
        gram = reader.gram(layout) if rule.needs_gram or want_gram else None
        if want_gram:
            record["gram"] = gram
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
            stacked = reader.stacked(key, tuple(parent_tensor.shape))
            if gram_sum is not None:
                _add_gram(gram_sum, stacked)
            delta = rule.combine(stacked, weights_t, index)
        if noise is not None and (rule.trains == "AB" or factor_of(key) != "A"):
            noise.add_(delta)  # a frozen factor (ffa's A) is not released from the sites' data: no noise
        step = optimizer.step(key, delta, state)
        merged[key] = (parent_tensor.to(torch.float32) + step).to(parent_tensor.dtype)
    if gram_sum is not None and sums is None:
        record["gram"] = gram_sum.numpy()
    return merged


def _add_gram(gram: torch.Tensor, stacked: torch.Tensor) -> None:
    """Add one key's inner products: `stacked` is [K, ...], every site's delta of that key."""
    flat = stacked.reshape(len(stacked), -1).to(torch.float64)
    gram += flat @ flat.T


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


def _merge_products(rule: LoraMethod, reader, base, layout, valid, weights, config, out_rank, record=None):
    scaling = config.lora.alpha / config.lora.r
    weights_t = torch.from_numpy(weights)
    merged, errors = {}, {}
    layers = lora_layers(layout)
    gram = torch.zeros((len(valid), len(valid)), dtype=torch.float64) if record is not None else None
    for layer in layers:
        if gram is not None:  # the factor deltas, as the other rules see them (padded to the federation's rank)
            for key in (layer.a_key, layer.b_key):
                _add_gram(gram, reader.stacked(key, tuple(rank_slice(torch.empty(layout[key][0], device="meta"),
                                                                      key, config.lora.r).shape)))
        bs, as_ = _local_factors(reader, base, layer, valid, scaling)
        b_new, a_new, errors[layer.name] = rule.merge_layer(bs, as_, weights_t, out_rank)
        merged[layer.b_key] = (b_new / scaling).to(torch.float32)
        merged[layer.a_key] = a_new.to(torch.float32)
    paired = {k for layer in layers for k in (layer.a_key, layer.b_key)}
    for key in layout:
        if key not in paired:  # not a LoRA factor: plain weighted mean
            parent_tensor = base.get_tensor(key).to(torch.float32)
            delta = reader.stacked(key, tuple(parent_tensor.shape))
            if gram is not None:
                _add_gram(gram, delta)
            merged[key] = parent_tensor + torch.tensordot(weights_t.to(torch.float32), delta, dims=1)
    if gram is not None:
        record["gram"] = gram.numpy()
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
