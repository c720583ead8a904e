"""The torch merge of a round's validated updates into the next version's tensors: the coordinate-wise and
LoRA-aware rules, server optimizers, central DP noise and bfloat16 adapters (the linear rules' plain rounds are
merged by `linear.py`, without torch). Tensors are read key by key through memory-mapped handles: averaging rules
hold one tensor, coordinate-wise rules one tensor × sites, LoRA-aware rules one layer × sites, plus the output
adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fedtune.adapter import tensor_layout
from fedtune.aggregate.base import CoordinateMethod, LinearMethod, LoraMethod, Method
from fedtune.aggregate.linear import averaging_error, averaging_error_plan
from fedtune.aggregate.server import STATE_FILE, ServerOptimizer
from fedtune.aggregate.reader import RoundReader
from fedtune.aggregate.validate import Update
from fedtune.artifacts import sha256_file
from fedtune.config import AggregationSettings, FederationConfig
from fedtune.errors import BadInput
from fedtune.privacy.dp_fedavg import GaussianNoise
from fedtune.wire.tensors import ADAPTER_FILE, factor_of, lora_layers, rank_slice


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
    from fedtune.aggregate import round_torch

    round_torch()  # the round's thread count for torch's operations
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
            errors = averaging_error_plan(settings, layout, valid, rank)
            if errors is None:
                errors = averaging_error(valid, parent_dir, layout, weights, scale, merged, config.lora)
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
