"""The small interfaces every aggregation method implements.

A round's updates are deltas of the LoRA factors (local − parent). Methods come in three kinds, by
what they need to see at once — which is what lets the engine stream the updates:

- `LinearMethod`: the merged delta is Σ c_k·δ_k with one coefficient per site, chosen from the
  weights and, when `needs_gram`, from the K×K Gram matrix of the whole flattened deltas (Krum,
  geometric median, centered clipping). Memory: one tensor.
- `CoordinateMethod`: a rule applied coordinate by coordinate to one key stacked over sites
  (trimmed mean, median, TIES, DARE). Memory: one tensor × sites.
- `LoraMethod`: sees both factors of one LoRA layer from every site and returns new factors
  (svd, stack). Memory: one layer × sites.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:  # the coordinate-wise and LoRA rules work on torch tensors; the linear ones never import it
    import torch


@dataclass(frozen=True)
class Method:
    """Capabilities, declared by each method so that nothing tests method names:

    trains: the factors a site trains and sends ("AB", or "B" when A stays frozen at the seeded init).
    weighted: False when every valid update counts equally whatever its size (robust rules).
    sum_only: the result needs only Σ w_k δ_k with weights fixed before any update is seen — so it runs on
        masked updates (secure aggregation), and its factor-averaging error is measured separately.
    refactors: the method writes new factors from the products B·A (no basis shared across rounds, so no
        server optimizer), and measures its own reconstruction error.
    """

    name: ClassVar[str]
    trains: ClassVar[str] = "AB"
    weighted: ClassVar[bool] = True
    sum_only: ClassVar[bool] = False
    refactors: ClassVar[bool] = False

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check(self, count: int) -> None:
        """Raise BadInput when the method cannot run on `count` valid updates."""


@dataclass(frozen=True)
class LinearMethod(Method):
    needs_gram: ClassVar[bool] = False

    def coefficients(self, weights: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        """Coefficients c [K] (float64) of the merged delta Σ c_k δ_k.

        Args:
            weights: the sites' normalized weights [K], summing to 1.
            gram: [K, K] float64, gram[i, j] = <δ_i, δ_j> over every tensor; None unless needs_gram.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class CoordinateMethod(Method):
    def combine(self, stacked: torch.Tensor, weights: torch.Tensor, key_index: int) -> torch.Tensor:
        """Merge one key: `stacked` is [K, ...] float32, `weights` [K] float64 summing to 1.

        `key_index` numbers the key within the adapter, so random rules (DARE) draw reproducibly.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class LoraMethod(Method):
    refactors: ClassVar[bool] = True

    def output_rank(self, federation_rank: int, site_ranks: list[int]) -> int:
        """The rank of the version this method writes."""
        return federation_rank

    def merge_layer(
        self, bs: list[torch.Tensor], as_: list[torch.Tensor], weights: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """New factors (B′, A′) of one layer from the sites' whole local factors.

        Args:
            bs: each site's B_k [d, r_k]; as_: each site's A_k [r_k, n], already multiplied by the
                LoRA scaling s, so that ΔW_k = B_k @ as_[k].
            weights: [K] float64 summing to 1.
            rank: the output rank (see output_rank).

        Returns:
            B′ [d, r′], A′ [r′, n] with B′ @ A′ ≈ Σ p_k B_k A_k (scaling already inside), and the
            relative error ‖ΔW* − B′A′‖ / ‖ΔW*‖.
        """
        raise NotImplementedError
