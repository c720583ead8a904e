"""The one small interface every aggregation method implements."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Method:
    """A rule that merges one tensor key across sites.

    `combine` gets the sites' deltas for one key stacked on dim 0 (float32, [K, ...]) and their
    normalized weights [K]; it returns the merged delta. Methods see one key at a time, so the
    engine can stream the updates and never hold them all.
    """

    name: str
    summary: str
    weighted: bool = True
    params: dict = field(default_factory=dict)

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
