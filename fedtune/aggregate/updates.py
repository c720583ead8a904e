"""Reading a round's updates: once from the site's folder into a private copy, then one tensor key at a time.

`read_private_copy` is the only read of a site's file: a copy inside the kernel, then one pass over the copy,
tensor by tensor, that hashes the bytes and takes each tensor's norm while they are in the cache. The merge
then reads the private copies key by key (`PrivateTensors` here, without torch, for the linear rules;
`fedtune.aggregate.reader.RoundReader` for the others), so it holds one key of each site at most.

Nothing here imports torch: a FedAvg round is read, checked and merged with numpy alone.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.wire.codec import WireError, open_regular, parse_json
from fedtune.wire.tensors import DTYPE_BYTES, MAX_HEADER_BYTES, Layout, read_header
from fedtune.wire.update import copy_between

# The float dtypes a plaintext update holds (the parent's); a norm is taken of these only. bfloat16 has no numpy
# type: its 16 bits are the high half of a float32's.
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# Elements converted to float64 at once when a norm is taken: small enough to stay in the cache.
NORM_CHUNK = 1 << 16


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
            if measure and dtype in FLOAT_DTYPES:
                norms[key] = _norm(data, start + begin, dtype)
            data.release()
    return digest.hexdigest(), layout, norms


def _norm(data: memoryview, offset: int, dtype: str) -> float:
    """The tensor's L2 norm, summed in float64 a cache-sized chunk at a time (a float32 sum of squares would lose
    digits and overflow past 1.8e19). `offset`: where the bytes sit in the (page-aligned) mapping."""
    if not len(data):
        return 0.0
    if offset % DTYPE_BYTES[dtype]:
        data = memoryview(bytearray(data))  # an unaligned tensor (safetensors writes none): an aligned copy
    values = np.frombuffer(data, dtype=FLOAT_DTYPES[dtype])
    total = 0.0
    for begin in range(0, values.size, NORM_CHUNK):
        chunk = as_float64(values[begin: begin + NORM_CHUNK], dtype)
        total += float(np.dot(chunk, chunk))
    return math.sqrt(total)


def as_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 values of a tensor's raw elements (bfloat16 given as its uint16 words): a view when they are
    float32 already."""
    if dtype == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values if values.dtype == np.float32 else values.astype(np.float32)


def as_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return as_float32(values, dtype).astype(np.float64)
    return values.astype(np.float64)


def tensor_spans(path: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """Key → (shape, dtype, where its bytes start) of a safetensors file whose header was checked (a private copy,
    a registry version)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        size = os.fstat(handle.fileno()).st_size
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        prefix += handle.read(min(length, MAX_HEADER_BYTES))
    layout = read_header(prefix, size, path.name)
    header = parse_json(prefix[8:], f"{path.name} header")
    return {key: (*layout[key], 8 + length + header[key]["data_offsets"][0]) for key in layout}


class PrivateTensors:
    """One safetensors file read a block of rows at a time, as float32 numpy arrays (without torch): `pread` into a
    buffer this process owns, so nothing stays mapped and memory holds one block."""

    def __init__(self, path: Path):
        self.path = path
        self.spans = tensor_spans(path)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PrivateTensors:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def keys(self):
        return self.spans.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.spans[key][0]

    def rows(self, key: str, begin: int = 0, end: int | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
        """Rows [begin, end) (along the first axis) of the tensor, as float32. With `scratch` (bytes, large enough)
        the bytes are read into it, and a float32 tensor comes back as a view of it: valid until the next read."""
        shape, dtype, start = self.spans[key]
        if not shape:
            begin, end, row_items = 0, 1, 1
        else:
            end = shape[0] if end is None else min(end, shape[0])
            row_items = math.prod(shape[1:])
        itemsize = DTYPE_BYTES[dtype]
        size = max(0, end - begin) * row_items * itemsize
        raw = scratch[:size] if scratch is not None and scratch.size >= size else np.empty(size, dtype=np.uint8)
        view, offset, done = memoryview(raw), start + begin * row_items * itemsize, 0
        while done < size:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if not got:
                raise WireError(f"{self.path.name}: tensor {key} ends before its data")
            done += got
        values = as_float32(raw.view(FLOAT_DTYPES[dtype]), dtype)
        return values.reshape((max(0, end - begin), *shape[1:]) if shape else ())

    def tensor(self, key: str) -> np.ndarray:
        return self.rows(key)


def file_layout(path: Path) -> Layout:
    """Key → (shape, dtype) of a safetensors file, from its header alone. Raises WireError."""
    return {key: (shape, dtype) for key, (shape, dtype, _) in tensor_spans(path).items()}
