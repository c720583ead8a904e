"""Averaging the factors: FedAvg (McMahan et al. 2017) and FFA-LoRA (Sun et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregate.base import LinearMethod


@dataclass(frozen=True)
class FedAvg(LinearMethod):
    """A ← Σp_k A_k, B ← Σp_k B_k. Inexact when the sites' A drift apart (Σp_k B_k A_k ≠ B̄Ā); the
    manifest records by how much."""

    name: ClassVar[str] = "fedavg"
    sum_only: ClassVar[bool] = True

    def coefficients(self, weights: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        return weights


@dataclass(frozen=True)
class FFA(FedAvg):
    """FFA-LoRA: A stays frozen at the seeded init, sites train and send B only, so averaging B is the
    exact mean of the products (ΔW is linear in B) — and half the traffic."""

    name: ClassVar[str] = "ffa"
    trains: ClassVar[str] = "B"
