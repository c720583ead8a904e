"""Byzantine-robust, coordinate-wise rules."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.aggregate.base import Method


@dataclass(frozen=True)
class TrimmedMean(Method):
    """Drop the ⌊βK⌋ largest and smallest values of every coordinate, average the rest (Yin et al. 2018).

    Unweighted, as `scipy.stats.trim_mean(x, β, axis=0)`.
    """

    name: str = "trimmed-mean"
    summary: str = "coordinate-wise mean after dropping the ⌊trim·K⌋ largest and smallest values (unweighted)"
    weighted: bool = False
    trim: float = 0.2

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        count = stacked.shape[0]
        cut = int(self.trim * count)
        if cut == 0:
            return stacked.mean(dim=0)
        ordered = torch.sort(stacked, dim=0).values
        return ordered[cut : count - cut].mean(dim=0)
