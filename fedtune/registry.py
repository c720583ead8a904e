"""The coordinator's registry: global versions v0000, v0001, …, LATEST and a hash-chained log."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.artifacts import now, read_json, sha256_file, write_text_atomic
from fedtune.errors import BadInput

if TYPE_CHECKING:
    from fedtune.config import FederationConfig

VERSION_RE = re.compile(r"^v(\d{4,})$")
GENESIS = "0" * 64


def version_name(number: int) -> str:
    return f"v{number:04d}"


def round_dir_name(number: int) -> str:
    """The folder of round `number`'s updates: the round that makes version `number` (round-0001 → v0001)."""
    return f"round-{number:04d}"


def version_number(name: str) -> int:
    match = VERSION_RE.match(name)
    if not match:
        raise BadInput(f"'{name}' is not a version name (expected e.g. v0003)")
    return int(match.group(1))


class Registry:
    """A folder of global versions. Only `commit` moves LATEST, and it appends to the log first."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def log_path(self) -> Path:
        return self.root / "log.jsonl"

    def exists(self) -> bool:
        return (self.root / "LATEST").is_file()

    def latest_name(self) -> str:
        path = self.root / "LATEST"
        if not path.is_file():
            raise BadInput(f"{self.root}: not a registry (no LATEST file); create one with `fedtune init`")
        name = path.read_text().strip()
        version_number(name)
        if not (self.root / name / "manifest.json").is_file():
            raise BadInput(f"{path}: names {name}, which is missing from the registry")
        return name

    def latest(self) -> Path:
        return self.root / self.latest_name()

    def path_of(self, name: str) -> Path:
        version_number(name)
        return self.root / name

    def commit(self, name: str, adapter_sha256: str, manifest_path: Path) -> None:
        """Record `name` in the log, then point LATEST at it."""
        previous = self._last_line_hash()
        entry = {
            "event": "version",
            "version": name,
            "adapter_sha256": adapter_sha256,
            "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
            "prev": previous,
            "created": now(),
        }
        line = json.dumps(entry, sort_keys=True) + "\n"
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        write_text_atomic(self.root / "LATEST", name + "\n")

    def _last_line_hash(self) -> str:
        if not self.log_path.is_file():
            return GENESIS
        lines = self.log_path.read_bytes().splitlines(keepends=True)
        return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS

    def verify_log(self) -> list[dict]:
        """Check the hash chain; returns the entries or raises BadInput naming the first broken line."""
        entries, previous = [], GENESIS
        if not self.log_path.is_file():
            return entries
        for number, raw in enumerate(self.log_path.read_bytes().splitlines(keepends=True), start=1):
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None
            if not isinstance(entry, dict):
                raise BadInput(f"{self.log_path}: line {number} is not a JSON object (the log was edited)")
            if entry.get("prev") != previous:
                raise BadInput(f"{self.log_path}: line {number} does not chain to the line before it")
            previous = hashlib.sha256(raw).hexdigest()
            entries.append(entry)
        # The chain cannot vouch for its newest line; the files it names can.
        for number, entry in enumerate(entries, start=1):
            manifest = self.root / str(entry.get("version")) / "manifest.json"
            if manifest.is_file() and hashlib.sha256(manifest.read_bytes()).hexdigest() != entry.get("manifest_sha256"):
                raise BadInput(f"{self.log_path}: line {number} does not match {manifest} (one of them was edited)")
        if entries and self.exists() and entries[-1].get("version") != self.latest_name():
            raise BadInput(f"{self.log_path}: the last entry is {entries[-1].get('version')}, LATEST says {self.latest_name()}")
        return entries

    def resolve(self, ref: Path | str) -> Path:
        """A registry folder means its LATEST; a version folder means itself."""
        ref = Path(ref)
        if (ref / "LATEST").is_file():
            return Registry(ref).latest()
        if (ref / "manifest.json").is_file() and (ref / "adapter_model.safetensors").is_file():
            return ref
        raise BadInput(f"{ref}: neither a registry (with LATEST) nor a global version folder")


def read_version_manifest(version_dir: Path) -> dict:
    manifest = read_json(version_dir / "manifest.json")
    if manifest.get("format") != "fedtune.global/1":
        raise BadInput(f"{version_dir / 'manifest.json'}: not a fedtune global version (format field)")
    return manifest


def resolve_global(ref: Path | str) -> Path:
    return Registry(ref).resolve(ref)


def checked_version(ref: Path | str, config: FederationConfig) -> tuple[Path, dict]:
    """A global version of this federation, its adapter file checked against its manifest.

    Args:
        ref: a registry (its LATEST is used) or a global version folder.
        config: the federation the version must belong to (same base model and LoRA settings).

    Returns:
        The version folder and its manifest.
    """
    folder = resolve_global(ref)
    manifest = read_version_manifest(folder)
    if manifest["base_model"]["sha256"] != config.base_model.sha256:
        raise BadInput(f"{folder}: built on another base model than the federation's; use this federation's registry")
    if manifest.get("lora") != config.lora.model_dump(mode="json"):
        raise BadInput(f"{folder}: LoRA settings differ from federation.yaml's; use this federation's registry")
    adapter = folder / "adapter_model.safetensors"
    if sha256_file(adapter) != manifest["adapter_sha256"]:
        raise BadInput(f"{adapter}: does not match the sha256 in its manifest; fetch the version again")
    return folder, manifest
