"""An update as it travels: the bytes a site sends (signed manifest + tensors) and how the coordinator reads
them back — once, into a private copy, hashed and parsed from the same bytes it will merge.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.artifacts import atomic_folder, stamp
from fedtune.wire.codec import canonical_json, pretty_json, read_capped
from fedtune.wire.keys import SIGNATURE_FILE, SigningKey, verify
from fedtune.wire.manifests import UpdateManifest, parse_manifest
from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE

MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 10  # a real update manifest is ~1 kB
MAX_SIGNATURE_BYTES = 256
COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class UpdateFiles:
    """One update as bytes: what a folder holds and what a network transport sends."""

    manifest: dict
    tensors: bytes
    adapter_config: bytes
    signature: str | None
    extra: dict[str, bytes] = field(default_factory=dict)  # files the manifest names by sha256 (secure aggregation)

    def files(self) -> dict[str, bytes]:
        out = {ADAPTER_FILE: self.tensors, CONFIG_FILE: self.adapter_config, MANIFEST_FILE: pretty_json(self.manifest),
               **self.extra}
        if self.signature is not None:
            out[SIGNATURE_FILE] = (self.signature + "\n").encode("ascii")
        return out


def encode_update(tensors: dict, fields: dict, adapter_config: dict, key: SigningKey | None,
                  extra: dict[str, bytes] | None = None) -> UpdateFiles:
    """Serialize an update computed in memory: safetensors bytes, the manifest naming their sha256 and a fresh
    nonce, and the site's signature of the manifest (None when the federation does not use keys). `extra`: further
    files the manifest already names by sha256."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    manifest = {**fields, "sha256": hashlib.sha256(data).hexdigest(), "nonce": secrets.token_hex(16),
                **stamp()}
    parse_manifest(canonical_json(manifest), UpdateManifest, MANIFEST_FILE)  # send only what a coordinator accepts
    signature = key.sign(canonical_json(manifest)) if key is not None else None
    return UpdateFiles(manifest, data, pretty_json(adapter_config), signature, dict(extra or {}))


def write_update(folder: Path, update: UpdateFiles, replace: bool = False) -> Path:
    """Write the update's files into `folder` (new, unless `replace`) atomically."""
    with atomic_folder(folder, replace=replace) as tmp:
        for name, data in update.files().items():
            (tmp / name).write_bytes(data)
    return folder


@dataclass
class Envelope:
    """An update's manifest as received: the signed JSON object, its checked model and the signature line."""

    folder: Path
    signed: dict
    manifest: UpdateManifest
    signature: str | None

    def signed_by(self, public_key: str) -> bool:
        return self.signature is not None and verify(public_key, canonical_json(self.signed), self.signature)


def read_envelope(folder: Path, max_manifest_bytes: int = MAX_MANIFEST_BYTES) -> Envelope:
    """Read and parse an update's manifest and signature (not its tensors). Raises WireError."""
    data = read_capped(folder / MANIFEST_FILE, max_manifest_bytes)
    signed, manifest = parse_manifest(data, UpdateManifest, MANIFEST_FILE)
    signature = None
    if os.path.lexists(folder / SIGNATURE_FILE):
        raw = read_capped(folder / SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
        signature = raw.decode("ascii", errors="replace").strip()
    return Envelope(folder, signed, manifest, signature)


def copy_between(source: int, target: int, size: int) -> None:
    """Copy `size` bytes (at most) between two descriptors inside the kernel (copy_file_range: no pass through
    this process, a reflink where the filesystem has them), else by reading and writing."""
    copied = 0
    try:
        while copied < size:
            count = os.copy_file_range(source, target, size - copied)
            if count == 0:
                return
            copied += count
        return
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    while copied < size:
        count = os.readv(source, [view[: min(COPY_CHUNK, size - copied)]])
        if not count:
            return
        written = 0
        while written < count:
            written += os.write(target, view[written:count])
        copied += count
