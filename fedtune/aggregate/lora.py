"""Exact LoRA aggregation: the weighted mean of the sites' products ΔW* = Σ p_k s B_k A_k, kept in
factored form.

Both rules share one re-factorisation that never forms the dense d×n matrix: stack the factors
(B_cat = [B_1 … B_K], A_cat = [p_1 s A_1; …; p_K s A_K], so ΔW* = B_cat A_cat), take thin QRs of
B_cat and A_catᵀ, and the SVD of the small R×R core R_B R_Aᵀ (R = Σ r_k). The result is ΔW* in SVD
order: B′ = Q_B U Σ, A′ = Vᵀ Q_Aᵀ, with orthonormal rows of A′. Keeping the first r columns is the
best rank-r approximation (Eckart–Young) and its error is the norm of the dropped singular values;
and because the components are ordered, a site with a smaller rank starts from the best truncation
by simply taking the first r_k of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedtune.aggregate.base import LoraMethod


def refactor(
    bs: list[torch.Tensor], as_: list[torch.Tensor], weights: torch.Tensor, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B′, A′, relative error) of Σ w_k B_k A_k at `rank` components (None: all, exact).

    Works in float64; returns float64 factors. When fewer components exist than `rank`, the missing
    columns of B′ are zero and the rows of A′ are orthonormal directions outside the others, so
    training can still grow them.
    """
    b_cat = torch.cat([b.double() for b in bs], dim=1)
    a_cat = torch.cat([float(w) * a.double() for w, a in zip(weights, as_)], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = len(s) if rank is None else min(rank, len(s))
    b_new = (q_b @ u[:, :keep]) * s[:keep]
    a_new = vh[:keep] @ q_a.T
    total = float(s.square().sum())
    error = (float(s[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    if rank is not None and keep < rank:
        b_new, a_new = _pad(b_new, a_new, rank)
    return b_new, a_new, error


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    n = a.shape[1]
    generator = torch.Generator().manual_seed(0)
    fill = torch.randn(n, max(0, min(rank, n) - a.shape[0]), dtype=a.dtype, generator=generator)
    q, _ = torch.linalg.qr(torch.cat([a.T, fill], dim=1))
    # Past n there are no directions left; zero rows with zero columns of B leave the product exact.
    a_full = a.new_zeros(rank, n)
    a_full[: q.shape[1]] = q.T
    a_full[: a.shape[0]] = a
    b_full = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return b_full, a_full


@dataclass(frozen=True)
class Svd(LoraMethod):
    """FlexLoRA-style: the exact weighted mean of the products, truncated to the federation's rank."""

    name: ClassVar[str] = "svd"

    def merge_layer(self, bs, as_, weights, rank):
        return refactor(bs, as_, weights, rank)


@dataclass(frozen=True)
class Stack(LoraMethod):
    """FLoRA (NeurIPS 2024): stacking the sites' factors is the exact mean of the products; the
    version's rank grows to Σ r_k. Stored in SVD order, so the next round starts every site from the
    best truncation at its rank."""

    name: ClassVar[str] = "stack"

    def output_rank(self, federation_rank: int, site_ranks: list[int]) -> int:
        return sum(site_ranks)

    def merge_layer(self, bs, as_, weights, rank):
        # rank = Σ r_k keeps every component, so the product is exact (a layer with fewer
        # dimensions than that has fewer non-zero components and is padded with zeros).
        return refactor(bs, as_, weights, rank)
