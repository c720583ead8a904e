"""A global version as it travels: the coordinator writes and signs it; a site reads and verifies it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedtune.errors import BadInput
from fedtune.wire.codec import WireError, canonical_json, pretty_json, read_capped
from fedtune.wire.keys import SIGNATURE_FILE, SigningKey, verify
from fedtune.wire.manifests import VersionManifest, parse_manifest
from fedtune.wire.tensors import ADAPTER_FILE
from fedtune.wire.update import MANIFEST_FILE

MAX_VERSION_MANIFEST_BYTES = 16 << 20  # per-layer errors and rejected reasons of a large round
SERVER_STATE_FILE = "server_state.safetensors"


def write_version_manifest(folder: Path, manifest: dict, key: SigningKey | None) -> bytes:
    """Write manifest.json (and manifest.sig when there is a coordinator key) into a version folder being made.
    Returns the manifest's bytes."""
    parse_manifest(canonical_json(manifest), VersionManifest, MANIFEST_FILE)  # never publish what a site refuses
    data = pretty_json(manifest)
    (folder / MANIFEST_FILE).write_bytes(data)
    if key is not None:
        (folder / SIGNATURE_FILE).write_bytes((key.sign(canonical_json(manifest)) + "\n").encode("ascii"))
    return data


def read_version_manifest(folder: Path, coordinator_key: str | None = None) -> dict:
    """A version's manifest, parsed and (with the coordinator's public key) its signature checked.

    Raises BadInput with one line naming the file.
    """
    path = folder / MANIFEST_FILE
    try:
        signed, _model = parse_manifest(read_capped(path, MAX_VERSION_MANIFEST_BYTES), VersionManifest, str(path))
        if coordinator_key is not None:
            signature_path = folder / SIGNATURE_FILE
            signature = read_capped(signature_path, 256).decode("ascii", errors="replace").strip()
            if not verify(coordinator_key, canonical_json(signed), signature):
                raise WireError(f"{signature_path}: not the coordinator's signature of {path.name} (the version was "
                                "altered, or is not this federation's); fetch it again from the coordinator")
    except WireError as err:
        message = str(err)
        if message.startswith(SIGNATURE_FILE):
            message = (f"{folder / SIGNATURE_FILE}: missing; this federation's versions are signed by its coordinator"
                       if "missing" in message else f"{folder / SIGNATURE_FILE}: {message.split(': ', 1)[-1]}")
        raise BadInput(message) from None
    return signed


def check_version_files(folder: Path, manifest: dict) -> None:
    """The version's adapter (and server state) against the sha256 its manifest names; BadInput if not."""
    checks = [(ADAPTER_FILE, manifest["adapter_sha256"])]
    if manifest.get("server_state_sha256"):
        checks.append((SERVER_STATE_FILE, manifest["server_state_sha256"]))
    for name, expected in checks:
        path = folder / name
        if not path.is_file():
            raise BadInput(f"{path}: missing; fetch the version again")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise BadInput(f"{path}: does not match the sha256 in its manifest; fetch the version again")
