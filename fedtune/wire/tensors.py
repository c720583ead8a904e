"""The tensor half of what crosses a boundary: a strict reading of a safetensors header, and the LoRA key
layout (which keys are factors, how a smaller rank sits inside the federation's).

safetensors' own reader raises on a malformed file, but only when the file is opened, and some of its
errors are not exceptions a caller expects. An update's header is therefore parsed here first, from the
bytes already read, and every way it can lie is refused with a reason: a header longer than the file or
than any adapter needs, invalid JSON, unknown dtypes, offsets that overlap, leave gaps or run past the end,
and shapes whose size does not match their bytes.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

from fedtune.wire.codec import WireError, parse_json, printable

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MAX_HEADER_BYTES = 8 << 20  # a 70B all-linear adapter's header is ~100 kB
# Unsigned words carry masked updates (secure aggregation: integers modulo 2^32 or 2^64).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

Layout = dict[str, tuple[tuple[int, ...], str]]


def read_header(prefix: bytes, file_size: int, source: str = ADAPTER_FILE) -> Layout:
    """Key → (shape, dtype) of a safetensors file, from its first bytes (at least the header) and its size.

    Raises WireError naming what is wrong.
    """
    if file_size < 8 or len(prefix) < 8:
        raise WireError(f"{source}: {file_size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise WireError(f"{source}: header claims {length} bytes, past the file's end or the {MAX_HEADER_BYTES}-byte cap")
    if len(prefix) < 8 + length:
        raise WireError(f"{source}: header truncated")
    header = parse_json(prefix[8 : 8 + length], f"{source} header")
    if not isinstance(header, dict):
        raise WireError(f"{source}: header is not a JSON object")
    data_size = file_size - 8 - length
    layout: Layout = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise WireError(f"{source}: __metadata__ must map names to strings")
            continue
        name = _Name(key)  # escaped only when a reason names it: a header holds hundreds of keys
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"{source}: tensor {name}: entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise WireError(f"{source}: tensor {name}: unknown dtype {printable(dtype, 20)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise WireError(f"{source}: tensor {name}: shape must be a list of at most 8 sizes")
        # The sizes other than 0 count too: safetensors multiplies them in 64 bits and fails on an overflow even
        # when a later size is 0.
        if math.prod(d for d in shape if d) >= 1 << 40:
            raise WireError(f"{source}: tensor {name}: shape {shape} holds more than 2^40 elements")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o for o in offsets)):
            raise WireError(f"{source}: tensor {name}: data_offsets must be [begin, end]")
        begin, end = offsets
        if end < begin or end > data_size:
            raise WireError(f"{source}: tensor {name}: data_offsets [{begin}, {end}] run outside the {data_size} data bytes")
        if (end - begin) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise WireError(f"{source}: tensor {name}: {dtype}{shape} needs {math.prod(shape) * DTYPE_BYTES[dtype]} "
                            f"bytes, its offsets give {end - begin}")
        layout[key] = (tuple(shape), dtype)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise WireError(f"{source}: tensor {name}: data {what}")
        position = end
    if position != data_size:
        raise WireError(f"{source}: {data_size - position} bytes after the last tensor belong to none")
    return layout


class _Name:
    """A tensor key as a reason shows it: control characters escaped, the length bounded."""

    def __init__(self, key: str):
        self.key = key

    def __str__(self) -> str:
        return printable(self.key, 120)

    def __lt__(self, other: _Name) -> bool:
        return self.key < other.key


# --- the LoRA layout ---------------------------------------------------------------------------------------

LORA_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass(frozen=True)
class LoraLayer:
    """The two factor keys of one adapted layer."""

    name: str
    a_key: str
    b_key: str


def lora_layers(keys) -> list[LoraLayer]:
    """Pair lora_A / lora_B keys by layer; keys outside that pattern are not LoRA factors."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        match = LORA_KEY.match(key)
        if match:
            found.setdefault(match["layer"], {})[match["factor"]] = key
    return [LoraLayer(name, parts["A"], parts["B"]) for name, parts in found.items() if set(parts) == {"A", "B"}]


def factor_of(key: str) -> str | None:
    match = LORA_KEY.match(key)
    return match["factor"] if match else None


def rank_slice(tensor, key: str, rank: int):
    """The first `rank` components of a factor: rows of A, columns of B."""
    factor = factor_of(key)
    if factor == "A" and tensor.shape[0] != rank:
        return tensor[:rank]
    if factor == "B" and tensor.shape[1] != rank:
        return tensor[:, :rank]
    return tensor


def pad_rank(tensor, key: str, rank: int):
    """Zero-pad a factor of smaller rank to `rank` components (a torch tensor or a numpy array)."""
    factor = factor_of(key)
    if not hasattr(tensor, "new_zeros"):  # numpy
        import numpy as np

        if factor == "A" and tensor.shape[0] < rank:
            return np.concatenate([tensor, np.zeros((rank - tensor.shape[0], tensor.shape[1]), tensor.dtype)], axis=0)
        if factor == "B" and tensor.shape[1] < rank:
            return np.concatenate([tensor, np.zeros((tensor.shape[0], rank - tensor.shape[1]), tensor.dtype)], axis=1)
        return tensor
    import torch

    if factor == "A" and tensor.shape[0] < rank:
        return torch.cat([tensor, tensor.new_zeros(rank - tensor.shape[0], tensor.shape[1])], dim=0)
    if factor == "B" and tensor.shape[1] < rank:
        return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - tensor.shape[1])], dim=1)
    return tensor


def expected_layout(layout: Layout, rank: int, trained: str) -> Layout:
    """The tensors a site training `rank` components of `trained` factors sends, from the parent's layout."""
    expected = {}
    for key, (shape, dtype) in layout.items():
        factor = factor_of(key)
        if factor == "A":
            if trained == "B":
                continue
            shape = (rank, *shape[1:])
        elif factor == "B":
            shape = (shape[0], rank, *shape[2:])
        expected[key] = (shape, dtype)
    return expected
