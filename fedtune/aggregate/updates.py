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
    """What one read of an update's tensor file found: the sha256 of its bytes, its header's layout, the L2 norm
    (float64) of each float tensor, taken when the whole layout was the expected one, and where each tensor's bytes
    start (for the merge's reads)."""

    path: Path
    sha256: str
    layout: Layout
    norms: dict[str, float]
    spans: dict[str, tuple[tuple[int, ...], str, int]]


def read_private_copy(source: Path, target: Path, max_bytes: int, expected: Layout | None) -> PrivateCopy:
    """Copy `source` into `target` (a new file only this process writes) inside the kernel, then read the copy
    once: its header is checked, then each tensor's bytes are hashed and, when `expected` is given and the header
    matches it, measured while they are in the cache. The copy is what gets merged, so a file swapped or rewritten
    during or after this read changes nothing. Raises WireError."""
    fd, size = open_regular(source, max_bytes)
    try:
        out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            copy_between(fd, out, size)
            copied = os.fstat(out).st_size  # less than size when the file shrank meanwhile
            sha256, layout, norms, spans = _measure(out, copied, source.name, expected)
        finally:
            os.close(out)
    except OSError as err:
        raise WireError(f"{source.name}: could not be copied ({err.strerror})") from None
    finally:
        os.close(fd)
    return PrivateCopy(target, sha256, layout, norms, spans)


def _measure(fd: int, size: int, name: str, expected: Layout | None):
    """(sha256, layout, norms, spans) of the safetensors file open at `fd`, read tensor by tensor in the file's
    order a chunk at a time through one buffer, which is hashed and measured while it is in the cache."""
    prefix, layout, header = _header(fd, size, name)
    # read_header checked the offsets: the tensors tile the data section exactly, so hashing them in offset
    # order after the header hashes the whole file.
    spans = sorted((*entry["data_offsets"], key) for key, entry in header.items() if key != "__metadata__")
    measure = expected is not None and layout == expected
    digest = hashlib.sha256(prefix)
    norms: dict[str, float] = {}
    buffer = np.empty(min(READ_CHUNK, max(1, size)), dtype=np.uint8)  # aligned for every dtype
    start = len(prefix)
    for begin, end, key in spans:
        dtype = layout[key][1]
        measured = measure and dtype in FLOAT_DTYPES
        square = 0.0
        for at in range(begin, end, READ_CHUNK):
            chunk = buffer[: min(READ_CHUNK, end - at)]
            read_exact(fd, chunk, start + at, name)
            digest.update(chunk)
            if measured:
                square += square_sum(chunk.view(FLOAT_DTYPES[dtype]), dtype)
        if measured:
            norms[key] = math.sqrt(square) if square >= 0 else square  # NaN stays NaN
    return digest.hexdigest(), layout, norms, {key: (*layout[key], start + begin) for begin, _, key in spans}


def _header(fd: int, size: int, name: str) -> tuple[bytes, Layout, dict]:
    """(the first 8 + header bytes, the checked layout, the parsed header) of the safetensors file open at `fd`.
    Raises WireError."""
    first = os.pread(fd, 8, 0)
    length = int.from_bytes(first, "little") if len(first) == 8 else 0
    prefix = os.pread(fd, 8 + length, 0) if length <= MAX_HEADER_BYTES and 8 + length <= size else first
    layout = read_header(prefix, size, name)
    return prefix, layout, parse_json(prefix[8:], f"{name} header")


# Bytes of a tensor read, hashed and measured at once: a multiple of every element's size.
READ_CHUNK = 4 << 20


def read_exact(fd: int, into: np.ndarray, offset: int, name: str) -> None:
    """Fill `into` (bytes) from `fd` at `offset`; WireError when the file ends first."""
    view, done = memoryview(into), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise WireError(f"{name}: the file ends before its tensors' data")
        done += got


def square_sum(values: np.ndarray, dtype: str = "") -> float:
    """Σ x² in float64, a cache-sized chunk at a time (a float32 sum of squares would lose digits and overflow
    past 1.8e19); NaN or infinite when a value is. `dtype` "BF16": `values` are bfloat16's uint16 words."""
    values = values.reshape(-1)
    total = 0.0
    for begin in range(0, values.size, NORM_CHUNK):
        chunk = as_float64(values[begin: begin + NORM_CHUNK], dtype)
        total += float(np.dot(chunk, chunk))
    return total


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
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        prefix, layout, header = _header(fd, os.fstat(fd).st_size, path.name)
    finally:
        os.close(fd)
    return {key: (*layout[key], len(prefix) + header[key]["data_offsets"][0]) for key in layout}


class PrivateTensors:
    """One safetensors file read a block of rows at a time, as float32 numpy arrays (without torch): `pread` into a
    buffer this process owns, so nothing stays mapped and memory holds one block."""

    def __init__(self, path: Path, spans: dict[str, tuple[tuple[int, ...], str, int]] | None = None):
        """`spans`: key → (shape, dtype, where its bytes start), when the file's header was read already."""
        self.path = path
        self.spans = spans if spans is not None else tensor_spans(path)
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
        read_exact(self._fd, raw, start + begin * row_items * itemsize, f"{self.path.name}: tensor {key}")
        values = as_float32(raw.view(FLOAT_DTYPES[dtype]), dtype)
        return values.reshape((max(0, end - begin), *shape[1:]) if shape else ())

    def holds(self, key: str, out: np.ndarray, begin: int) -> bool:
        """Whether rows [begin, begin + len(out)) of the tensor are stored exactly as `out` holds values: float32
        in the same row shape, every row present (so `read_rows_into` can read straight into it)."""
        shape, dtype, _ = self.spans[key]
        return (dtype == "F32" and out.dtype == np.float32 and out.flags.c_contiguous and bool(shape)
                and tuple(shape[1:]) == out.shape[1:] and begin + out.shape[0] <= shape[0])

    def read_rows_into(self, key: str, begin: int, out: np.ndarray) -> None:
        """Read rows [begin, begin + len(out)) of a float32 tensor into `out` (see `holds`)."""
        shape, _, start = self.spans[key]
        read_exact(self._fd, out.reshape(-1).view(np.uint8), start + begin * math.prod(shape[1:]) * 4,
                   f"{self.path.name}: tensor {key}")

    def tensor(self, key: str) -> np.ndarray:
        return self.rows(key)


def file_layout(path: Path) -> Layout:
    """Key → (shape, dtype) of a safetensors file, from its header alone. Raises WireError."""
    return {key: (shape, dtype) for key, (shape, dtype, _) in tensor_spans(path).items()}
