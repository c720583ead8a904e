"""Forging signed updates the way a hostile or careless site would: with the real encoder and real keys, so the
only thing wrong with a forgery is the thing a test puts there.

Imported as `forge` (tests/ is on sys.path through conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from fedtune.wire.codec import canonical_json, pretty_json
from fedtune.wire.keys import SIGNATURE_FILE, SigningKey
from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE
from fedtune.wire.update import MANIFEST_FILE, encode_update, write_update

# What encode_update adds to the fields a site computed.
ENCODED_FIELDS = ("sha256", "nonce", "fedtune_version", "created")


def key_of(root: Path, site: str) -> SigningKey:
    """The private key build_world(keys=True) made for `site`."""
    return SigningKey.load(root / "keys" / f"{site}.key")


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))


def sign(folder: Path, manifest: dict, key: SigningKey | None) -> dict:
    """Write `manifest` as manifest.json and, with a key, its signature as manifest.sig (as a site sends it)."""
    (folder / MANIFEST_FILE).write_bytes(pretty_json(manifest))
    if key is not None:
        (folder / SIGNATURE_FILE).write_bytes((key.sign(canonical_json(manifest)) + "\n").encode("ascii"))
    return manifest


def resign(folder: Path, key: SigningKey, **changes) -> dict:
    """The folder's manifest with `changes`, signed again by `key` (nonce and tensors kept)."""
    return sign(folder, {**manifest_of(folder), **changes}, key)


def reencode(folder: Path, key: SigningKey, tensors: dict[str, torch.Tensor], **changes) -> dict:
    """Replace the update with `tensors` through encode_update: new sha256, fresh nonce, signed by `key`."""
    manifest = manifest_of(folder)
    fields = {k: v for k, v in manifest.items() if k not in ENCODED_FIELDS} | changes
    adapter_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    update = encode_update(tensors, fields, adapter_config, key)
    write_update(folder, update, replace=True)
    return update.manifest


def with_raw_tensors(folder: Path, key: SigningKey, data: bytes, **changes) -> dict:
    """Replace the tensor file with `data` (any bytes at all) and sign a manifest naming their sha256."""
    (folder / ADAPTER_FILE).write_bytes(data)
    return resign(folder, key, sha256=hashlib.sha256(data).hexdigest(), **changes)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header object, data section) of a safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def pack_safetensors(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (an object, or raw header bytes) and data; `length` overrides the
    8-byte header length it declares."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode("utf-8")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body
