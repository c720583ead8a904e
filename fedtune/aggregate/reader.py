"""The round's updates as torch tensors, key by key, for the rules that need torch (coordinate-wise and
re-factoring rules, server optimizers, central DP): memory-mapped `safe_open` handles over the private copies.
A site that trained a smaller rank sent smaller factors; here they are zero-padded to the federation's rank
(HetLoRA), and a site that trained B only (FFA) contributes a zero delta to A.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fedtune.wire.tensors import pad_rank


class RoundReader:
    """The valid updates of a round, read through memory-mapped safe_open handles.

    A mapped page a tensor was read from stays in the process's resident set until the file is
    unmapped, so reading key by key across every site would let the resident set grow to the whole
    round. The reader therefore drops its handles (unmapping the files) whenever `budget` bytes have
    been read since the last time: resident memory stays bounded whatever the number of sites.

    Args:
        paths: one update file per site, in the round's order.
        keys_sent: the keys each site sent (B only for FFA sites).
        scale: per-site factor applied to every delta (norm clipping; 1 when off).
        rank: the federation's rank, to which smaller factors are padded.
        budget: bytes read between two releases of the mappings.
    """

    def __init__(self, paths: list[Path], keys_sent: list[set[str]], scale: np.ndarray, rank: int,
                 budget: int = 256 << 20):
        self.paths = paths
        self.keys_sent = keys_sent
        self.scale = scale
        self.rank = rank
        self.budget = budget
        self._handles: list = [None] * len(paths)
        self._read = 0

    def __len__(self) -> int:
        return len(self.paths)

    def release(self) -> None:
        """Unmap every file (tensors already read keep their own reference to their pages)."""
        self._handles = [None] * len(self.paths)
        self._read = 0

    def _get(self, site: int, key: str) -> torch.Tensor:
        if self._read >= self.budget:
            self.release()
        handle = self._handles[site]
        if handle is None:
            handle = self._handles[site] = safe_open(str(self.paths[site]), framework="pt")
        tensor = handle.get_tensor(key)
        self._read += tensor.nbytes
        return tensor

    def delta(self, site: int, key: str, padded: bool = True, scaled: bool = True) -> torch.Tensor | None:
        """Site `site`'s delta for `key` as float32, or None where it is zero.

        padded: zero-pad a smaller rank to the federation's; scaled: apply the clipping factor.
        """
        if key not in self.keys_sent[site]:
            return None
        tensor = self._get(site, key)
        if tensor.dtype != torch.float32:
            tensor = tensor.to(torch.float32)
        if scaled and self.scale[site] != 1.0:
            tensor = tensor * float(self.scale[site])  # not in place: the tensor may share the file's mapping
        return pad_rank(tensor, key, self.rank) if padded else tensor

    def weighted_sum(self, coefficients: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Σ_k c_k δ_k for every key, reading one site's file at a time from start to end.

        Site by site rather than key by key: only one file is mapped at once, and it is read in
        order. Memory holds the sums (one adapter) plus one mapped update.
        """
        sums: dict[str, torch.Tensor] = {}
        for site, coefficient in enumerate(coefficients):
            if coefficient == 0:
                continue
            with safe_open(str(self.paths[site]), framework="pt") as handle:
                for key in shapes:
                    if key not in self.keys_sent[site]:
                        continue
                    tensor = pad_rank(handle.get_tensor(key).to(torch.float32), key, self.rank)
                    if key in sums:
                        sums[key].add_(tensor, alpha=float(coefficient))
                    else:  # a new tensor: the one read may share the file's mapping
                        sums[key] = tensor * float(coefficient)
        for key, shape in shapes.items():
            if key not in sums:
                sums[key] = torch.zeros(shape, dtype=torch.float32)
        return sums

    def stacked(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """[K, *shape] float32: every site's delta for one key."""
        out = torch.zeros((len(self), *shape), dtype=torch.float32)
        for site in range(len(self)):
            tensor = self.delta(site, key)
            if tensor is not None:
                out[site] = tensor
        return out

    def gram(self, keys) -> np.ndarray:
        """[K, K] float64 inner products of the sites' whole flattened deltas, one key at a time."""
        count = len(self)
        gram = torch.zeros((count, count), dtype=torch.float64)
        for key in keys:
            rows = [self.delta(site, key) for site in range(count)]
            size = next((r.numel() for r in rows if r is not None), 0)
            flat = torch.empty((count, size), dtype=torch.float64)  # every row is written below: no zero-fill
            for site, row in enumerate(rows):
                flat[site] = row.reshape(-1) if row is not None else 0.0
            gram += flat @ flat.T
        return gram.numpy()
