"""Whole-update robust rules that choose coefficients from the sites' Gram matrix.

Each rule returns c [K] and the merged delta is Σ c_k δ_k. Every quantity these rules need is a
distance between points of the span of the updates, and for u = Σ a_k δ_k, v = Σ b_k δ_k,
‖u − v‖² = (a − b)ᵀ G (a − b): the K×K Gram matrix G is enough, so the engine streams the
tensors once to build it and once to apply c, never holding every flattened update at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregate.base import LinearMethod
from fedtune.errors import BadInput


def squared_distances(gram: np.ndarray) -> np.ndarray:
    """‖δ_i − δ_j‖² for all pairs; rounding can make G_ii + G_jj − 2G_ij slightly negative."""
    diag = np.diag(gram)
    d2 = np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(d2, 0.0)
    return d2


def distances_to(gram: np.ndarray, c: np.ndarray) -> np.ndarray:
    """‖δ_i − Σ c_k δ_k‖ for every i."""
    gc = gram @ c
    return np.sqrt(np.maximum(np.diag(gram) - 2.0 * gc + c @ gc, 0.0))


def krum_scores(gram: np.ndarray, byzantine: int) -> np.ndarray:
    """Sum of squared distances from each update to its n − f − 2 nearest others (at least 1)."""
    d2 = squared_distances(gram)
    count = len(d2)
    nearest = max(1, count - byzantine - 2)
    others = np.sort(d2[~np.eye(count, dtype=bool)].reshape(count, count - 1), axis=1)
    return others[:, :nearest].sum(axis=1)


def _check_byzantine(name: str, byzantine: int, count: int) -> None:
    if count <= 2 * byzantine + 2:
        raise BadInput(
            f"{name}: needs more than 2·byzantine+2 = {2 * byzantine + 2} valid updates, got {count}; "
            "lower aggregation.byzantine or wait for more sites"
        )


@dataclass(frozen=True)
class Krum(LinearMethod):
    """The single update closest to its n − f − 2 nearest neighbours.

    Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient descent", NeurIPS 2017.
    """

    name: ClassVar[str] = "krum"
    weighted: ClassVar[bool] = False
    needs_gram: ClassVar[bool] = True
    byzantine: int = 1

    def __post_init__(self) -> None:
        if self.byzantine < 0:
            raise BadInput(f"aggregation.byzantine: must be at least 0, got {self.byzantine}")

    def check(self, count: int) -> None:
        _check_byzantine(self.name, self.byzantine, count)

    def coefficients(self, weights: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        c = np.zeros(len(weights))
        c[int(np.argmin(krum_scores(gram, self.byzantine)))] = 1.0
        return c


@dataclass(frozen=True)
class MultiKrum(LinearMethod):
    """The weighted mean of the `keep` (default n − f) updates with the best Krum scores.

    El Mhamdi et al., "The hidden vulnerability of distributed learning in Byzantium", ICML 2018.
    """

    name: ClassVar[str] = "multi-krum"
    needs_gram: ClassVar[bool] = True
    byzantine: int = 1
    keep: int | None = None

    def __post_init__(self) -> None:
        if self.byzantine < 0:
            raise BadInput(f"aggregation.byzantine: must be at least 0, got {self.byzantine}")
        if self.keep is not None and self.keep < 1:
            raise BadInput(f"aggregation.keep: must be at least 1, got {self.keep}")

    def check(self, count: int) -> None:
        _check_byzantine(self.name, self.byzantine, count)
        if self.keep is not None and self.keep > count:
            raise BadInput(f"multi-krum: keep = {self.keep} but only {count} valid updates; lower aggregation.keep")

    def coefficients(self, weights: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        count = len(weights)
        keep = count - self.byzantine if self.keep is None else self.keep
        best = np.argsort(krum_scores(gram, self.byzantine), kind="stable")[:keep]
        c = np.zeros(count)
        c[best] = weights[best] / weights[best].sum()
        return c


@dataclass(frozen=True)
class GeoMedian(LinearMethod):
    """Weighted geometric median by smoothed Weiszfeld iterations, started at the weighted mean.

    Pillutla et al., "Robust aggregation for federated learning" (RFA), IEEE TSP 2022.
    """

    name: ClassVar[str] = "geomedian"
    needs_gram: ClassVar[bool] = True
    eps: float = 1e-6
    maxiter: int = 100
    ftol: float = 1e-20

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise BadInput(f"geomedian: eps must be positive, got {self.eps}")
        if self.maxiter < 0:
            raise BadInput(f"geomedian: maxiter must be at least 0, got {self.maxiter}")

    def check(self, count: int) -> None:
        if count < 1:
            raise BadInput("geomedian: needs at least 1 valid update, got 0")

    def coefficients(self, weights: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        weights = np.asarray(weights, dtype=np.float64)
        c = weights / weights.sum()
        objective = float(np.average(distances_to(gram, c), weights=weights))
        for _ in range(self.maxiter):
            previous = objective
            # Each point pulls with weight / distance; eps keeps a point at the estimate finite.
            beta = weights / np.maximum(self.eps, distances_to(gram, c))
            c = beta / beta.sum()
            objective = float(np.average(distances_to(gram, c), weights=weights))
            if abs(previous - objective) <= self.ftol * objective:
                break
        return c


@dataclass(frozen=True)
class CenteredClip(LinearMethod):
    """Start from no change and move towards the updates, clipping each pull to radius τ.

    Karimireddy et al., "Learning from history for Byzantine robust optimization", ICML 2021.
    """

    name: ClassVar[str] = "centered-clip"
    weighted: ClassVar[bool] = False
    needs_gram: ClassVar[bool] = True
    radius: float | None = None
    iterations: int = 3

    def __post_init__(self) -> None:
        if self.radius is not None and not self.radius > 0:
            raise BadInput(f"aggregation.clip_radius: must be positive, got {self.radius}")
        if self.iterations < 1:
            raise BadInput(f"aggregation.clip_iterations: must be at least 1, got {self.iterations}")

    def check(self, count: int) -> None:
        if count < 1:
            raise BadInput("centered-clip: needs at least 1 valid update, got 0")

    def coefficients(self, weights: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        count = len(weights)
        radius = self.radius if self.radius is not None else float(np.median(np.sqrt(np.maximum(np.diag(gram), 0.0))))
        c = np.zeros(count)  # v₀ = 0: the parent itself
        for _ in range(self.iterations):
            gaps = distances_to(gram, c)
            scale = np.ones(count)
            far = gaps > radius
            scale[far] = radius / gaps[far]
            # v + (1/n)Σ s_i (δ_i − v) in coefficients: s/n on the updates, minus (Σs/n)·c.
            c = c * (1.0 - scale.sum() / count) + scale / count
        return c
