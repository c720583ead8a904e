"""Averaging: FedAvg (McMahan et al. 2017), weighted by each site's number of examples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.aggregate.base import Method


@dataclass(frozen=True)
class FedAvg(Method):
    name: str = "fedavg"
    summary: str = "weighted mean of the sites' deltas (A and B averaged separately), weights = num_examples"

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # tensordot keeps one output-sized buffer instead of a weighted copy of every site.
        return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)
