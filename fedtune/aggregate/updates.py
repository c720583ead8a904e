"""Reading a round's updates: once from the site's folder into a private copy, then one tensor key at a time.

`read_private_copy` is the only read of a site's file: a copy inside the kernel, then one pass over the copy,
tensor by tensor, that hashes the bytes and takes each tensor's norm while they are in the cache. The merge
then opens the private copies with `safetensors.safe_open` (memory-mapped) and reads them key by key,
so the engine holds one key of each site at most. A site that trained a smaller rank sent smaller factors;
here they are zero-padded to the federation's rank (HetLoRA), and a site that trained B only (FFA)
contributes a zero delta to A.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fedtune.wire.codec import WireError, open_regular, parse_json
from fedtune.wire.tensors import MAX_HEADER_BYTES, Layout, pad_rank, read_header
from fedtune.wire.update import copy_between

# torch views the read-only mapping of a private copy to take norms; it warns that such a tensor could be
# written through, and nothing here writes.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
# The float dtypes a plaintext update holds (the parent's); a norm is taken of these only.
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class PrivateCopy:
    """What one read of an update's tensor file found: the sha256 of its bytes, its header's layout, and the
    L2 norm (float64) of each float tensor, taken when the whole layout was the expected one."""

    path: Path
    sha256: str
    layout: Layout
    norms: dict[str, float]


def read_private_copy(source: Path, target: Path, max_bytes: int, expected: Layout | None) -> PrivateCopy:
    """Copy `source` into `target` (a new file only this process writes) inside the kernel, then read the copy
    once through a memory map: its header is checked, then each tensor's bytes are hashed and, when `expected`
    is given and the header matches it, measured while they are in the cache. The copy is what gets merged, so
    a file swapped or rewritten during or after this read changes nothing. Raises WireError."""
    fd, size = open_regular(source, max_bytes)
    try:
        out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            copy_between(fd, out, size)
            copied = os.fstat(out).st_size  # less than size when the file shrank meanwhile
            if copied < 8:
                read_header(os.pread(out, copied, 0), copied, source.name)  # raises: too short
            # Read-only and shared: a private writable mapping would copy every page it populates.
            with mmap.mmap(out, copied, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ) as mapped:
                sha256, layout, norms = _measure(mapped, copied, source.name, expected)
        finally:
            os.close(out)
    except OSError as err:
        raise WireError(f"{source.name}: could not be copied ({err.strerror})") from None
    finally:
        os.close(fd)
    return PrivateCopy(target, sha256, layout, norms)


def _measure(mapped: mmap.mmap, size: int, name: str, expected: Layout | None):
    """(sha256, layout, norms) of a mapped safetensors file, tensor by tensor in the file's order."""
    length = int.from_bytes(mapped[:8], "little")
    prefix = mapped[: 8 + length] if length <= MAX_HEADER_BYTES and 8 + length <= size else mapped[:8]
    layout = read_header(prefix, size, name)
    # read_header checked the offsets: the tensors tile the data section exactly, so hashing them in offset
    # order after the header hashes the whole file.
    header = parse_json(prefix[8:], f"{name} header")
    spans = sorted((*entry["data_offsets"], key) for key, entry in header.items() if key != "__metadata__")
    measure = expected is not None and layout == expected
    digest = hashlib.sha256(prefix)
    norms: dict[str, float] = {}
    with memoryview(mapped) as whole:
        start = 8 + length
        for begin, end, key in spans:
            data = whole[start + begin : start + end]
            digest.update(data)
            shape, dtype = layout[key]
            if measure and dtype in TORCH_DTYPES:
                norms[key] = _norm(data, start + begin, shape, dtype)
            data.release()
    return digest.hexdigest(), layout, norms


def _norm(data: memoryview, offset: int, shape: tuple[int, ...], dtype: str) -> float:
    """The tensor's L2 norm in float64: the same op on the same values as on the tensor the merge will load.
    `offset`: where the bytes sit in the (page-aligned) mapping."""
    if not len(data):
        return 0.0
    torch_dtype = TORCH_DTYPES[dtype]
    if offset % torch_dtype.itemsize:
        data = memoryview(bytearray(data))  # an unaligned tensor (safetensors writes none): an aligned copy
    tensor = torch.frombuffer(data, dtype=torch_dtype).view(shape)
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


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
