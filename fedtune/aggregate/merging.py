"""Model-merging rules applied per key to the sites' deltas, with the semantics of
`peft.utils.merge_utils` (ties, dare_linear, dare_ties) — reimplemented here because importing peft
takes seconds and the coordinator must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedtune.aggregate.base import CoordinateMethod
from fedtune.errors import BadInput

SIGN_METHODS = ("total", "frequency")
# Spreads the user's seed apart so that (seed, key) pairs do not collide for adapters < 1M keys.
SEED_STRIDE = 1_000_003


def magnitude_prune(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, per site (row of `flat` [K, M]), the int(density·M) entries of largest magnitude."""
    if density >= 1:
        return flat
    keep = int(density * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    # Per row, as peft prunes each tensor on its own: a batched topk may break ties differently.
    for row, row_mask in zip(flat, mask):
        row_mask[torch.topk(row.abs(), k=keep, largest=True).indices] = True
    return flat * mask


def random_prune(stacked: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale by 1/density (DARE).

    Masks are drawn site by site, each of its tensor's own shape, from `generator`: the same stream
    that peft's `prune(..., method="random")` draws from the global RNG after the same seed.
    """
    if density >= 1:
        return stacked
    kept = [site * torch.bernoulli(torch.full_like(site, density), generator=generator) for site in stacked]
    return torch.stack(kept) / density


def elect_and_merge(pruned: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES sign election on the unweighted pruned deltas, then the disjoint merge of the weighted ones.

    An entry counts only where its sign agrees with the elected sign; the result divides the
    weighted sum of agreeing entries by how many agree (at least 1).
    """
    signs = pruned.sign()
    strength = pruned.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(strength >= 0, 1.0, -1.0).to(pruned.dtype)
    agree = signs == elected
    weighted = pruned * weights.to(pruned.dtype).reshape((-1,) + (1,) * (pruned.dim() - 1))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise BadInput(f"aggregation.density: must be in (0, 1], got {density}")


def _check_sign_method(method: str) -> None:
    if method not in SIGN_METHODS:
        raise BadInput(f"majority_sign_method: must be one of {', '.join(SIGN_METHODS)}, got '{method}'")


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise BadInput(f"seed: must be at least 0, got {seed}")


def _generator(seed: int, key_index: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed * SEED_STRIDE + key_index)
    return generator


@dataclass(frozen=True)
class Ties(CoordinateMethod):
    """Trim each delta to its largest-magnitude entries, elect a sign per entry, merge the agreeing ones.

    Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023.
    """

    name: ClassVar[str] = "ties"
    density: float = 0.5
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        _check_density(self.density)
        _check_sign_method(self.majority_sign_method)

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor, key_index: int = 0) -> torch.Tensor:
        flat = stacked.reshape(stacked.shape[0], -1)
        pruned = magnitude_prune(flat, self.density)
        return elect_and_merge(pruned, weights, self.majority_sign_method).reshape(stacked.shape[1:])


@dataclass(frozen=True)
class Dare(CoordinateMethod):
    """Drop each delta entry with probability 1 − density, rescale by 1/density, take the weighted sum.

    Yu et al., "Language models are Super Mario: absorbing abilities from homologous models", ICML 2024.
    """

    name: ClassVar[str] = "dare"
    density: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _check_density(self.density)
        _check_seed(self.seed)

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor, key_index: int = 0) -> torch.Tensor:
        pruned = random_prune(stacked, self.density, _generator(self.seed, key_index))
        return torch.tensordot(weights.to(pruned.dtype), pruned, dims=1)


@dataclass(frozen=True)
class DareTies(CoordinateMethod):
    """DARE's random drop and rescale, then TIES sign election and disjoint merge (Yu et al. 2024)."""

    name: ClassVar[str] = "dare-ties"
    density: float = 0.5
    seed: int = 0
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        _check_density(self.density)
        _check_seed(self.seed)
        _check_sign_method(self.majority_sign_method)

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor, key_index: int = 0) -> torch.Tensor:
        pruned = random_prune(stacked, self.density, _generator(self.seed, key_index))
        return elect_and_merge(pruned, weights, self.majority_sign_method)
