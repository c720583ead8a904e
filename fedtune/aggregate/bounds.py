"""What bounds one site's say in a round and what the round may publish: the sites' weights (with a cap), the
clipping factors, and the check of the merged version against its parent. Plain numpy: the linear merge
runs without torch, and the torch rules hand their tensors here too."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedtune.aggregate.updates import PrivateTensors, square_sum
from fedtune.errors import BadInput
from fedtune.wire.tensors import ADAPTER_FILE


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


def array_norm(values) -> float:
    """L2 norm in float64 of a numpy array or a torch tensor; NaN or infinite when a value is."""
    if not isinstance(values, np.ndarray):  # a torch tensor (the torch rules' output)
        import torch

        return float(torch.linalg.vector_norm(values, dtype=torch.float64))
    total = square_sum(values)
    return math.sqrt(total) if math.isfinite(total) else total


def check_merged(merged: dict, parent_dir: Path, config, parent_norm: float | None = None) -> None:
    """The new version must be finite and within reach of its parent before it is published. A NaN or an infinity
    anywhere makes its tensor's norm NaN or infinite. `parent_norm`: the parent's, when the merge measured it."""
    square = 0.0
    for key, tensor in merged.items():
        part = array_norm(tensor)
        if not math.isfinite(part):
            raise BadInput(f"aggregate: the merged tensor {key} is not finite; nothing written (use a robust method, "
                           "or lower aggregation.norm_bound)")
        square += part * part
    if parent_norm is None:
        with PrivateTensors(parent_dir / ADAPTER_FILE) as parent:
            parent_norm = math.sqrt(sum(array_norm(parent.tensor(key)) ** 2 for key in parent.keys()))
    limit = parent_norm + 10 * config.security.max_update_norm
    if math.sqrt(square) > limit:
        raise BadInput(f"aggregate: the merged version's norm {math.sqrt(square):.4g} is beyond {limit:.4g} (its "
                       "parent's plus 10 × security.max_update_norm); nothing written")
